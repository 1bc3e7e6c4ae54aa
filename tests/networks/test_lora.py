"""networks.lora: kohya key format, maths, and loading by diffusers' load_lora_weights."""

import logging

import pytest
import torch
from safetensors import safe_open

from library.utils.errors import UserError
from networks import lora


def _inputs(tiny):
    torch.manual_seed(123)
    ids = tiny.tokenizer(["sks shape, red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return torch.randn(1, 4, 8, 8), torch.tensor([400]), ids


def _outputs(tiny, x, t, ids):
    with torch.no_grad():
        hidden = tiny.text_encoder(ids).last_hidden_state
        return hidden, tiny.unet(x, t, hidden).sample


def _randomise_up(net, std=0.3):
    torch.manual_seed(7)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=std)


def test_targets_and_key_format(tiny_sd1):
    net = lora.create_network(1.0, 4, 2, tiny_sd1.vae, tiny_sd1.text_encoder, tiny_sd1.unet)
    names = {m.lora_name for m in net.all_loras()}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names
    assert len(net.text_encoder_loras) == 2 * 6  # q, k, v, out_proj, fc1, fc2 per layer
    assert not any("resnets" in n for n in names)  # 3x3 convs only with conv_dim
    keys = set(net.state_dict())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    conv = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_dim="2", conv_alpha="1")
    c = next(m for m in conv.unet_loras if m.lora_name == "lora_unet_down_blocks_0_resnets_0_conv1")
    assert c.lora_down.weight.shape == (2, 32, 3, 3) and c.lora_up.weight.shape == (32, 2, 1, 1) and c.scale == 0.5


def test_starts_at_identity_and_scales(tiny_sd1):
    x, t, ids = _inputs(tiny_sd1)
    base = _outputs(tiny_sd1, x, t, ids)
    net = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    net.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet)
    assert all(m.scale == 0.5 for m in net.all_loras())
    hooked = _outputs(tiny_sd1, x, t, ids)
    assert torch.equal(base[1], hooked[1])  # up is zero-initialised
    _randomise_up(net)
    changed = _outputs(tiny_sd1, x, t, ids)
    assert (changed[1] - base[1]).abs().max() > 1e-2
    net.set_multiplier(0.0)
    assert torch.equal(_outputs(tiny_sd1, x, t, ids)[1], base[1])


def _merge_by_hand(model, network_state, prefix_map):
    """W + (alpha / dim) * up @ down for every LoRA in the file, on a copy of ``model``'s weights."""
    modules = dict(model.named_modules())
    names = {k.split(".")[0] for k in network_state}
    for name in names:
        for prefix, to_path in prefix_map:
            if name.startswith(prefix):
                target = modules[to_path(name[len(prefix):])]
                break
        else:
            continue
        up, down = network_state[f"{name}.lora_up.weight"], network_state[f"{name}.lora_down.weight"]
        scale = network_state[f"{name}.alpha"].item() / down.shape[0]
        delta = up.flatten(1) @ down.flatten(1)
        target.weight.data += scale * delta.reshape(target.weight.shape)


def _path_resolver(model):
    lookup = {path.replace(".", "_"): path for path, _ in model.named_modules()}
    return lambda flat: lookup[flat]


def test_diffusers_load_lora_weights_equals_hand_merge(tmp_path, tiny_sd1, caplog):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from library.models.tiny import make_tiny_sd1

    x, t, ids = _inputs(tiny_sd1)
    net = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_dim="4", conv_alpha="1")
    net.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet)
    _randomise_up(net)
    ours = _outputs(tiny_sd1, x, t, ids)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_dim": "4"})
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8

    # independent reference: merge W + scale * up @ down into a fresh copy of the base weights
    ref = make_tiny_sd1(seed=0)
    te_res, unet_res = _path_resolver(ref.text_encoder), _path_resolver(ref.unet)
    _merge_by_hand(ref.text_encoder, state, [("lora_te_text_model_", te_res)])
    _merge_by_hand(ref.unet, state, [("lora_unet_", unet_res)])
    merged = _outputs(ref, x, t, ids)

    base = make_tiny_sd1(seed=0)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "not correctly renamed" in r.getMessage()]
    n_wrapped = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
    n_wrapped_te = sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A"))
    assert n_wrapped == len(net.unet_loras) and n_wrapped_te == len(net.text_encoder_loras)  # every key consumed
    diffusers_out = _outputs(pipe, x, t, ids)
    base_out = _outputs(make_tiny_sd1(seed=0), x, t, ids)
    for a, b, c, what in zip(ours, merged, diffusers_out, ("text encoder", "unet")):
        scale = b.abs().max()
        assert (a - b).abs().max() / scale < 1e-5, what
        assert (c - b).abs().max() / scale < 1e-5, what
    assert (ours[1] - base_out[1]).abs().max() / base_out[1].abs().max() > 0.05  # the LoRA matters


def test_round_trip_and_from_weights(tmp_path, tiny_sd1):
    net = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    _randomise_up(net)
    path = tmp_path / "l.safetensors"
    net.save_weights(str(path), torch.float16, None)
    net2 = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    net2.load_weights(str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(net2.state_dict()[k], v.half().float())
    net3, sd = lora.create_network_from_weights(1.0, str(path), None, tiny_sd1.text_encoder, tiny_sd1.unet)
    net3.load_state_dict(sd)
    assert set(net3.state_dict()) == set(net.state_dict())


def test_bad_args(tiny_sd1, tmp_path):
    with pytest.raises(UserError, match="unknown key"):
        lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_dims="4")
    net = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_nothing.lora_down.weight": torch.zeros(1, 1)}, str(other))
    with pytest.raises(UserError, match="none of its keys match"):
        net.load_weights(str(other))


def test_apply_to_parts(tiny_sd1):
    te_only = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    te_only.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet, apply_text_encoder=True, apply_unet=False)
    assert te_only.state_dict() and all(k.startswith("lora_te_") for k in te_only.state_dict())
    groups, names = te_only.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert names == ["textencoder"] and groups[0]["lr"] == 5e-5


def test_weights_of_another_rank_are_refused_with_the_reason(tmp_path, tiny_sd1):
    wide = lora.create_network(1.0, 8, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    wide.save_weights(str(tmp_path / "rank8.safetensors"), torch.float32, {})
    narrow = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    with pytest.raises(UserError, match="rank8.safetensors: its tensors do not fit this network"):
        narrow.load_weights(str(tmp_path / "rank8.safetensors"))
