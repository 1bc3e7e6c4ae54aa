"""kohya's LoRA training options: neuron / rank / module dropout (training mode only, reproducible with
the seed), max-norm regularisation (--scale_weight_norms), per-block ranks (block_dims & co.) and
networks built from a file's ranks (--dim_from_weights)."""

from __future__ import annotations

import pytest
import torch

from library.models.tiny import make_tiny_sd3, make_tiny_sdxl
from library.utils.errors import UserError
from networks import lora, lora_sd3
from networks.block_lr import block_count, block_index
from networks.lora_modules import Dropouts, FusedLoRAModule, LoRAModule, drop_down_output


def _lora_on_linear(dropouts: Dropouts | None) -> tuple[torch.nn.Linear, LoRAModule]:
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    module = LoRAModule("lora_test", base, 1.0, 4, 4)
    torch.nn.init.normal_(module.lora_up.weight)
    module.dropouts = dropouts
    module.apply_to()
    return base, module


def test_dropout_acts_only_in_training_and_repeats_with_the_seed():
    base, module = _lora_on_linear(Dropouts(neuron=0.5, rank=0.25, module=0.1))
    x = torch.randn(3, 5, 8)
    module.eval()
    eval_out = base(x)
    chosen, module.dropouts = module.dropouts, None
    assert torch.equal(base(x), eval_out)  # eval mode: exactly the network without dropout
    module.dropouts = chosen
    module.train()
    torch.manual_seed(5)
    first = base(x)
    torch.manual_seed(5)
    again = base(x)
    torch.manual_seed(6)
    other = base(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.allclose(first, eval_out)


def test_rank_dropout_masks_whole_ranks_per_sample_and_rescales():
    torch.manual_seed(1)
    down = torch.ones(64, 7, 10)  # (batch, tokens, rank)
    dropped, scale = drop_down_output(down, 0.5, Dropouts(rank=0.25), training=True)
    assert scale == pytest.approx(0.5 / 0.75)
    per_rank = dropped[:, 0, :]
    assert torch.equal(dropped, per_rank[:, None, :].expand_as(dropped))  # the same for every token
    assert set(per_rank.unique().tolist()) <= {0.0, 1.0}
    assert 0.65 < per_rank.mean().item() < 0.85  # about 1 - p kept
    conv = torch.ones(32, 10, 3, 3)  # (batch, rank, h, w): the rank is dim 1
    dropped, _ = drop_down_output(conv, 1.0, Dropouts(rank=0.5), training=True)
    assert torch.equal(dropped, dropped[:, :, :1, :1].expand_as(dropped))
    assert torch.equal(drop_down_output(conv, 1.0, Dropouts(rank=0.5), training=False)[0], conv)


def test_module_dropout_leaves_the_whole_update_out():
    base, module = _lora_on_linear(Dropouts(module=0.5))
    x = torch.randn(2, 8)
    module.remove()
    without = base(x)
    module.apply_to()
    module.train()
    torch.manual_seed(3)
    outs = [base(x) for _ in range(200)]
    skipped = sum(torch.equal(o, without) for o in outs)
    assert 70 < skipped < 130
    assert all(torch.equal(o, without) or not torch.allclose(o, without) for o in outs)


def test_fused_qkv_share_one_draw():
    """SD3's q, k and v read the same input and are one matrix in the file: one dropout draw for all."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    fused = FusedLoRAModule("lora_qkv", layers, 1.0, 4, 4)
    torch.nn.init.normal_(fused.lora_up.weight)
    fused.dropouts = Dropouts(module=0.5, rank=0.5)
    x = torch.randn(4, 8)
    bases = [layer(x) for layer in layers]
    fused.apply_to()
    fused.train()
    torch.manual_seed(9)
    for _ in range(30):
        h = x.clone()  # a new input each call, as in a forward pass
        deltas = [layer(h) - b for layer, b in zip(layers, bases)]
        skipped = [bool(d.abs().max() == 0) for d in deltas]
        assert len(set(skipped)) == 1
        if not skipped[0]:  # the same ranks dropped: every delta is up_i @ (the one masked down output)
            masked, scale = fused._shared[1], fused._shared[2]
            assert scale == pytest.approx(2.0) and (masked == 0).any()
            for d, u in zip(deltas, fused.lora_up.weight.split(fused.splits)):
                torch.testing.assert_close(d, torch.nn.functional.linear(masked, u) * scale, rtol=1e-4, atol=1e-5)


def test_network_dropout_flags_reach_every_module(tiny_sd1):
    net = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, neuron_dropout=0.1,
                              rank_dropout="0.2", module_dropout="0.05")
    assert {m.dropouts for m in net.all_loras()} == {Dropouts(0.1, 0.2, 0.05)}
    arg_only = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, dropout="0.3")
    assert arg_only.unet_loras[0].dropouts == Dropouts(neuron=0.3)
    parts = make_tiny_sd3(seed=0)
    sd3 = lora_sd3.create_network(1.0, 4, 1, None, [parts.clip_l, parts.clip_g, parts.t5xxl], parts.transformer,
                                  neuron_dropout=0.1, rank_dropout="0.2")
    assert {m.dropouts for m in sd3.all_loras()} == {Dropouts(0.1, 0.2, None)}
    with pytest.raises(UserError, match="rank_dropout 1.5: a dropout probability"):
        lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, rank_dropout="1.5")


def test_max_norm_caps_each_update_norm(tiny_sd1):
    net = lora.create_network(1.0, 4, 4, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    torch.manual_seed(2)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.05 if "te_" in m.lora_name else 1.0)
    before = {m.lora_name: m.delta_weight().norm().item() for m in net.all_loras()}
    limit = sorted(before.values())[len(before) // 2]
    scaled, mean, largest = net.apply_max_norm_regularization(limit, "cpu")
    after = {m.lora_name: m.delta_weight().norm().item() for m in net.all_loras()}
    assert scaled == sum(v > limit for v in before.values()) and 0 < scaled < len(before)
    for name, norm in after.items():
        assert norm == pytest.approx(min(before[name], limit), rel=1e-4)
    assert largest == pytest.approx(limit, rel=1e-4)
    assert mean == pytest.approx(sum(after.values()) / len(after), rel=1e-4)


def test_block_dims_give_the_ranks_asked_per_block(tiny_sd1):
    n = block_count(False)
    dims = [(i % 4) + 1 for i in range(n)]
    dims[4] = 0  # no LoRA in IN04
    alphas = [float(i) / 2 + 0.5 for i in range(n)]
    conv_dims = [2] * n
    args = {"block_dims": ",".join(map(str, dims)), "block_alphas": ",".join(map(str, alphas)),
            "conv_block_dims": ",".join(map(str, conv_dims))}
    net = lora.create_network(1.0, 8, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_alpha="1", **args)
    seen = set()
    for m in net.unet_loras:
        index = block_index(m.lora_name, False)
        rank = m.lora_down.weight.shape[0]
        is_conv3 = m.lora_down.weight.ndim == 4 and m.lora_down.weight.shape[2:] == (3, 3)
        assert rank == (conv_dims[index] if is_conv3 else dims[index]), m.lora_name
        assert float(m.alpha) == (1.0 if is_conv3 else alphas[index])
        seen.add(index)
    assert 4 not in {block_index(m.lora_name, False) for m in net.unet_loras if m.lora_down.weight.ndim == 2}
    assert len(seen) > 5
    assert all(m.lora_down.weight.shape[0] == 8 for m in net.text_encoder_loras)  # text encoders: --network_dim


def test_block_dims_on_sdxl_and_wrong_lengths(tiny_sd1):
    parts = make_tiny_sdxl(seed=0)
    dims = list(range(1, 24))
    net = lora.create_network(1.0, 4, 1, None, [parts.text_encoder_1, parts.text_encoder_2], parts.unet,
                              block_dims=",".join(map(str, dims)))
    for m in net.unet_loras:
        assert m.lora_down.weight.shape[0] == dims[block_index(m.lora_name, True)], m.lora_name
    with pytest.raises(UserError, match="block_dims: 23 values given; this model has 25 blocks"):
        lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, block_dims=",".join(["2"] * 23))
    with pytest.raises(UserError, match="block_alphas needs block_dims"):
        lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, block_alphas="1,1")
    with pytest.raises(UserError, match="conv_block_dims=a,b: expected 25 comma-separated integers"):
        lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_block_dims="a,b")


def test_network_from_a_files_ranks_keeps_its_shape_and_takes_training_options(tiny_sd1, tmp_path):
    dims = ",".join(str((i % 3) + 1) for i in range(25))
    source = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, block_dims=dims, conv_dim="2")
    file = tmp_path / "src.safetensors"
    source.save_weights(str(file), None, {})
    rebuilt, _ = lora.create_network_from_weights(1.0, str(file), None, tiny_sd1.text_encoder, tiny_sd1.unet,
                                                  neuron_dropout=0.2, loraplus_lr_ratio="4", block_dims="ignored")
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in source.state_dict().items()}
    assert rebuilt.unet_loras[0].dropouts == Dropouts(neuron=0.2) and rebuilt.loraplus["unet"] == 4.0
    inference, _ = lora.create_network_from_weights(1.0, str(file), None, tiny_sd1.text_encoder, tiny_sd1.unet,
                                                    for_inference=True)
    assert inference.unet_loras[0].dropouts is None
