"""networks/resize_lora.py (SVD re-rank: its own rank reproduces the LoRA, a lower one is the best
approximation numpy's SVD gives, dynamic ranks keep the share asked), networks/check_lora_weights.py
and tools/show_metadata.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.utils.errors import UserError
from networks import check_lora_weights, lora, resize_lora
from networks.lora_merge import lora_modules, update_of
from networks.lora_resize import choose_rank
from tests.conftest import kohya_hashes
from tools import show_metadata


@pytest.fixture
def lora_file(tmp_path, tiny_sd1):
    net = lora.create_network(1.0, 8, 4, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_dim="4", conv_alpha="2")
    torch.manual_seed(0)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    net.unet_loras[0].lora_up.weight.data.zero_()  # one untrained module
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "networks.lora", "ss_network_dim": "8",
                                       "ss_tag_frequency": json.dumps({"10_sks": {"sks": 8}})})
    return path


def test_resize_to_its_own_rank_reproduces_it(lora_file, tmp_path):
    resize_lora.main(["--model", str(lora_file), "--save_to", str(tmp_path / "same.safetensors"), "--new_rank", "8",
                      "--new_conv_rank", "4"])
    before = lora_modules(load_file(str(lora_file)), "before")
    after = lora_modules(load_file(str(tmp_path / "same.safetensors")), "after")
    for name, value in before.items():
        torch.testing.assert_close(update_of(*after[name]), update_of(*value), rtol=1e-4, atol=1e-6)


def test_a_lower_rank_is_the_best_approximation(lora_file, tmp_path):
    resize_lora.main(["--model", str(lora_file), "--save_to", str(tmp_path / "r2.safetensors"), "--new_rank", "2"])
    before = lora_modules(load_file(str(lora_file)), "before")
    after = lora_modules(load_file(str(tmp_path / "r2.safetensors")), "after")
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up, alpha = after[name]
    assert down.shape[0] == 2 and alpha == pytest.approx(4 / 8 * 2)  # the scale alpha / rank is kept
    full = update_of(*before[name]).double().numpy()
    u, s, vt = np.linalg.svd(full)  # numpy's SVD as the reference
    best = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(update_of(*after[name]).double().numpy(), best, rtol=1e-4, atol=1e-6)
    with safe_open(str(tmp_path / "r2.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and "resized to rank 2 from lora.safetensors" in meta["ss_training_comment"]
    hashes = kohya_hashes(load_file(str(tmp_path / "r2.safetensors")), meta)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == hashes


def test_dynamic_resize_keeps_the_share_asked(lora_file, tmp_path, capsys):
    resize_lora.main(["--model", str(lora_file), "--save_to", str(tmp_path / "dyn.safetensors"), "--new_rank", "8",
                      "--dynamic_method", "sv_fro", "--dynamic_param", "0.8", "--verbose"])
    out = capsys.readouterr().out
    before = lora_modules(load_file(str(lora_file)), "before")
    after = lora_modules(load_file(str(tmp_path / "dyn.safetensors")), "after")
    ranks = set()
    for name, value in before.items():
        full, approx = update_of(*value), update_of(*after[name])
        if full.abs().max() == 0:
            continue
        kept = 1 - ((full - approx).norm() / full.norm()) ** 2  # share of the squared norm kept, by Pythagoras
        assert kept.sqrt() >= 0.8 - 1e-4
        ranks.add(after[name][0].shape[0])
        assert f"{name}: rank {value[0].shape[0]} -> {after[name][0].shape[0]}, Frobenius norm kept" in out
    assert len(ranks) > 1
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    assert choose_rank(s, 8, "sv_ratio", 3.0) == 2 and choose_rank(s, 8, "sv_cumulative", 0.8) == 2
    assert choose_rank(s, 1, "sv_fro", 0.99) == 1


def test_resize_bad_input(lora_file, tmp_path):
    with pytest.raises(UserError, match="--new_rank 16 is above the file's rank 8"):
        resize_lora.main(["--model", str(lora_file), "--save_to", str(tmp_path / "x.safetensors"), "--new_rank", "16"])
    with pytest.raises(UserError, match="is the input file"):
        resize_lora.main(["--model", str(lora_file), "--save_to", str(lora_file), "--new_rank", "2"])
    with pytest.raises(UserError, match="--dynamic_method sv_fro needs --dynamic_param"):
        resize_lora.main(["--model", str(lora_file), "--save_to", str(tmp_path / "x.safetensors"), "--new_rank", "2",
                          "--dynamic_method", "sv_fro"])


def test_check_lora_weights_and_show_metadata(lora_file, capsys):
    lines = check_lora_weights.summary_lines(str(lora_file), show_all=True)
    assert lines[0].startswith(f"{lora_file}: a SD1.x/2.x LoRA with ") and "rank 4, 8" in lines[0]
    assert "1 module(s) with a zero update" in lines[2]
    assert any(line.strip().startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj: down (8, 32) up (32, 8)")
               for line in lines)
    show_metadata.main(["--model", str(lora_file)])
    shown = json.loads(capsys.readouterr().out)
    assert shown["ss_tag_frequency"] == {"10_sks": {"sks": 8}} and shown["ss_network_dim"] == "8"
    pickle = lora_file.with_suffix(".pt")
    pickle.touch()
    with pytest.raises(UserError, match="only .safetensors files carry metadata"):
        show_metadata.main(["--model", str(pickle)])


def _addnet_hash(path) -> str:
    """AUTOMATIC1111's hash of a LoRA: SHA-256 of the bytes after the safetensors header."""
    import hashlib
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_written_files_carry_the_hash_automatic1111_computes(lora_file, tmp_path):
    from networks import merge_lora, svd_merge_lora

    outputs = {"resize": tmp_path / "r.safetensors", "merge": tmp_path / "m.safetensors",
               "svd": tmp_path / "s.safetensors"}
    resize_lora.main(["--model", str(lora_file), "--save_to", str(outputs["resize"]), "--new_rank", "3"])
    merge_lora.main(["--models", str(lora_file), "--ratios", "0.5", "--save_to", str(outputs["merge"])])
    svd_merge_lora.main(["--models", str(lora_file), "--new_rank", "2", "--save_to", str(outputs["svd"])])
    for what, path in [("input", lora_file), *outputs.items()]:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["sshs_model_hash"] == _addnet_hash(path), what
