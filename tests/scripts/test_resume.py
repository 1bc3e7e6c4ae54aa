"""Exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run,
its TensorBoard steps continue without gap or overlap, and a kill while saving never destroys the
previous checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_in_process, run_script

STEPS = 50  # 20 batches per epoch (80 samples, batch 4): epoch boundaries at steps 20 and 40


def _args(tiny_default: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
            "--train_data_dir", str(tiny_default / "train"), "--resolution", "64", "--train_batch_size", "4",
            "--caption_extension", ".caption", "--shuffle_caption", "--flip_aug", "--output_dir", str(out),
            "--max_train_steps", str(STEPS), "--learning_rate", "2e-3", "--lr_scheduler", "cosine",
            "--seed", "5", "--logging_dir", str(out / "logs"), "--console_log_level", "WARNING", *extra]


@pytest.fixture(scope="module")
def reference(tiny_default, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script("train_network.py", *_args(tiny_default, out), check=True)
    return out


def _start(args: list[str], script: str = "train_network.py") -> subprocess.Popen:
    """A training run in the background (to be killed by :func:`_kill_when`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 1200) -> None:
    """SIGKILL the run as soon as ``ready()`` holds (an observed file); the timeout only guards
    against a hang, so it is generous: a busy machine may take minutes to reach the moment."""
    end = time.time() + timeout
    while time.time() < end:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the kill point")


def _state_steps(out: Path) -> list[int]:
    steps = []
    for folder in out.glob("last-step*-state"):
        if (folder / "train_state.json").is_file():
            steps.append(int(folder.name[len("last-step"):-len("-state")]))
    return steps


def _assert_same_lora(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _loss_curve(out: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = list((out / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss/current")]


def test_sigkill_inside_an_epoch_then_resume_latest(reference, tiny_default, tmp_path):
    kill_at = random.Random().randint(3, 37)
    print(f"killing after the state of step >= {kill_at}")
    out = tmp_path / "killed"
    args = _args(tiny_default, out, "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps_state", "3")
    _kill_when(_start(args), lambda: any(s >= kill_at for s in _state_steps(out)))
    assert not (out / "last.safetensors").exists()
    run_script("train_network.py", *args, "--resume", "latest", check=True)
    _assert_same_lora(reference / "last.safetensors", out / "last.safetensors")
    # kohya's rule for --save_last_n_steps_state 3 with a save every step: steps s-3..s are kept
    assert sorted(_state_steps(out)) == [46, 47, 48, 49]
    curve, ref_curve = _loss_curve(out), _loss_curve(reference)
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))  # no gap, no overlap
    assert curve == ref_curve


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_state_and_says_how_to_resume(sig, reference, tiny_default, tmp_path):
    """SIGINT / SIGTERM: the step in progress ends, the network and a state are saved, the message gives
    the --resume argument, and resuming with it ends bit-identical to the run never stopped."""
    out = tmp_path / "stopped"
    args = _args(tiny_default, out, "--save_every_n_steps", "7")
    proc = _start(args)
    first = out / "last-step00000007.safetensors"
    end = time.time() + 1200  # a hang guard only; the signal waits for the file
    while not first.is_file() and proc.poll() is None and time.time() < end:
        time.sleep(0.02)
    assert first.is_file(), "no save at step 7"
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=1200)[1]
    assert proc.returncode == 128 + int(sig), stderr[-2000:]
    line = next(ln for ln in stderr.splitlines() if ln.startswith("interrupted: "))
    assert f"{sig.name} after step" in line and "continue with --resume " in line
    state = Path(line.split("continue with --resume ", 1)[1].strip())
    assert (state / "train_state.json").is_file() and not (out / "last.safetensors").exists()
    run_script("train_network.py", *args, "--resume", str(state), check=True)
    _assert_same_lora(reference / "last.safetensors", out / "last.safetensors")


def test_sigkill_after_an_epoch_boundary_then_resume_that_state(reference, tiny_default, tmp_path):
    out = tmp_path / "killed"
    # workers this time (the reference run has none): the data does not depend on them
    args = _args(tiny_default, out, "--save_every_n_epochs", "1", "--save_state", "--max_data_loader_n_workers", "2",
                 "--persistent_data_loader_workers")
    boundary = out / "last-000001-state"
    _kill_when(_start(args), lambda: (boundary / "train_state.json").is_file())
    run_script("train_network.py", *args, "--resume", str(boundary), check=True)
    _assert_same_lora(reference / "last.safetensors", out / "last.safetensors")
    assert [s for s, _ in _loss_curve(out)] == list(range(1, STEPS + 1))


_KILL_WHILE_SAVING = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from library.training import state as st
out = Path(sys.argv[2])
net = torch.nn.Linear(3, 3)
opt = torch.optim.AdamW(net.parameters())
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
info = dict(seed=1, num_batches_per_epoch=4, network={"dim": 4})
st.save_state(out / "last-step00000001-state", net, opt, sched, st.TrainState(1, 0, 1, **info))
st.save_state(out / "last-state", net, opt, sched, st.TrainState(2, 0, 2, **info))
real_save = torch.save
def dying_save(obj, f, *a, **k):
    if str(f).endswith("scheduler.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = dying_save
st.save_state(out / "last-state", net, opt, sched, st.TrainState(3, 0, 3, **info))
"""

_KILL_WHILE_WRITING_LORA = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from library.utils import safetensors_io as sio
path = os.path.join(sys.argv[2], "lora.safetensors")
sio.save_safetensors({"w": torch.ones(4)}, path, {"ss_steps": "1"})
def dying_bytes(tensor):  # killed after the header is written, before the tensor's bytes
    os.kill(os.getpid(), signal.SIGKILL)
sio._tensor_bytes = dying_bytes
sio.save_safetensors({"w": torch.zeros(4)}, path, {"ss_steps": "2"})
"""


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    from library.training import state as st

    proc = subprocess.run([sys.executable, "-c", _KILL_WHILE_SAVING, str(ROOT), str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    assert st.read_train_state(tmp_path / "last-state").global_step == 2  # the old one, intact
    assert st.find_latest_state(tmp_path, "last") == tmp_path / "last-state"
    proc = subprocess.run([sys.executable, "-c", _KILL_WHILE_WRITING_LORA, str(ROOT), str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    kept = load_file(str(tmp_path / "lora.safetensors"))
    assert torch.equal(kept["w"], torch.ones(4))


def test_bad_resume_requests(reference, tiny_default, tmp_path):
    incomplete = tmp_path / "last-step00000003-state"
    incomplete.mkdir()
    proc = run_in_process("train_network.py", *_args(tiny_default, tmp_path, "--resume", str(incomplete)))
    assert proc.returncode == 2 and "incomplete state folder" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "states"
    run_script("train_network.py", *_args(tiny_default, out, "--max_train_steps", "2", "--save_state_on_train_end"),
               check=True)
    proc = run_in_process("train_network.py", *_args(tiny_default, out, "--network_dim", "8", "--resume",
                                                 str(out / "last-state")))
    assert proc.returncode == 2 and "another network" in proc.stderr and "dim: state None vs now 8" in proc.stderr
    proc = run_in_process("train_network.py", *_args(tiny_default, tmp_path / "none", "--resume", "latest"))
    assert proc.returncode == 2 and "no complete state folder" in proc.stderr
