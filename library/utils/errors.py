"""User-facing errors and the wrapper that turns them into one clear line."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A problem with what the user gave us (a flag, a file, a config key).

    Entry scripts print it as one line, without a traceback, and exit with status 2.
    The message should name the flag/file/key and say what to do.
    """


class Interrupted(Exception):
    """The run was stopped by a signal after saving what it had; the message says what was saved
    and how to continue, ``code`` is the exit status (128 + the signal's number, as shells report)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run an entry point's ``main``; report :class:`UserError` as ``error: ...`` and exit 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last guard: a bug, or an input no check caught
        print(f"error: {unexpected_summary(exc)}", file=sys.stderr)
        sys.exit(1)


def unexpected_summary(exc: BaseException) -> str:
    """One line for an exception no check turned into a message: what and where, with the full
    traceback written to a log file (printed too when SDTRAIN_TRACEBACK=1)."""
    text = "".join(traceback.format_exception(exc))
    if os.environ.get("SDTRAIN_TRACEBACK") == "1":
        print(text, file=sys.stderr)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    script = Path(sys.argv[0]).stem or "python"
    log = Path(tempfile.gettempdir()) / f"sdtrain-{script}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text(text, encoding="utf-8")
        saved = f"the full traceback is in {log}"
    except OSError:
        saved = "set SDTRAIN_TRACEBACK=1 to see the full traceback"
    detail = str(exc).splitlines()[0] if str(exc) else "no message"
    return f"unexpected {type(exc).__name__}{where}: {detail} ({saved}; please report it with that file)"
