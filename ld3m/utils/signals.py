"""Graceful stop on SIGTERM / SIGUSR1: finish the current step, checkpoint, exit.

Slurm sends SIGTERM at cancellation and at the time limit (KillWait seconds before SIGKILL);
the sbatch templates in slurm/ send SIGUSR1 ahead of the limit (`--signal`). A loop polls
`StopFlag.requested` once per iteration, so a signal never interrupts a step half way.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Context manager: while active, the stop signals set `requested` instead of killing."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        """Restore the previous handlers; a stop heard here is passed on to an enclosing
        StopFlag (a queue worker around a run that ended with its last step)."""
        outer = getattr(self._previous.get(self.signum), "__self__", None)  # type: ignore[arg-type]
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self.requested and isinstance(outer, StopFlag):
            outer.requested, outer.signum = True, self.signum
