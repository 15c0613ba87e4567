"""Named instants at which a test can make the coordinator die on the spot, for crash tests.

Off unless the ``SAGA_CRASH_POINT`` environment variable names one: ``NAME`` dies the first time
the coordinator passes that point, ``NAME:N`` the N-th time. Dying is SIGKILL sent to itself:
no cleanup, no flush, exactly what a power cut or the OOM killer leaves behind.
"""

from __future__ import annotations

import enum
import os
import signal

ENVIRONMENT_VARIABLE = "SAGA_CRASH_POINT"


class CrashPoint(enum.StrEnum):
    """The windows that matter for durability."""

    AFTER_CREATE_COMMIT = "after-create-commit"
    """The saga is stored; CreateSaga has not answered yet."""
    AFTER_DISPATCH_COMMIT = "after-dispatch-commit"
    """A decision to call a participant is stored; the call is not sent yet."""
    AFTER_ANSWER = "after-answer"
    """A participant answered; the answer is not stored yet."""
    INSIDE_COMPENSATION = "inside-compensation"
    """A Compensate is about to be sent."""
    BEFORE_TERMINAL_WRITE = "before-terminal-write"
    """The saga's ending is decided; it is not stored yet."""


class CrashPoints:
    """Dies at the armed point; every other call is one attribute check."""

    def __init__(self, spec: str | None = None) -> None:
        self.armed = False
        self._point: CrashPoint | None = None
        self._remaining = 0
        if spec:
            name, _, count = spec.partition(":")
            try:
                self._point = CrashPoint(name)
                self._remaining = int(count) if count else 1
            except ValueError:
                known = ", ".join(p.value for p in CrashPoint)
                raise ValueError(
                    f"{ENVIRONMENT_VARIABLE}={spec!r}: expected NAME or NAME:N with NAME one of "
                    f"{known}"
                ) from None
            if self._remaining < 1:
                raise ValueError(f"{ENVIRONMENT_VARIABLE}={spec!r}: N must be at least 1")
            self.armed = True

    @classmethod
    def from_environment(cls) -> CrashPoints:
        """The crash point named by the environment, if any."""
        return cls(os.environ.get(ENVIRONMENT_VARIABLE))

    def reach(self, point: CrashPoint) -> None:
        """Die here if this is the armed point and its count is reached."""
        if not self.armed or point is not self._point:
            return
        self._remaining -= 1
        if self._remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)


NO_CRASH_POINTS = CrashPoints()
