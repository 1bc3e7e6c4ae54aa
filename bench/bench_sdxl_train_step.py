"""Benchmark: SDXL LoRA training step time and peak memory, trainer vs bare compute (issue #6).

The SD1.5 benchmark's twin: SDXL-base-architecture UNet with random weights stored in bf16 (a
full-size SDXL UNet does not fit as fp32 trainable weights here; frozen bf16 with a LoRA does),
512 px, batch 1, LoRA dim 16 on the UNet only, AdamW, bf16 mixed precision, cached latents and
cached text-encoder outputs (so neither mode runs the VAE or the two text encoders per step).
Each mode runs in its own process so peak RSS is measured separately:

  trainer  the real Trainer loop with the SDXL family (size conditioning, pooled text)
  bare     the same modules and LoRA on one fixed batch: UNet forward + backward + AdamW step

    .venv/bin/python bench/bench_sdxl_train_step.py           # full size (about 15 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_sdxl_train_step.py --tiny    # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_train_step import print_result, run_children, train_timed  # noqa: E402

# SDXL base 1.0's architecture (the UNet of sd_xl_base_1.0, CLIP-L and OpenCLIP bigG with projection)
SDXL_UNET = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
             "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
BIG_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
         "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
         "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}


def build_models(tiny: bool):
    """Random-weight SDXL (or tiny SDXL) parts in bf16."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.sd_infer import shipped_config
    from library.models.sdxl_loading import SDXLComponents
    from library.models.tiny import make_tiny_sdxl, tiny_clip_tokenizer_pair

    if tiny:
        parts = make_tiny_sdxl(0)
    else:
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: no fp32 copy of 2.6B weights
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**{**shipped_config("sd15_vae"), "scaling_factor": 0.13025})
        te1 = CLIPTextModel(CLIPTextConfig(**shipped_config("clip_l_text")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G))
        torch.set_default_dtype(torch.float32)
        tok1, tok2 = tiny_clip_tokenizer_pair()  # the vocabulary does not change the cost
        parts = SDXLComponents(unet, vae, te1, te2, tokenizer_1=tok1, tokenizer_2=tok2)
    for m in (parts.unet, parts.vae, parts.text_encoder_1, parts.text_encoder_2):
        m.to(torch.bfloat16).eval().requires_grad_(False)
    return parts


def run_trainer(parts, size: int, steps: int, warmup: int) -> list[float]:
    """The real trainer with the SDXL family; per-step wall times after warm-up."""
    from library.families.base import LoadedModels
    from library.families.sdxl import SDXLFamily

    class InMemorySDXL(SDXLFamily):
        def load(self, name_or_path, dtype, tokenizer_dir, device=None):
            return LoadedModels(parts.unet, parts.vae, [parts.text_encoder_1, parts.text_encoder_2],
                                [parts.tokenizer_1, parts.tokenizer_2], source="random")

    return train_timed(InMemorySDXL(), size, steps, warmup,
                       ["--mixed_precision", "bf16", "--cache_latents", "--cache_text_encoder_outputs"])


def run_bare(parts, size: int, steps: int, warmup: int) -> list[float]:
    """UNet forward + backward + AdamW on one fixed batch with precomputed text outputs."""
    import torch

    from library.families.base import LoadedModels
    from library.families.sdxl import SDXLFamily
    from library.maths.noise import ddpm_noisy_and_target, scaled_linear_alphas_cumprod
    from networks import lora

    tes = [parts.text_encoder_1, parts.text_encoder_2]
    net = lora.create_network(1.0, 16, 16, parts.vae, tes, parts.unet)
    net.apply_to(tes, parts.unet, apply_text_encoder=False, apply_unet=True)
    net.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    models = LoadedModels(parts.unet, parts.vae, tes, [parts.tokenizer_1, parts.tokenizer_2])
    with torch.no_grad():
        cond = SDXLFamily().encode_prompts(models, ["a photo of sks bench"], torch.device("cpu"))
    torch.manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8, dtype=torch.bfloat16) * 0.13025
    sizes = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.bfloat16)
    alphas = scaled_linear_alphas_cumprod()
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (1,))
        noisy, target = ddpm_noisy_and_target(alphas, latents, torch.randn_like(latents), t, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = parts.unet(noisy, t, cond["hidden"], added_cond_kwargs={"text_embeds": cond["pooled"],
                                                                           "time_ids": sizes}).sample
        loss = ((pred.float() - target.float()) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def child(mode: str, tiny: bool, size: int, steps: int, warmup: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    parts = build_models(tiny)
    print_result((run_trainer if mode == "trainer" else run_bare)(parts, size, steps, warmup), mode=mode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny SDXL-layout model (smoke test)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--child", choices=["trainer", "bare"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.tiny, a.size, a.steps, a.warmup)
        return
    results = run_children(__file__, ["bare", "trainer"], ["--size", str(a.size), "--steps", str(a.steps),
                                                          "--warmup", str(a.warmup)] + (["--tiny"] if a.tiny else []))
    bare, tr = results["bare"], results["trainer"]
    overhead = tr["median_s"] / bare["median_s"] - 1
    print(f"model: {'tiny' if a.tiny else 'SDXL-base-size'} UNet (bf16 weights), {a.size}px, batch 1, LoRA dim 16 "
          "UNet only, AdamW, bf16 mixed precision, cached latents and text-encoder outputs")
    for name, r in (("bare compute", bare), ("trainer", tr)):
        print(f"{name:13s}: {r['median_s']:.3f} s/step (median of {r['steps']}), peak RSS {r['peak_rss_gib']:.2f} GiB")
    print(f"trainer overhead: {overhead * 100:+.1f}%")
    print(json.dumps({"bare": bare, "trainer": tr, "overhead": overhead}))


if __name__ == "__main__":
    main()
