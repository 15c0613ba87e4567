"""The console's pages, its live streams and its actions, as an aiohttp application."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from coordinator.web.actions import Action, action_views, waiting_step
from coordinator.web.feed import ChangeHub, Resync
from coordinator.web.gateway import Gateway, SagaPage, utc_text
from coordinator.web.graph import build_graph
from coordinator.web.query import FILTER_STATES, QueryError, SagaFilters
from coordinator.web.security import CSRF_FIELD, HEADERS, SESSION_COOKIE, Forbidden, Guard
from coordinator.web.timeline import build_timeline, duration_text, event_words
from coordinator.web.views import (
    attention_groups,
    is_failure,
    payload_summary,
    state_class,
    step_attempts,
    trace_link,
)
from saga_sdk import errors as sdk_errors
from saga_sdk.model import Saga, SagaChange, SagaCounts, SagaEvent, SagaState, SagaUpdate
from saga_sdk.requests import ListQuery

log = logging.getLogger(__name__)

TIMELINE_WINDOW = 1000
"""Events read from each end of a saga's log to draw its timeline and attempts: a log of up to
twice as many is drawn whole, a longer one from its two ends (two reads, however long)."""
LOG_PAGE = 50
ATTENTION_LIMIT = 500
"""Parked sagas grouped on the needs-attention page: the oldest ones, read in one call."""
KEEPALIVE = 15.0
COUNT_BUDGET = 0.15
"""Seconds a listing waits for its counts before it is shown without them (they follow)."""
COUNTS_FRESH = 5.0
"""Seconds a count is shared by the pages asking for the same filters."""
COUNTS_EVERY = 1.0
"""Seconds between two recounts a live listing asks for, however many changes come."""
REWATCH_PAUSE = 1.0
REASON_LIMIT = 2000


@dataclass(frozen=True)
class ConsoleConfig:
    """What the pages need besides the coordinator."""

    trace_url: str = ""
    """URL template of a saga's trace: {trace_id} and {saga_id} are filled in."""
    secure_cookies: bool = False
    """Whether cookies are sent over HTTPS only."""


GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
HUB: web.AppKey[ChangeHub] = web.AppKey("hub", ChangeHub)
COUNTS: web.AppKey[CountCache] = web.AppKey("counts")
GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)
CONFIG: web.AppKey[ConsoleConfig] = web.AppKey("config", ConsoleConfig)
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("templates", jinja2.Environment)
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping", asyncio.Event)


def templates() -> jinja2.Environment:
    """The page templates, autoescaped: every value a page shows is escaped unless marked."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("coordinator.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["time"] = utc_text
    environment.filters["duration"] = duration_text
    environment.filters["payload"] = payload_summary
    environment.filters["state_class"] = state_class
    environment.globals["FILTER_STATES"] = FILTER_STATES
    return environment


def _now() -> datetime:
    return datetime.now(UTC)


def _render(request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
    html = _fragment(request, name, status=status, **context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _fragment(request: web.Request, name: str, **context: Any) -> str:
    app = request.app
    template = app[TEMPLATES].get_template(name)
    return template.render(
        csrf_token=request.get("csrf_token", ""),
        csrf_field=CSRF_FIELD,
        coordinator=app[GATEWAY].target,
        path=request.path,
        **context,
    )


# --- middlewares -------------------------------------------------------------------------------


@web.middleware
async def guarded(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Host check, session cookie and security headers on every answer; errors as pages."""
    guard = request.app[GUARD]
    session = request.cookies.get(SESSION_COOKIE, "")
    fresh = not session or len(session) > 100
    if fresh:
        session = guard.new_session()
    request["session"] = session
    request["csrf_token"] = guard.csrf_token(session)
    try:
        guard.check_host(request.headers.get("Host"))
        response = await handler(request)
    except Forbidden as error:
        response = _problem(request, 403, "Refused", str(error))
    except QueryError as error:
        response = _problem(request, 400, "This filter cannot be used", str(error))
    except sdk_errors.SagaRpcError as error:
        response = _rpc_problem(request, error)
    except ValueError as error:  # the SDK's own checks of an argument, before any call
        response = _problem(request, 400, "This cannot be asked", str(error))
    except web.HTTPException as error:
        if error.status >= 400:
            response = _problem(request, error.status, error.reason, error.text or "")
        else:
            raise
    if not response.prepared:
        response.headers.update(HEADERS)
        if fresh:
            response.set_cookie(
                SESSION_COOKIE,
                session,
                httponly=True,
                samesite="Strict",
                secure=request.app[CONFIG].secure_cookies,
                path="/",
            )
    return response


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _problem(request: web.Request, status: int, title: str, detail: str) -> web.Response:
    if _wants_json(request):
        return web.json_response({"ok": False, "error": f"{title}: {detail}"}, status=status)
    return _render(request, "problem.html", status=status, title=title, detail=detail)


