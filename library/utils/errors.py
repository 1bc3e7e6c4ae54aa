"""User-facing errors and the wrapper that turns them into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable


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
