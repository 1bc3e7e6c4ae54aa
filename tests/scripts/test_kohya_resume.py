"""--resume with a state folder in kohya's layout (accelerate's model.safetensors / optimizer.bin /
scheduler.bin / random_states_0.pkl + train_state.json with current_epoch and current_step): the
run continues at its step with its network and optimizer state and ends where the whole run ends;
a network that does not fit is refused, an optimizer state of another layout is left out with a
warning."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.training import kohya_state
from library.utils.errors import UserError
from tests.conftest import one_image_per_step, run_script


def _args(tiny_default: Path, out: Path, *extra: str) -> list[str]:
    config = one_image_per_step(tiny_default, out, flip_aug=True)
    return ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
            "--dataset_config", str(config), "--output_dir", str(out), "--output_name", "run",
            "--max_train_steps", "12", "--learning_rate", "2e-3", "--lr_scheduler", "cosine", "--seed", "4",
            "--console_log_level", "INFO", *extra]


def as_kohya_state(ours: Path, folder: Path, step: int, epoch: int) -> Path:
    """Our state folder rewritten in kohya's (accelerate's) layout."""
    folder.mkdir()
    shutil.copy(ours / "network.safetensors", folder / "model.safetensors")
    shutil.copy(ours / "optimizer.pt", folder / "optimizer.bin")
    shutil.copy(ours / "scheduler.pt", folder / "scheduler.bin")
    (folder / "random_states_0.pkl").write_bytes(pickle.dumps({"step": 0}))
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch, "current_step": step}))
    return folder


@pytest.fixture(scope="module")
def whole(tiny_default, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole_kohya")
    run_script("train_network.py", *_args(tiny_default, out, "--save_every_n_steps", "5", "--save_state"), check=True)
    return out


def test_a_kohya_state_continues_to_the_same_end(tiny_default, whole, tmp_path):
    kohya = as_kohya_state(whole / "run-step00000005-state", tmp_path / "kohya-state", step=5, epoch=1)
    proc = run_script("train_network.py", *_args(tiny_default, tmp_path / "out", "--resume", str(kohya)), check=True)
    assert "resuming from kohya's state folder" in proc.stderr
    assert "network weights and optimizer state loaded" in proc.stderr
    assert "starting at step 5 (epoch 1, batch 6 of it)" in proc.stderr
    end, resumed = load_file(str(whole / "run.safetensors")), load_file(str(tmp_path / "out" / "run.safetensors"))
    for key, value in end.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert sorted(p.name for p in kohya.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                                       "scheduler.bin", "train_state.json"]  # nothing written there


def test_a_network_that_does_not_fit_is_refused(whole, tmp_path):
    kohya = kohya_state.read_kohya_state(as_kohya_state(whole / "run-step00000005-state", tmp_path / "k", 5, 1))
    weights = load_file(str(kohya.folder / "model.safetensors"))
    name = next(k for k in weights if k.endswith("lora_down.weight"))
    net = torch.nn.Module()
    net.register_buffer("other", torch.zeros(1))
    with pytest.raises(UserError, match=r"the state's network does not match this one \(1 of this network's tensors "
                                        r"are not in it, e.g. \['other'\]; \d+ of its tensors are not in this"):
        kohya_state.load_network(kohya, net)
    (kohya.folder / "train_state.json").write_text(json.dumps({"current_step": "five"}))
    with pytest.raises(UserError, match="train_state.json has no usable current_step"):
        kohya_state.read_kohya_state(kohya.folder)
    assert name  # the file holds kohya-named LoRA tensors


def test_an_optimizer_state_of_another_layout_is_left_out(tmp_path, caplog):
    folder = tmp_path / "k"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 3}))
    params = [torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))])
    torch.save(other.state_dict(), folder / "optimizer.bin")
    state = kohya_state.read_kohya_state(folder)
    assert state.global_step == 3 and not kohya_state.load_optimizer(state, optimizer)
    assert "optimizer state not used (1 parameter groups, this run has 2)" in caplog.text
    swapped = torch.optim.AdamW([{"params": params[1:]}, {"params": params[:1]}])
    for p in params:
        p.grad = torch.ones_like(p)
    swapped.step()
    torch.save(swapped.state_dict(), folder / "optimizer.bin")
    assert not kohya_state.load_optimizer(state, optimizer)
    assert "a state tensor of shape (3,) for a parameter of shape (4, 2)" in caplog.text