_RPC_STATUS = {
    "NOT_FOUND": (404, "Not found"),
    "INVALID_ARGUMENT": (400, "The coordinator refused the request"),
    "FAILED_PRECONDITION": (409, "The coordinator refused"),
    "ABORTED": (409, "The saga changed meanwhile"),
    "ALREADY_EXISTS": (409, "Already exists"),
    "PERMISSION_DENIED": (403, "The console's token does not allow this"),
    "UNAUTHENTICATED": (403, "The coordinator wants a token"),
    "UNAVAILABLE": (502, "The coordinator is unreachable"),
    "DEADLINE_EXCEEDED": (504, "The coordinator did not answer in time"),
}


def _rpc_problem(request: web.Request, error: sdk_errors.SagaRpcError) -> web.Response:
    status, title = _RPC_STATUS.get(error.code.name, (502, "The coordinator failed"))
    reason = f" ({error.reason})" if error.reason else ""
    return _problem(request, status, title, f"{error.code.name}{reason}: {error.message}")


def _params(request: web.Request) -> dict[str, list[str]]:
    """The query string, every value of each parameter."""
    return {key: request.query.getall(key) for key in set(request.query.keys())}


# --- sagas -------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/sagas")


async def sagas(request: web.Request) -> web.Response:
    filters = SagaFilters.from_params(_params(request))
    gateway = request.app[GATEWAY]
    query = filters.list_query()
    definitions = await gateway.definitions()
    try:
        # The rows first: a store may read one query at a time, and counting can take longer.
        page = await gateway.list_page(query, filters.cursor)
    except sdk_errors.InvalidArgument as error:
        # The filters stay on the page, with what the coordinator found wrong in them.
        problems = [f"{v.field}: {v.description}" for v in error.field_violations]
        return _render(
            request,
            "sagas.html",
            status=400,
            filters=filters,
            page=SagaPage((), ""),
            counts=None,
            definitions=definitions,
            rows=[],
            live_url="",
            counts_url="",
            refused=[error.message, *problems],
        )
    counts = await _counts_in_time(request.app[COUNTS].get(query))
    return _render(
        request,
        "sagas.html",
        filters=filters,
        page=page,
        counts=counts,
        definitions=definitions,
        rows=[(saga, waiting_step(saga)) for saga in page.sagas],
        live_url=filters.url("/sagas/live", cursor=""),
        counts_url=filters.url("/sagas/counts", cursor=""),
        refused=[],
    )


class CountCache:
    """Counts per filters, shared by the pages asking within COUNTS_FRESH seconds.

    A page shown before its counts were ready asks for them again at once: both get the one
    call to the coordinator (a count of a million sagas by label may take the store 400 ms).
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._calls: dict[tuple[object, ...], tuple[float, asyncio.Task[SagaCounts]]] = {}

    def get(self, query: ListQuery, *, fresh: bool = False) -> asyncio.Task[SagaCounts]:
        """The call counting `query`'s sagas: a recent one, or (`fresh`) a new one."""
        key = (query.count().SerializeToString(deterministic=True),)
        now = asyncio.get_running_loop().time()
        known = self._calls.get(key)
        if known is not None and not fresh and now - known[0] < COUNTS_FRESH:
            return known[1]
        task = asyncio.ensure_future(self._gateway.count(query))
        task.add_done_callback(lambda done: self._settled(key, done))
        self._calls[key] = (now, task)
        if len(self._calls) > 256:
            del self._calls[next(iter(self._calls))]
        return task

    def _settled(self, key: tuple[object, ...], task: asyncio.Task[SagaCounts]) -> None:
        if task.cancelled() or task.exception() is not None:  # never keep a failure
            known = self._calls.get(key)
            if known is not None and known[1] is task:
                del self._calls[key]


