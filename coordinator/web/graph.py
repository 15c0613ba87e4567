"""A definition's steps laid out as a graph: the forward path, its compensations, the pivot."""

from __future__ import annotations

from dataclasses import dataclass

from saga_sdk.model import SagaDefinition, StepKind

BOX_WIDTH = 172
BOX_HEIGHT = 54
GAP = 46
MARGIN = 12
COMPENSATION_Y = 120


@dataclass(frozen=True)
class Node:
    """One step's box, and its compensation's box below it (if it has one)."""

    x: int
    name: str
    participant: str
    action: str
    compensation: str
    kind: str
    """"compensatable", "pivot" or "retriable"."""
    emits: str


@dataclass(frozen=True)
class Graph:
    """What the SVG draws."""

    nodes: tuple[Node, ...]
    width: int
    height: int
    box_width: int
    box_height: int
    gap: int
    compensation_y: int
    pivot_x: int | None
    """Where the point of no return is drawn (after the pivot), if there is a pivot."""


def build_graph(definition: SagaDefinition) -> Graph:
    """Lay out the steps left to right, compensations below, newest undone first."""
    nodes = tuple(
        Node(
            MARGIN + index * (BOX_WIDTH + GAP),
            step.name,
            step.participant,
            step.action,
            step.compensation,
            step.kind.value.lower(),
            step.emits,
        )
        for index, step in enumerate(definition.steps)
    )
    pivot_x = None
    for node, step in zip(nodes, definition.steps, strict=True):
        if step.kind is StepKind.PIVOT:
            pivot_x = node.x + BOX_WIDTH + GAP // 2
    count = max(1, len(nodes))
    return Graph(
        nodes=nodes,
        width=2 * MARGIN + count * BOX_WIDTH + (count - 1) * GAP,
        height=COMPENSATION_Y + BOX_HEIGHT + 2 * MARGIN + 8,
        box_width=BOX_WIDTH,
        box_height=BOX_HEIGHT,
        gap=GAP,
        compensation_y=COMPENSATION_Y,
        pivot_x=pivot_x,
    )
