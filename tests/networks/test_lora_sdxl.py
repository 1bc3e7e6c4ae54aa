"""networks.lora on SDXL: kohya's SGM names, diffusers' load_lora_weights consuming every key with the
same outputs as a merge into the original-layout weights, and diffusers/PEFT-named files read back."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from library.models import sd_keys
from library.models.tiny import make_tiny_sdxl
from networks import lora


def _inputs(parts):
    torch.manual_seed(123)
    ids = parts.tokenizer_1(["sks shape, red circle"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    ids2 = parts.tokenizer_2(["sks shape, red circle"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    sizes = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    return torch.randn(1, 4, 8, 8), torch.tensor([400]), ids, ids2, sizes


def _outputs(te1, te2, unet, inputs):
    """Both encoders' penultimate states, the pooled projection, and the UNet's prediction."""
    x, t, ids, ids2, sizes = inputs
    with torch.no_grad():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2.text_embeds
        pred = unet(x, t, torch.cat([h1, h2], -1), added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
    return h1, h2, pooled, pred


def _trained_network(parts, alpha=2.0):
    net = lora.create_network(1.0, 4, alpha, None, [parts.text_encoder_1, parts.text_encoder_2], parts.unet,
                              conv_dim="4", conv_alpha=str(alpha))
    net.apply_to([parts.text_encoder_1, parts.text_encoder_2], parts.unet)
    torch.manual_seed(7)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.3)
    return net


def _merged_in_original_layout(state):
    """The reference: add scale * up @ down to the tensors of the original (SGM) single-file layout
    that the kohya names point at, as ComfyUI and A1111 do, then convert that layout to diffusers
    with diffusers' own converter. CLIP-L keeps transformers names in the original file, so its
    LoRA is merged there too; bigG's original layout fuses q/k/v, so it is merged on the module."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ref = make_tiny_sdxl(seed=0)
    ldm = sd_keys.unet_to_ldm(ref.unet.state_dict(), ref.unet.config)
    by_flat = {k[len(sd_keys.UNET_PREFIX):].replace(".", "_"): k for k in ldm}
    te_modules = [dict(ref.text_encoder_1.named_modules()), dict(ref.text_encoder_2.named_modules())]
    te_flat = [{("text_model." + p if not p.startswith("text_model.") else p).replace(".", "_"): m
                for p, m in mods.items()} for mods in te_modules]
    for name in {k.split(".")[0] for k in state}:
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        scale = state[f"{name}.alpha"].item() / down.shape[0]
        if name.startswith("lora_unet_"):
            key = by_flat[name[len("lora_unet_"):] + "_weight"]
            w = ldm[key]
            if w.ndim == 4 and w.shape[2:] != (1, 1):  # 3x3 conv: compose the down conv with the 1x1 up
                delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            else:
                delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            ldm[key] = w + scale * delta
        else:
            which = 0 if name.startswith("lora_te1_") else 1
            module = te_flat[which][name[len("lora_te1_"):]]
            module.weight.data += scale * (up @ down)
    unet = UNet2DConditionModel(**ref.unet.config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(ref.unet.config)))
    return ref.text_encoder_1, ref.text_encoder_2, unet.eval()


def test_sgm_names_and_shapes():
    parts = make_tiny_sdxl(seed=0)
    net = lora.create_network(1.0, 4, 1, None, [parts.text_encoder_1, parts.text_encoder_2], parts.unet,
                              conv_dim="2")
    names = {m.lora_name for m in net.all_loras()}
    for expected in ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
                     "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2",
                     "lora_unet_input_blocks_1_0_in_layers_2",  # a resnet's conv1 (conv_dim)
                     "lora_unet_input_blocks_2_0_op",  # a downsampler
                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te2_text_model_encoder_layers_1_mlp_fc2"):
        assert expected in names, expected
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    assert sum(n.startswith("lora_te2_") for n in names) == 2 * 6


