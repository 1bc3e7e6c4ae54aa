"""User-facing errors and the wrapper that turns them into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with what the user gave us (a flag, a file, a config key).

    Entry scripts print it as one line, without a traceback, and exit with status 2.
    The message should name the flag/file/key and say what to do.
    """


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run an entry point's ``main``; report :class:`UserError` as ``error: ...`` and exit 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
