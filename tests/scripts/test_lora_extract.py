"""networks/extract_lora_from_models.py recovers a known low-rank difference between two checkpoints
(SD1 and SD3, text encoders left out when unchanged), and networks/svd_merge_lora.py factors the
summed updates: one LoRA at its own rank is reproduced, two at the sum of their ranks exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from library.models.sd3_loading import save_sd3_single_file
from library.models.sd_loading import save_sd_single_file
from library.models.tiny import make_tiny_sd3
from library.utils.errors import UserError
from networks import extract_lora_from_models, lora, svd_merge_lora
from networks.lora_merge import lora_modules, update_of


def _low_rank(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(out_features, 2, generator=g) @ torch.randn(2, in_features, generator=g)


def test_extract_recovers_a_low_rank_difference(tmp_path, tiny_sd1):
    save_sd_single_file(tmp_path / "org.safetensors", tiny_sd1)
    tuned = copy.deepcopy(tiny_sd1)
    q = tuned.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    fc1 = tuned.text_encoder.text_model.encoder.layers[1].mlp.fc1 if hasattr(tuned.text_encoder, "text_model") \
        else tuned.text_encoder.encoder.layers[1].mlp.fc1
    deltas = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": _low_rank(*q.weight.shape, 1),
              "lora_te_text_model_encoder_layers_1_mlp_fc1": _low_rank(*fc1.weight.shape, 2)}
    with torch.no_grad():
        q.weight += deltas["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
        fc1.weight += deltas["lora_te_text_model_encoder_layers_1_mlp_fc1"]
    save_sd_single_file(tmp_path / "tuned.safetensors", tuned)
    extract_lora_from_models.main(["--model_org", str(tmp_path / "org.safetensors"), "--model_tuned",
                                   str(tmp_path / "tuned.safetensors"), "--save_to", str(tmp_path / "x.safetensors"),
                                   "--dim", "4", "--clamp_quantile", "1"])
    modules = lora_modules(load_file(str(tmp_path / "x.safetensors")), "x")
    for name, delta in deltas.items():
        got = update_of(*modules[name])
        error = float((got - delta).norm() / delta.norm())
        print(f"{name}: relative error {error:.2e}")
        assert error < 1e-4
    others = [update_of(*v).abs().max() for n, v in modules.items() if n not in deltas]
    assert max(others) < 1e-5  # unchanged modules: no update


def test_extract_on_sd3_and_unchanged_text_encoders(tmp_path):
    parts = make_tiny_sd3(seed=0)
    save_sd3_single_file(tmp_path / "org.safetensors", parts)
    qkv = parts.transformer.transformer_blocks[0].attn
    delta = _low_rank(3 * qkv.to_q.weight.shape[0], qkv.to_q.weight.shape[1], 3)
    with torch.no_grad():
        for layer, rows in zip((qkv.to_q, qkv.to_k, qkv.to_v), delta.chunk(3)):
            layer.weight += rows
    save_sd3_single_file(tmp_path / "tuned.safetensors", parts)
    extract_lora_from_models.main(["--model_org", str(tmp_path / "org.safetensors"), "--model_tuned",
                                   str(tmp_path / "tuned.safetensors"), "--save_to", str(tmp_path / "x.safetensors"),
                                   "--dim", "2", "--clamp_quantile", "1"])
    modules = lora_modules(load_file(str(tmp_path / "x.safetensors")), "x")
    assert not any(n.startswith("lora_te") for n in modules)  # all three encoders unchanged: left out
    got = update_of(*modules["lora_unet_joint_blocks_0_x_block_attn_qkv"])
    assert float((got - delta).norm() / delta.norm()) < 1e-4  # kohya's fused qkv layout, rows q, k, v


def test_extract_bad_input(tmp_path, tiny_sd1):
    save_sd_single_file(tmp_path / "sd1.safetensors", tiny_sd1)
    save_sd3_single_file(tmp_path / "sd3.safetensors", make_tiny_sd3(seed=0))
    with pytest.raises(UserError, match="--model_org is an SD1.x checkpoint, --model_tuned an SD3 one"):
        extract_lora_from_models.main(["--model_org", str(tmp_path / "sd1.safetensors"), "--model_tuned",
                                       str(tmp_path / "sd3.safetensors"), "--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(UserError, match="--sdxl was given but the checkpoints are SD1.x"):
        extract_lora_from_models.main(["--model_org", str(tmp_path / "sd1.safetensors"), "--model_tuned",
                                       str(tmp_path / "sd1.safetensors"), "--save_to", str(tmp_path / "x.safetensors"),
                                       "--sdxl"])


def _lora(path, tiny, dim, seed):
    net = lora.create_network(1.0, dim, dim / 2, None, tiny.text_encoder, tiny.unet)
    torch.manual_seed(seed)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    net.save_weights(str(path), None, {})
    return lora_modules(load_file(str(path)), str(path))


def test_svd_merge(tmp_path, tiny_sd1):
    a = _lora(tmp_path / "a.safetensors", tiny_sd1, 4, 1)
    b = _lora(tmp_path / "b.safetensors", tiny_sd1, 2, 2)
    svd_merge_lora.main(["--models", str(tmp_path / "a.safetensors"), "--ratios", "0.6", "--new_rank", "4",
                         "--save_to", str(tmp_path / "a4.safetensors")])
    a4 = lora_modules(load_file(str(tmp_path / "a4.safetensors")), "a4")
    for name, value in a.items():
        torch.testing.assert_close(update_of(*a4[name]), 0.6 * update_of(*value), rtol=1e-4, atol=1e-6)
    svd_merge_lora.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--ratios", "1",
                         "-1", "--new_rank", "6", "--save_to", str(tmp_path / "ab.safetensors")])
    ab = lora_modules(load_file(str(tmp_path / "ab.safetensors")), "ab")
    for name in a:
        expected = update_of(*a[name]) - update_of(*b[name])
        torch.testing.assert_close(update_of(*ab[name]), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="--ratios: 1 values for 2 --models"):
        svd_merge_lora.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--ratios",
                             "1", "--save_to", str(tmp_path / "x.safetensors")])
