"""Logging setup. Only entry points call :func:`setup_logging`; library modules just get loggers."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: str = "INFO") -> None:
    """Configure a plain console log and quiet the chattiest third-party loggers."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
