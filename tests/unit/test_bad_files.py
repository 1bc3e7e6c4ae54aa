"""Files that are damaged or unsafe are named with what to do, never a library's traceback; the last
guard turns any unexpected exception into one line plus a log file with the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from library.training import state as train_state
from library.utils.errors import UserError
from networks import lora
from networks.lora_merge import read_lora
from tests.conftest import ROOT


class NotATensor:  # anything a safe (weights-only) load refuses to build
    pass


def test_unsafe_and_damaged_lora_files(tmp_path, tiny_sd1):
    evil = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": NotATensor()}, evil)
    with pytest.raises(UserError, match="evil.pt: this pickle holds more than tensors and could run code"):
        read_lora(str(evil), "--network_weights")
    whole = tmp_path / "whole.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(UserError, match="cut.safetensors: cannot be read as a LoRA file .*is it complete"):
        lora.create_network_from_weights(1.0, str(cut), None, tiny_sd1.text_encoder, tiny_sd1.unet)


def test_a_damaged_state_file_is_named(tmp_path):
    net = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = tmp_path / "last-state"
    train_state.save_state(folder, net, opt, sched, train_state.TrainState(1, 0, 1, 1, 4, {"dim": 4}))
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="last-state: optimizer.pt is damaged .*resume from an earlier state"):
        train_state.load_state(folder, net, opt, sched)


def test_the_last_guard_prints_one_line_and_logs_the_traceback(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import sys\nsys.path.insert(0, sys.argv[1])\nfrom library.utils.errors import run_cli\n"
                      "def main(argv):\n    raise RuntimeError('boom')\nrun_cli(main)\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "SDTRAIN_TRACEBACK"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected RuntimeError at crash.py:5: boom")
    assert "Traceback" not in proc.stderr
    log = lines[0].split("the full traceback is in ", 1)[1].split(";", 1)[0]
    assert "Traceback" in open(log, encoding="utf-8").read()