def test_diffusers_load_lora_weights_equals_merge_in_original_layout(tmp_path, caplog):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts = make_tiny_sdxl(seed=0)
    inputs = _inputs(parts)
    net = _trained_network(parts)
    ours = _outputs(parts.text_encoder_1, parts.text_encoder_2, parts.unet, inputs)
    path = tmp_path / "xl_lora.safetensors"
    net.save_weights(str(path), torch.float32, {})
    state = load_file(str(path))
    merged = _outputs(*_merged_in_original_layout(state), inputs)

    base = make_tiny_sdxl(seed=0)
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder_1, text_encoder_2=base.text_encoder_2,
                                     tokenizer=base.tokenizer_1, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                     scheduler=EulerDiscreteScheduler())
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "not correctly renamed" in r.getMessage()]
    wrapped = [sum(n.endswith(".lora_A") for n, _ in m.named_modules())
               for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)]
    assert wrapped == [len(net.unet_loras), 12, 12]  # every key of the file was consumed
    diffusers_out = _outputs(pipe.text_encoder, pipe.text_encoder_2, pipe.unet, inputs)
    plain = _outputs(*(lambda p: (p.text_encoder_1, p.text_encoder_2, p.unet))(make_tiny_sdxl(seed=0)), inputs)
    for a, b, c, d, what in zip(ours, merged, diffusers_out, plain, ("te1", "te2", "pooled", "unet")):
        scale = b.abs().max()
        assert (a - b).abs().max() / scale < 1e-5, what
        assert (c - b).abs().max() / scale < 1e-5, what
        assert (b - d).abs().max() / scale > 0.01, what  # the LoRA changes every output


def test_diffusers_peft_file_is_read(tmp_path):
    """A LoRA saved by diffusers (PEFT names, no alphas: scale 1) loads into our network with the
    same outputs as the network it came from."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    parts = make_tiny_sdxl(seed=0)
    inputs = _inputs(parts)
    net = _trained_network(parts, alpha=4.0)  # alpha = rank: scale 1, which a PEFT file implies
    ours = _outputs(parts.text_encoder_1, parts.text_encoder_2, parts.unet, inputs)
    kohya_file = tmp_path / "kohya.safetensors"
    net.save_weights(str(kohya_file), torch.float32, {})
    base = make_tiny_sdxl(seed=0)
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder_1, text_encoder_2=base.text_encoder_2,
                                     tokenizer=base.tokenizer_1, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                     scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(str(kohya_file), adapter_name="mine")
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "peft"), unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="mine"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="mine"),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2, adapter_name="mine"))
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in load_file(str(peft_file)))

    fresh = make_tiny_sdxl(seed=0)
    tes = [fresh.text_encoder_1, fresh.text_encoder_2]
    loaded, _ = lora.create_network_from_weights(1.0, str(peft_file), None, tes, fresh.unet)
    assert {m.lora_name for m in loaded.all_loras()} == {m.lora_name for m in net.all_loras()}
    loaded.apply_to(tes, fresh.unet)
    loaded.load_weights(str(peft_file))
    for a, b, what in zip(ours, _outputs(*tes, fresh.unet, inputs), ("te1", "te2", "pooled", "unet")):
        assert (a - b).abs().max() / a.abs().max() < 1e-5, what


@pytest.mark.parametrize("rates, expected", [(1e-4, {"textencoder": 1e-4}),
                                             ([1e-4, 2e-5], {"textencoder1": 1e-4, "textencoder2": 2e-5})])
def test_learning_rate_per_text_encoder(rates, expected):
    parts = make_tiny_sdxl(seed=0)
    net = lora.create_network(1.0, 4, 1, None, [parts.text_encoder_1, parts.text_encoder_2], parts.unet)
    groups, names = net.prepare_optimizer_params(rates, 3e-4, 1e-3)
    lr = dict(zip(names, (g["lr"] for g in groups)))
    assert lr == {**expected, "unet": 3e-4}
    if len(expected) == 2:
        te1 = {id(p) for m in net.text_encoder_loras if m.lora_name.startswith("lora_te1_") for p in m.parameters()}
        assert {id(p) for p in groups[0]["params"]} == te1
