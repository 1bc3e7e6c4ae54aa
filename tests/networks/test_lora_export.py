"""--save_lora_format diffusers: the diffusers form (load_lora_weights) and the PEFT adapter reproduce
our own LoRA exactly, with every key consumed, for SD3 (fused q/k/v, swapped adaLN rows, a conv
embedder) and SD1."""

import json
import logging

import torch
from safetensors.torch import load_file

from library.models.tiny import make_tiny_sd1, make_tiny_sd3
from networks import lora, lora_sd3
from networks.lora_export import write_diffusers_lora


def _randomise(net, seed=3):
    torch.manual_seed(seed)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)


def _sd3_out(transformer):
    torch.manual_seed(11)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 10, 128),
                           pooled_projections=torch.randn(2, 64), timestep=torch.tensor([100.0, 700.0])).sample


def _sd3_te_out(encoder):
    ids = torch.arange(5, 25).view(1, 20)
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def test_sd3_diffusers_and_peft_forms_reproduce_our_lora(tmp_path, caplog):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    parts = make_tiny_sd3(seed=0)
    net = lora_sd3.create_network(1.0, 4, 2, None, [parts.clip_l, parts.clip_g], parts.transformer,
                                  emb_dims="[2,2,2,2,2,2]", context_mod_dim="3")
    net.apply_to([parts.clip_l, parts.clip_g], parts.transformer)
    _randomise(net)
    ours, ours_te = _sd3_out(parts.transformer), _sd3_te_out(parts.clip_g)
    folder = write_diffusers_lora(net, tmp_path / "lora-diffusers")

    base = make_tiny_sd3(seed=0)
    pipe = StableDiffusion3Pipeline(transformer=base.transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=base.vae, text_encoder=base.clip_l, tokenizer=base.tokenizers["clip_l"],
                                    text_encoder_2=base.clip_g, tokenizer_2=base.tokenizers["clip_g"],
                                    text_encoder_3=None, tokenizer_3=None)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(folder))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    n_keys = len(load_file(str(folder / "pytorch_lora_weights.safetensors"))) // 2
    wrapped = sum(n.endswith(".lora_A") for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                  for n, _ in m.named_modules())
    assert wrapped == n_keys  # every key consumed
    theirs = _sd3_out(pipe.transformer)
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-5
    for a, b in zip(_sd3_te_out(pipe.text_encoder_2), ours_te):
        assert (a - b).abs().max() / b.abs().max() < 1e-5

    config = json.loads((folder / "adapter_config.json").read_text())
    fresh = make_tiny_sd3(seed=0).transformer
    inject_adapter_in_model(LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}), fresh)
    adapter = {k[len("base_model.model."):]: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(fresh, adapter)
    assert not result.unexpected_keys
    peft_out = _sd3_out(fresh)
    assert (peft_out - ours).abs().max() / ours.abs().max() < 1e-5


def test_sd1_diffusers_form(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    parts = make_tiny_sd1(seed=0)
    net = lora.create_network(1.0, 4, 1, None, parts.text_encoder, parts.unet, conv_dim="2", conv_alpha="1")
    net.apply_to(parts.text_encoder, parts.unet)
    _randomise(net)
    torch.manual_seed(2)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = parts.unet(x, t, cond).sample
    folder = write_diffusers_lora(net, tmp_path / "sd1-diffusers")
    base = make_tiny_sd1(seed=0)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(folder))
    with torch.no_grad():
        theirs = pipe.unet(x, t, cond).sample
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-5
