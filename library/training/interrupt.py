"""Ctrl-C (SIGINT) and SIGTERM while training: the first one asks the loop to stop when the current
optimizer step is done, so a resumable state can be saved; a second SIGINT stops at once (files
already written stay intact: every save is atomic)."""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context that turns the first SIGINT/SIGTERM into a request (``requested`` names it)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        self.requested = signal.Signals(signum).name
        logger.warning("%s: stopping after this step and saving a state to resume from (Ctrl-C again stops at "
                       "once, without saving)", self.requested)

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.requested or "SIGINT"))


def ignore_interrupts(_worker_id: int = 0) -> None:
    """Data-loader workers leave Ctrl-C to the main process (a terminal sends it to all of them): a
    worker dying on it would fail the step the main process is finishing before it saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