async def _counts_in_time(counting: asyncio.Task[SagaCounts]) -> SagaCounts | None:
    """The counts if they come within COUNT_BUDGET, else None: the page is shown without them
    and asks for them itself (the call goes on, for that request)."""
    try:
        return await asyncio.wait_for(asyncio.shield(counting), COUNT_BUDGET)
    except TimeoutError:
        return None


async def sagas_counts(request: web.Request) -> web.Response:
    """The counts of a listing's filters, for a page that was shown before they were ready."""
    filters = SagaFilters.from_params(_params(request))
    counts = await request.app[COUNTS].get(filters.list_query())
    html = _fragment(request, "_counts.html", filters=filters, counts=counts)
    return web.json_response({"html": html})


def _matches(filters: SagaFilters, change: SagaChange) -> bool:
    """Whether a changed saga belongs to the listing (the filters the feed can tell)."""
    if filters.states and change.state not in filters.states:
        return False
    if filters.definition and change.definition != filters.definition:
        return False
    if filters.version and change.definition_version != filters.version:
        return False
    return all(change.labels.get(key) == value for key, value in filters.labels)


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            **HEADERS,
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 3000\n\n")
    return response


async def _next_or_stop(
    request: web.Request, waiting: asyncio.Future[Any], timeout: float
) -> Any | None:
    """The future's result; None when `timeout` passes first (the future stays pending)."""
    stopping = asyncio.ensure_future(request.app[STOPPING].wait())
    try:
        done, _ = await asyncio.wait(
            {waiting, stopping}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
    finally:
        stopping.cancel()
    if request.app[STOPPING].is_set():
        waiting.cancel()
        raise asyncio.CancelledError
    return waiting.result() if waiting in done else None


class _StreamGuard:
    """End a live stream quietly when its browser goes away, and when the coordinator fails it
    (its headers are sent: no error page can follow); the browser's EventSource then opens it
    again after the stream's retry delay."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: Any
    ) -> bool:
        if isinstance(error, ConnectionResetError | asyncio.CancelledError):
            return True
        if isinstance(error, sdk_errors.SagaSdkError):
            log.warning("%s ended: the coordinator failed it (%s)", self._what, error)
            return True
        return False


async def sagas_live(request: web.Request) -> web.StreamResponse:
    """The listing's live changes and counts, from the change feed."""
    filters = SagaFilters.from_params(_params(request))
    query = filters.list_query()
    response = await _open_stream(request)
    recount_at: float | None = None
    loop = asyncio.get_running_loop()
    with _StreamGuard("the sagas' live stream"):
        async with request.app[HUB].subscribe() as next_item:
            waiting = next_item()
            while True:
                timeout = KEEPALIVE
                if recount_at is not None:
                    timeout = max(0.0, recount_at - loop.time())
                item = await _next_or_stop(request, waiting, timeout)
                if item is None:
                    if recount_at is not None and loop.time() >= recount_at:
                        recount_at = None
                        counts = await request.app[COUNTS].get(query, fresh=True)
                        html = _fragment(request, "_counts.html", filters=filters, counts=counts)
                        await response.write(_sse("counts", {"html": html}))
                    else:
                        await response.write(b": keepalive\n\n")
                    continue
                waiting = next_item()
                if isinstance(item, Resync):
                    await response.write(_sse("resync", {"why": item.why}))
                    recount_at = loop.time()
                    continue
                change = item
                await response.write(
                    _sse(
                        "change",
                        {
                            "saga_id": change.saga_id,
                            "state": change.state.value,
                            "state_class": state_class(change.state),
                            "event": event_words(change.event.type),
                            "time": utc_text(change.event.time),
                            "new": change.event.type.value == "CREATED"
                            and _matches(filters, change),
                        },
                    )
                )
                if recount_at is None:
                    recount_at = loop.time() + COUNTS_EVERY
    return response


async def attention(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    query = ListQuery.of([SagaState.NEEDS_ATTENTION], page_size=ATTENTION_LIMIT)
    page, counts = await asyncio.gather(gateway.list_protos(query), gateway.count(ListQuery.of()))
    parked = page.sagas
    total = counts[SagaState.NEEDS_ATTENTION]
    return _render(
        request,
        "attention.html",
        groups=attention_groups(parked),
        shown=len(parked),
        total=total,
        filters=SagaFilters(),
    )


# --- one saga ----------------------------------------------------------------------------------


def _saga_id(request: web.Request) -> str:
    saga_id = request.query.get("id", "")
    if not saga_id:
        raise QueryError("id: which saga? (/saga?id=...)")
    return saga_id


@dataclass(frozen=True)
class LogView:
    """One page of the event log as the page shows it."""

    events: tuple[SagaEvent, ...]
    cursor: str
    next_cursor: str
    failures_only: bool


FAILURE_SCAN = 250
"""Events read per call while looking for failures."""


async def _log_view(gateway: Gateway, saga_id: str, cursor: str, failures_only: bool) -> LogView:
    """A page of the log: the coordinator's own pages, or the failures among them.

    The failures-only cursor is the coordinator's page token and how many events of that page
    were shown already (`token~skip`), so that each page shows exactly LOG_PAGE failures.
    """
    if not failures_only:
        page = await gateway.events_page(saga_id, LOG_PAGE, cursor)
        return LogView(page.events, cursor, page.next_token, False)
    token, _, skip_text = cursor.partition("~")
    skip = int(skip_text) if skip_text.isdigit() else 0
    found: list[SagaEvent] = []
    while True:
        page = await gateway.events_page(saga_id, FAILURE_SCAN, token)
        for index, event in enumerate(page.events[skip:], start=skip):
            if not is_failure(event):
                continue
            found.append(event)
            if len(found) == LOG_PAGE:
                more = index + 1 < len(page.events) or bool(page.next_token)
                return LogView(tuple(found), cursor, f"{token}~{index + 1}" if more else "", True)
        if not page.next_token:
            return LogView(tuple(found), cursor, "", True)
        token, skip = page.next_token, 0


INLINE_EVENTS = 2000
"""A saga with a longer log gets its page first, then its timeline and attempts (two reads of
TIMELINE_WINDOW events, about a tenth of a second) in a second request the page makes at once."""
PARTS = ("timeline", "steps")


async def _saga_fragments(
    request: web.Request,
    saga: Saga,
    log_cursor: str,
    failures_only: bool,
    *,
    parts: bool = True,
    only_parts: bool = False,
) -> dict[str, str]:
    gateway = request.app[GATEWAY]
    now = _now()
    context: dict[str, Any] = {
        "saga": saga,
        "waiting": waiting_step(saga),
        "parts_url": "/saga/parts?" + urlencode([("id", saga.saga_id), ("v", str(saga.version))]),
    }
    names: list[str] = []
    if not only_parts:
        context.update(
            actions=action_views(saga),
            log=await _log_view(gateway, saga.saga_id, log_cursor, failures_only),
            trace_url=trace_link(request.app[CONFIG].trace_url, saga),
            trace_template=request.app[CONFIG].trace_url,
            total=duration_text((saga.end_time or now) - saga.create_time)
            if saga.create_time
            else "",
        )
        names.extend(("header", "actions", "log", "audit"))
    if parts:
        ends = await gateway.log_ends(saga.saga_id, TIMELINE_WINDOW)
        context.update(
            timeline=build_timeline(saga, ends.head, now, tail=ends.tail, unread=ends.unread),
            steps=step_attempts(saga, [*ends.head, *ends.tail], now),
            head_read=len(ends.head),
            tail_read=len(ends.tail),
            unread=ends.unread,
        )
        names.extend(PARTS)
    fragments = {name: _fragment(request, f"_saga_{name}.html", **context) for name in names}
    if not parts:
        for name in PARTS:
            fragments[name] = _fragment(request, "_saga_pending_part.html", part=name, **context)
    return fragments


async def saga_parts(request: web.Request) -> web.Response:
    """A long saga's timeline and attempts, which the page asks for once it is shown."""
    saga = await request.app[GATEWAY].get(_saga_id(request))
    fragments = await _saga_fragments(request, saga, "", False, only_parts=True)
    return web.json_response({"html": fragments, "version": saga.version})


async def saga_page(request: web.Request) -> web.Response:
    saga_id = _saga_id(request)
    gateway = request.app[GATEWAY]
    cursor = request.query.get("log", "")
    failures_only = request.query.get("failures") == "1"
    saga = await gateway.get(saga_id)
    fragments = await _saga_fragments(
        request, saga, cursor, failures_only, parts=saga.version <= INLINE_EVENTS
    )
    live = [("id", saga_id), ("v", str(saga.version))]
    if cursor:
        live.append(("log", cursor))
    if failures_only:
        live.append(("failures", "1"))
    return _render(
        request,
        "saga.html",
        saga=saga,
        fragments=fragments,
        live_params=live,
        done=request.query.get("done", ""),
    )


async def _watch_into(gateway: Gateway, saga_id: str, slot: asyncio.Queue[SagaUpdate]) -> None:
    async for update in gateway.watch(saga_id):
        while not slot.empty():  # only the newest state matters to the page
            slot.get_nowait()
        await slot.put(update)


async def saga_live(request: web.Request) -> web.StreamResponse:
    """A saga's page kept current: WatchSaga while it moves, the change feed while it is parked.

    WatchSaga ends when the saga settles; a parked saga moves again only when an operator acts,
    which the change feed tells, so the watch is opened again then.
    """
    saga_id = _saga_id(request)
    seen = int(request.query.get("v", "0") or 0)
    cursor = request.query.get("log", "")
    failures_only = request.query.get("failures") == "1"
    gateway = request.app[GATEWAY]
    response = await _open_stream(request)

    async def send(saga: Saga) -> None:
        nonlocal seen
        seen = saga.version
        fragments = await _saga_fragments(request, saga, cursor, failures_only)
        await response.write(
            _sse("saga", {"state": saga.state.value, "version": saga.version, "html": fragments})
        )

    with _StreamGuard(f"the live stream of saga {saga_id!r}"):
        async with request.app[HUB].subscribe() as next_item:
            while True:
                slot: asyncio.Queue[SagaUpdate] = asyncio.Queue()
                watcher = asyncio.create_task(_watch_into(gateway, saga_id, slot))
                try:
                    while True:
                        getting = asyncio.ensure_future(slot.get())
                        try:
                            finished, _ = await asyncio.wait(
                                {getting, watcher},
                                timeout=KEEPALIVE,
                                return_when="FIRST_COMPLETED",
                            )
                        except BaseException:
                            getting.cancel()
                            raise
                        if request.app[STOPPING].is_set():
                            getting.cancel()
                            return response
                        if getting in finished:
                            update = getting.result()
                            if update.saga.version != seen:
                                await send(update.saga)
                            continue
                        getting.cancel()
                        if watcher in finished:
                            break
                        await response.write(b": keepalive\n\n")
                    if watcher.exception() is not None:
                        error = watcher.exception()
                        log.info("watching %r broke: %s; watching again", saga_id, error)
                        await asyncio.sleep(REWATCH_PAUSE)
                        continue
                    while not slot.empty():
                        update = slot.get_nowait()
                        if update.saga.version != seen:
                            await send(update.saga)
                finally:
                    watcher.cancel()
                # The watch ended: the saga settled. Ended sagas never change again.
                saga = await gateway.get(saga_id)
                if saga.version != seen:
                    await send(saga)
                if saga.state in (SagaState.SUCCEEDED, SagaState.COMPENSATED):
                    await response.write(_sse("end", {"state": saga.state.value}))
                    return response
                # Parked: wait for the feed to tell of a change of this saga.
                while True:
                    waiting = next_item()
                    item = await _next_or_stop(request, waiting, KEEPALIVE)
                    if item is None:
                        waiting.cancel()
                        await response.write(b": keepalive\n\n")
                        continue
                    if isinstance(item, Resync) or item.saga_id == saga_id:
                        break
    return response


# --- actions -----------------------------------------------------------------------------------


def _form_text(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


async def saga_action(request: web.Request) -> web.StreamResponse:
    """Take an operator action, after the cross-site checks; JSON for the page's script."""
    guard = request.app[GUARD]
    form = await request.post()
    guard.check_post(
        host=request.headers.get("Host"),
        origin=request.headers.get("Origin"),
        fetch_site=request.headers.get("Sec-Fetch-Site"),
        session=request.cookies.get(SESSION_COOKIE),
        token=_form_text(form, CSRF_FIELD),
    )
    saga_id = _form_text(form, "saga_id")
    try:
        action = Action(_form_text(form, "action"))
    except ValueError:
        raise QueryError(f"action: one of {', '.join(a.value for a in Action)}") from None
    reason = _form_text(form, "reason")
    if not saga_id:
        raise QueryError("saga_id: which saga?")
    if not reason:
        raise QueryError("reason: say why; it is recorded in the saga's audit trail")
    if len(reason) > REASON_LIMIT:
        raise QueryError(f"reason: at most {REASON_LIMIT} characters")
    step = _form_text(form, "step")
    expected = _form_text(form, "expected_version")
    version = int(expected) if expected.isdigit() else 0
    gateway = request.app[GATEWAY]
    client = gateway.client
    actor = gateway.actor
    saga: Saga
    if action is Action.CANCEL:
        saga = await client.cancel(saga_id, reason, actor=actor)
    elif action is Action.RETRY:
        saga = await client.retry(
            saga_id, step, reason=reason, actor=actor, expected_version=version
        )
    elif action is Action.RESUME:
        saga = await client.resume(saga_id, reason=reason, actor=actor, expected_version=version)
    elif action is Action.MARK_COMPENSATED:
        saga = await client.mark_compensated(
            saga_id, step, reason=reason, actor=actor, expected_version=version
        )
    else:
        output_text = _form_text(form, "output")
        output: object = None
        if output_text:
            try:
                output = json.loads(output_text)
            except ValueError as error:
                raise QueryError(f"output: not JSON ({error})") from None
        saga = await client.complete(
            saga_id, step, reason=reason, output=output, actor=actor, expected_version=version
        )
    message = f"{action.label}: done; the saga is {saga.state.value}"
    if _wants_json(request):
        return web.json_response({"ok": True, "message": message, "state": saga.state.value})
    raise web.HTTPSeeOther(f"/saga?{urlencode([('id', saga_id), ('done', message)])}")


# --- definitions -------------------------------------------------------------------------------


async def definitions(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    summaries = await gateway.definitions()
    newest = await asyncio.gather(*(gateway.definition(summary.name) for summary in summaries))
    graphs = {
        registered.definition.name: build_graph(registered.definition) for registered in newest
    }
    return _render(request, "definitions.html", summaries=summaries, graphs=graphs)


async def definition(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    if not name:
        raise QueryError("name: which definition? (/definition?name=...)")
    version_text = request.query.get("version", "0") or "0"
    if not version_text.isdigit():
        raise QueryError(f"version: {version_text!r} is not a version number")
    gateway = request.app[GATEWAY]
    registered, summaries = await asyncio.gather(
        gateway.definition(name, int(version_text)), gateway.definitions(name)
    )
    summary = next((s for s in summaries if s.name == name), None)
    return _render(
        request,
        "definition.html",
        registered=registered,
        definition=registered.definition,
        summary=summary,
        graph=build_graph(registered.definition),
    )


# --- the application ---------------------------------------------------------------------------


def static_root() -> Any:
    """The package's static files."""
    return resources.files("coordinator.web") / "static"


def create_app(gateway: Gateway, guard: Guard, config: ConsoleConfig) -> web.Application:
    """The console as an aiohttp application around an open gateway."""
    app = web.Application(middlewares=[guarded], client_max_size=256 * 1024)
    app[GATEWAY] = gateway
    app[HUB] = ChangeHub(gateway)
    app[COUNTS] = CountCache(gateway)
    app[GUARD] = guard
    app[CONFIG] = config
    app[TEMPLATES] = templates()
    app[STOPPING] = asyncio.Event()
    app.router.add_get("/", index)
    app.router.add_get("/sagas", sagas)
    app.router.add_get("/sagas/live", sagas_live)
    app.router.add_get("/sagas/counts", sagas_counts)
    app.router.add_get("/attention", attention)
    app.router.add_get("/saga", saga_page)
    app.router.add_get("/saga/live", saga_live)
    app.router.add_get("/saga/parts", saga_parts)
    app.router.add_post("/saga/action", saga_action)
    app.router.add_get("/definitions", definitions)
    app.router.add_get("/definition", definition)
    app.router.add_static("/static", str(static_root()))

    async def stopping(app: web.Application) -> None:
        app[STOPPING].set()
        await app[HUB].close()

    app.on_shutdown.append(stopping)
    return app
