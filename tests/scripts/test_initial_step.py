"""kohya's --initial_step / --initial_epoch / --skip_until_initial_step (continuing from a network
file without a state), --save_n_epoch_ratio, and --lr_scheduler given as module.Class.

With a stateless optimizer (plain SGD), a run continued from the file saved at step N with
--skip_until_initial_step ends where the uninterrupted run ends: the same batches, noise and LR
schedule from step N on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import one_image_per_step, run_in_process, run_script

EPOCHS = 4  # 8 batches per epoch (8 images, 1 repeat, batch 1): 32 steps


def _args(tiny_default: Path, out: Path, *extra: str) -> list[str]:
    config = one_image_per_step(tiny_default, out, shuffle_caption=True)
    return ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
            "--dataset_config", str(config), "--output_dir", str(out), "--output_name", "run",
            "--max_train_epochs", str(EPOCHS), "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.05",
            "--lr_scheduler", "torch.optim.lr_scheduler.LinearLR",
            "--lr_scheduler_args", "start_factor=1.0", "end_factor=0.1", "total_iters=32",
            "--seed", "3", "--logging_dir", str(out / "logs"), "--console_log_level", "WARNING", *extra]


def _lr(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = list((out / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("lr/unet")}


@pytest.fixture(scope="module")
def reference(tiny_default, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    run_script("train_network.py", *_args(tiny_default, out, "--save_every_n_steps", "4", "--save_n_epoch_ratio",
                                          "2"), check=True)
    return out


def test_save_n_epoch_ratio_and_the_lr_class(reference):
    names = sorted(p.name for p in reference.glob("run-0*.safetensors"))
    assert names == ["run-000002.safetensors"]  # 4 epochs / ratio 2: every 2 epochs; epoch 4 is the final save
    lr = _lr(reference)
    assert lr[1] == pytest.approx(0.05 * (1 - 0.9 * 1 / 32), rel=1e-5)  # LinearLR after its first step
    assert lr[32] == pytest.approx(0.005, rel=1e-5)


@pytest.mark.parametrize("start", [["--initial_step", "4", "--skip_until_initial_step"], ["--initial_epoch", "3"]])
def test_continuing_from_a_step_file_ends_as_the_whole_run(tiny_default, reference, tmp_path, start):
    step = 4 if start[0] == "--initial_step" else 16
    run_script("train_network.py", *_args(tiny_default, tmp_path, "--network_weights",
                                          str(reference / f"run-step{step:08d}.safetensors"), "--save_every_n_steps",
                                          "8", *start), check=True)
    whole, continued = load_file(str(reference / "run.safetensors")), load_file(str(tmp_path / "run.safetensors"))
    for key, value in whole.items():
        torch.testing.assert_close(continued[key], value, rtol=1e-4, atol=1e-6, msg=key)
    lr_whole, lr_continued = _lr(reference), _lr(tmp_path)
    assert sorted(lr_continued) == list(range(step + 1, 33))  # counting continues: no step 1 again
    for s, value in lr_continued.items():
        assert value == pytest.approx(lr_whole[s], rel=1e-6)  # the schedule continues too (kohya restarts it)
    saved = sorted(p.name for p in tmp_path.glob("run-step*.safetensors"))
    assert saved == [f"run-step{s:08d}.safetensors" for s in range(8, 32, 8) if s > step]


def test_initial_step_checks(tiny_default, tmp_path):
    proc = run_in_process("train_network.py", *_args(tiny_default, tmp_path, "--initial_step", "40"))
    assert proc.returncode == 2 and "--initial_step 40 is at or past the end of the run (32 steps)" in proc.stderr
    proc = run_in_process("train_network.py", *_args(tiny_default, tmp_path, "--skip_until_initial_step"))
    assert proc.returncode == 2 and "--skip_until_initial_step needs --initial_step" in proc.stderr
    proc = run_in_process("train_network.py", *_args(tiny_default, tmp_path, "--lr_scheduler", "cosin"))
    assert proc.returncode == 2 and "'cosin' is not a scheduler (did you mean 'cosine'?)" in proc.stderr
