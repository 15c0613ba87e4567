"""Each committed state is rendered once, however many callers ask for it."""

from __future__ import annotations

from coordinator.transport.convert import Renderings


def counting(rendered: list[str], size: int = 4096) -> Renderings[Value, str]:
    """Renderings that record every value they render."""

    def render(value: Value) -> str:
        rendered.append(value.name)
        return f"<{value.name}>"

    return Renderings(render, size=size)


class Value:
    """An immutable value as the engine hands it around (compared by identity here)."""

    def __init__(self, name: str) -> None:
        self.name = name


def test_the_same_object_is_rendered_once_for_every_caller() -> None:
    rendered: list[str] = []
    renderings = counting(rendered)
    value = Value("a")

    assert [renderings(value) for _ in range(5)] == ["<a>"] * 5
    assert rendered == ["a"]


def test_another_object_is_rendered_anew_even_when_equal() -> None:
    rendered: list[str] = []
    renderings = counting(rendered)

    renderings(Value("a"))
    renderings(Value("a"))

    assert rendered == ["a", "a"]


def test_only_the_most_recent_values_keep_their_rendering() -> None:
    rendered: list[str] = []
    renderings = counting(rendered, size=2)
    first, second, third = Value("1"), Value("2"), Value("3")

    for value in (first, second, third, third, second, first):
        renderings(value)

    assert rendered == ["1", "2", "3", "1"]
