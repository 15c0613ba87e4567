"""A listing's filters as they live in the console's URL: parsed, checked and written back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import urlencode

from saga_sdk.model import SagaState
from saga_sdk.requests import ListQuery

PAGE_SIZES = (20, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
FILTER_STATES = (
    SagaState.NEEDS_ATTENTION,
    *(s for s in SagaState if s not in (SagaState.UNSPECIFIED, SagaState.NEEDS_ATTENTION)),
)
"""The states a listing filters on, NEEDS_ATTENTION first (the order of the counts)."""


class QueryError(ValueError):
    """A filter in the URL that cannot be used; the message says which and why."""


def _one(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = [value.strip() for value in params.get(name, ()) if value.strip()]
    if len(values) > 1:
        raise QueryError(f"{name}: give it once")
    return values[0] if values else ""


def parse_time(value: str, name: str) -> datetime | None:
    """`2026-03-01T12:00`, with seconds or an offset if wanted; no offset means UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name}: {value!r} is not a time like 2026-03-01T12:00") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class SagaFilters:
    """What a listing of sagas keeps, and where its page starts."""

    states: tuple[SagaState, ...] = ()
    definition: str = ""
    version: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    created_from: datetime | None = None
    created_to: datetime | None = None
    stuck_on: str = ""
    """The participant the saga waits on."""
    stuck_step: str = ""
    """The step the saga waits on."""
    page_size: int = DEFAULT_PAGE_SIZE
    cursor: str = ""
    """The page token of the page shown ("" for the first)."""

    @classmethod
    def from_params(cls, params: Mapping[str, Sequence[str]]) -> SagaFilters:
        """Parse the query string's parameters; QueryError names the first bad one."""
        states: list[SagaState] = []
        for value in params.get("state", ()):
            for name in value.split(","):
                if not name.strip():
                    continue
                try:
                    state = SagaState(name.strip().upper())
                except ValueError:
                    state = SagaState.UNSPECIFIED
                if state is SagaState.UNSPECIFIED:
                    known = ", ".join(s.value for s in FILTER_STATES)
                    raise QueryError(f"state: {name!r} is not one of {known}")
                if state not in states:
                    states.append(state)
        definition = _one(params, "definition")
        version_text = _one(params, "version")
        version = 0
        if version_text:
            if not version_text.isdigit() or int(version_text) < 1:
                raise QueryError(f"version: {version_text!r} is not a version number (1, 2, ...)")
            if not definition:
                raise QueryError("version: choose a definition too")
            version = int(version_text)
        labels: dict[str, str] = {}
        for value in params.get("label", ()):
            if not value.strip():
                continue
            key, sep, wanted = value.partition("=")
            if not sep or not key.strip():
                raise QueryError(f"label: {value!r} is not key=value")
            labels[key.strip()] = wanted.strip()
        created_from = parse_time(_one(params, "from"), "from")
        created_to = parse_time(_one(params, "to"), "to")
        if created_from and created_to and created_from >= created_to:
            raise QueryError("from: must be before to")
        size_text = _one(params, "size")
        page_size = DEFAULT_PAGE_SIZE
        if size_text:
            if not size_text.isdigit() or int(size_text) not in PAGE_SIZES:
                raise QueryError(f"size: one of {', '.join(map(str, PAGE_SIZES))}")
            page_size = int(size_text)
        return cls(
            states=tuple(states),
            definition=definition,
            version=version,
            labels=tuple(sorted(labels.items())),
            created_from=created_from,
            created_to=created_to,
            stuck_on=_one(params, "stuck_on"),
            stuck_step=_one(params, "stuck_step"),
            page_size=page_size,
            cursor=_one(params, "page"),
        )

    def list_query(self) -> ListQuery:
        """The SDK's query for these filters."""
        try:
            return ListQuery.of(
                self.states,
                self.definition or None,
                self.page_size,
                definition_version=self.version,
                labels=dict(self.labels),
                created_after=self.created_from,
                created_before=self.created_to,
                stuck_on_participant=self.stuck_on or None,
                stuck_on_step=self.stuck_step or None,
            )
        except ValueError as error:
            raise QueryError(str(error)) from None

    def params(self, *, cursor: bool = True) -> list[tuple[str, str]]:
        """The query string's parameters, in a stable order (the cursor last)."""
        pairs = [("state", state.value) for state in self.states]
        if self.definition:
            pairs.append(("definition", self.definition))
        if self.version:
            pairs.append(("version", str(self.version)))
        pairs.extend(("label", f"{key}={value}") for key, value in self.labels)
        if self.created_from:
            pairs.append(("from", self.created_from.strftime("%Y-%m-%dT%H:%M:%S")))
        if self.created_to:
            pairs.append(("to", self.created_to.strftime("%Y-%m-%dT%H:%M:%S")))
        if self.stuck_on:
            pairs.append(("stuck_on", self.stuck_on))
        if self.stuck_step:
            pairs.append(("stuck_step", self.stuck_step))
        if self.page_size != DEFAULT_PAGE_SIZE:
            pairs.append(("size", str(self.page_size)))
        if cursor and self.cursor:
            pairs.append(("page", self.cursor))
        return pairs

    def url(self, path: str = "/sagas", **changes: object) -> str:
        """This listing's URL, with some fields changed (e.g. `cursor=token`)."""
        query = replace(self, **changes) if changes else self  # type: ignore[arg-type]
        encoded = urlencode(query.params())
        return f"{path}?{encoded}" if encoded else path

    def with_state(self, state: SagaState | None) -> str:
        """The URL of the first page of these filters with only `state` (None: every state)."""
        return self.url(states=() if state is None else (state,), cursor="")

    @property
    def filtered(self) -> bool:
        """Whether any filter is set."""
        params = self.params(cursor=False)
        return bool(params) and params != [("size", str(self.page_size))]
