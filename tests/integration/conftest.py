"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.coordinator import NAMES, start_participants
from tests.support.participants import ScriptedParticipant


@pytest.fixture
async def participants() -> AsyncIterator[dict[str, ScriptedParticipant]]:
    """The four participants, scripted, each on its own loopback server."""
    started = await start_participants(*NAMES)
    yield started
    for participant in started.values():
        await participant.stop()
