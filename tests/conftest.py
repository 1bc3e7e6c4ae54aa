"""Shared fixtures: tiny models, the tiny default dataset, and a helper to run scripts.

Nothing here touches the network: HF_HUB_OFFLINE is forced before any Hugging Face import.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)


@pytest.fixture
def tiny_sd1():
    """A fresh tiny SD1-architecture model (random weights, seed 0)."""
    from library.models.tiny import make_tiny_sd1

    return make_tiny_sd1(seed=0)


@pytest.fixture
def tiny_sd2():
    """A fresh tiny SD2-architecture model (OpenCLIP-like text tower, linear projections)."""
    from library.models.tiny import make_tiny_sd2

    return make_tiny_sd2(seed=0)


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory) -> Path:
    """The quickstart's tiny default (model file + tokenizer, dataset, TOML, prompts)."""
    out = tmp_path_factory.mktemp("tiny_default")
    run_script("tools/make_tiny_default.py", "--out", str(out), check=True)
    return out


@pytest.fixture(scope="session")
def tiny_family_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL and SD3 single files, as the quickstart tool writes them."""
    out = {}
    for family in ("sdxl", "sd3"):
        folder = tmp_path_factory.mktemp(f"gen_{family}")
        run_script("tools/make_tiny_default.py", "--out", str(folder), "--family", family, check=True)
        out[family] = next((folder / "model").glob("*.safetensors"))
    return out


class _ScriptServer:
    """The client of tests/script_server.py: scripts run in processes forked from an interpreter
    that has imported torch, diffusers and transformers once (about 7 s saved per run)."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "script_server.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.pending = b""  # read from the server, not yet answered (two answers may arrive in one read)
        assert json.loads(self._answer(600))["ready"]

    def _answer(self, timeout: float) -> str:
        """The server's next line; our own buffer, so that select() never waits on a line already read."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the test script server stopped")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def run(self, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            self.proc.stdin.write((json.dumps({"argv": argv, "cwd": str(ROOT), "env": env, "stdout": str(out),
                                               "stderr": str(err)}) + "\n").encode())
            pid = json.loads(self._answer(60))["pid"]
            try:
                code = json.loads(self._answer(timeout))["code"]
            except TimeoutError:
                os.kill(pid, 9)
                self._answer(60)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            return subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))


_server: _ScriptServer | None = None


def run_script(script: str, *args: str, check: bool = False, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run a project script in a process of its own, offline; returns the completed process. The
    timeout guards against a hang only (a busy machine may be several times slower than CI).

    The process is forked from tests/script_server.py (imports done once); SDTRAIN_TEST_FRESH=1
    runs each script in a fresh interpreter instead."""
    global _server
    # SDTRAIN_TRACEBACK: a failing script's traceback is printed as well as logged, for the test report
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", SDTRAIN_TRACEBACK="1")
    argv = [str(ROOT / script), *args]
    if os.environ.get("SDTRAIN_TEST_FRESH") == "1":
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        if _server is None or _server.proc.poll() is not None:
            _server = _ScriptServer(env)
        proc = _server.run(argv, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def launch_two_processes(script: str, args: list[str], tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    """``accelerate launch`` of a project script on two CPU processes (gloo), as a user runs it;
    fails the test with the end of stderr unless it exits 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true",
               HF_HOME=str(tmp_path / "hf"))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), str(ROOT / script)]
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a project script's ``main`` in this interpreter, as ``run_cli`` runs it from the command
    line (exit codes and the ``error:`` line included); returns what :func:`run_script` returns.

    For runs that stop with an error: a fresh interpreter spends about 7 s importing torch,
    diffusers and transformers, which is most of such a test's time. The state a run leaves in the
    process (accelerate's singleton state, the root logger's handlers) is reset afterwards."""
    import contextlib
    import importlib
    import io
    import logging

    from accelerate.state import AcceleratorState

    from library.utils.errors import run_cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(importlib.import_module(script.removesuffix(".py").replace("/", ".")).main, list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def one_image_per_step(tiny_default: Path, out: Path, **subset_options) -> Path:
    """A dataset TOML of the tiny default's 8 training images, once each, batch 1 (8 steps an
    epoch); written into ``out``."""
    import toml

    out.mkdir(parents=True, exist_ok=True)
    subset = {"image_dir": str(tiny_default / "train" / "10_sks shape"), "num_repeats": 1, **subset_options}
    config = out / "dataset.toml"
    config.write_text(toml.dumps({"general": {"caption_extension": ".caption"},
                                  "datasets": [{"resolution": 64, "batch_size": 1, "subsets": [subset]}]}))
    return config


def tiny_train_args(tiny_default: Path, out: Path, *extra: str) -> list[str]:
    """train_network.py arguments for a short run on the tiny default."""
    return ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
            "--dataset_config", str(tiny_default / "dataset.toml"), "--output_dir", str(out),
            "--seed", "1", "--console_log_level", "WARNING", *extra]


def part(state: dict, prefix: str) -> dict:
    """The tensors of a state dict whose keys start with ``prefix`` (one part of a checkpoint)."""
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def same_tensors(a: dict, b: dict) -> bool:
    """Same keys and every tensor bit-identical."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's (sshs_model_hash, sshs_legacy_hash) of ``tensors``, computed the way kohya's
    precalculate_safetensors_hashes does: on safetensors' own in-memory serialisation carrying only
    the ``ss_*`` metadata (the independent reference for our streaming writer)."""
    import hashlib
    import struct

    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_len:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def assert_own_hashes(path) -> None:
    """A safetensors file's sshs hashes are its own: the model hash is the SHA-256 of its data
    section (AUTOMATIC1111's definition, from the file's bytes), the legacy hash kohya's."""
    import hashlib
    import struct

    from safetensors import safe_open
    from safetensors.torch import load_file

    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest(), path
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(load_file(str(path)), meta), path
