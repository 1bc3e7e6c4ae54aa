"""A server that runs project scripts in forked copies of one interpreter that has already imported
torch, diffusers and transformers.

A fresh interpreter spends about 7 s of a 2-core machine importing those before a script does
anything; the suite runs scripts a few hundred times. Here the imports happen once, in the server;
each script then runs in a child forked from it, so every run still has a process of its own (its
own globals, signal handlers, exit code and file descriptors), as ``python script.py`` would.
The server computes nothing before forking (no thread pools are started, so forking is safe).

Protocol (one JSON line per request on stdin, one JSON line per answer on stdout):
``{"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path}`` ->
``{"pid": child}`` at once, then ``{"code": exit status}`` when the child ends.
Run as ``python tests/script_server.py``; tests reach it through :func:`tests.conftest.run_script`.
"""

from __future__ import annotations

import json
import os
import sys

PRELOADED = ("torch", "numpy", "PIL.Image", "safetensors.torch", "accelerate", "transformers", "diffusers",
             "diffusers.models", "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
             "diffusers.models.unets.unet_2d_condition", "diffusers.models.transformers.transformer_sd3",
             "diffusers.models.autoencoders.autoencoder_kl", "tensorboard", "library.training.trainer",
             "library.models.sd_loading", "library.models.sd3_loading")


def _child(request: dict) -> None:
    """In the forked child: become ``python argv[0] argv[1:]`` and never return."""
    import random
    import runpy

    code = 0
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        random.seed()  # a fresh interpreter's random state, not the server's
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit status 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit
            import logging

            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    import importlib

    # the project root, not tests/ (whose networks/ package would hide the project's)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in PRELOADED:
        importlib.import_module(name)
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    print(json.dumps({"ready": True}), file=answer)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answer.close()
            _child(request)
        print(json.dumps({"pid": pid}), file=answer)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=answer)


if __name__ == "__main__":
    serve()
