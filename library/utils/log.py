"""Logging setup. Only entry points call :func:`setup_logging`; library modules just get loggers."""

from __future__ import annotations

import logging
import os
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", log_file: str | None = None) -> None:
    """Configure a plain console log (and, with ``log_file``, the same lines appended to that file,
    kohya's ``--console_log_file``) and quiet the chattiest third-party loggers."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=FORMAT, datefmt="%H:%M:%S")
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        logging.getLogger().addHandler(handler)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "diffusers", "accelerate", "PIL", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes warns on every import on CPU about optional kernels it cannot fetch
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        # lazy: entry scripts import this before parsing, so --help stays fast
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog
        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 - logging setup must never stop a run
        pass
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*use_reentrant.*")
