"""Benchmark: SDXL LoRA training step time and peak memory, trainer vs bare compute (issue #6).

The SD1.5 benchmark's twin: SDXL-base-architecture UNet with random weights stored in bf16 (a
full-size SDXL UNet does not fit as fp32 trainable weights here; frozen bf16 with a LoRA does),
512 px, batch 1, LoRA dim 16 on the UNet only, AdamW, bf16 mixed precision, cached latents and
cached text-encoder outputs (so neither mode runs the VAE or the two text encoders per step).
Each mode runs in its own process so peak RSS is measured separately:

  trainer  the real Trainer loop with the SDXL family (size conditioning, pooled text)
  bare     the same modules and LoRA on one fixed batch: UNet forward + backward + AdamW step

  file     sdxl_train_network.py's own main with the same flags on a random SDXL single file
           stored in bf16 (written first, in its own process): what a user runs, so the peak RSS
           includes loading, and the VAE and text encoders leave memory once their outputs are
           cached (only with --from_file)

    .venv/bin/python bench/bench_sdxl_train_step.py           # full size (about 15 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_sdxl_train_step.py --tiny    # smoke (seconds)
    .venv/bin/python bench/bench_sdxl_train_step.py --from_file   # and the file mode (about 10 minutes more)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_train_step import file_run, print_result, run_children, train_timed  # noqa: E402

TRAINER_FLAGS = ["--mixed_precision", "bf16", "--cache_latents", "--cache_text_encoder_outputs"]

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

    return train_timed(InMemorySDXL(), size, steps, warmup, TRAINER_FLAGS)


def write_model_file(path: Path, tiny: bool) -> None:
    """The random SDXL parts as a bf16 single file with both tokenizer folders next to it."""
    import torch

    from library.models.sdxl_loading import save_sdxl_single_file

    parts = build_models(tiny)
    save_sdxl_single_file(path, parts, dtype=torch.bfloat16)
    parts.tokenizer_1.save_pretrained(str(path.parent / "tokenizer"))
    parts.tokenizer_2.save_pretrained(str(path.parent / "tokenizer_2"))


def run_file(model: str, size: int, steps: int, warmup: int, first: dict) -> list[float]:
    """sdxl_train_network.py's main with a user's command line on the single file ``model``."""
    return train_timed(None, size, steps, warmup, TRAINER_FLAGS, run=file_run(model, "sdxl_train_network"),
                       first_step=first)


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


def child(mode: str, tiny: bool, size: int, steps: int, warmup: int, model: str | None = None) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    if mode == "file":
        first: dict = {}
        times = run_file(model, size, steps, warmup, first)
        print_result(times, mode=mode, startup_s=round(first["startup_s"], 2))
        return
    parts = build_models(tiny)
    print_result((run_trainer if mode == "trainer" else run_bare)(parts, size, steps, warmup), mode=mode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny SDXL-layout model (smoke test)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--from_file", action="store_true",
                   help="also sdxl_train_network.py's command line on a bf16 single file (peak RSS includes loading)")
    p.add_argument("--child", choices=["trainer", "bare", "file"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.write:
        write_model_file(Path(a.write), a.tiny)
        return
    if a.child:
        child(a.child, a.tiny, a.size, a.steps, a.warmup, a.model)
        return
    common = ["--size", str(a.size), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    common += ["--tiny"] if a.tiny else []
    results = run_children(__file__, ["bare", "trainer"], common)
    if a.from_file:
        with tempfile.TemporaryDirectory() as tmp:
            model = str(Path(tmp) / "random-sdxl.safetensors")
            writer = subprocess.run([sys.executable, __file__, "--write", model] + (["--tiny"] if a.tiny else []),
                                    capture_output=True, text=True, check=False)
            if writer.returncode != 0:
                sys.exit(f"writing the model file failed:\n{writer.stderr[-3000:]}")
            results |= run_children(__file__, ["file"], [*common, "--model", model])
    bare, tr = results["bare"], results["trainer"]
    overhead = tr["median_s"] / bare["median_s"] - 1
    print(f"model: {'tiny' if a.tiny else 'SDXL-base-size'} UNet (bf16 weights), {a.size}px, batch 1, LoRA dim 16 "
          "UNet only, AdamW, bf16 mixed precision, cached latents and text-encoder outputs")
    names = {"bare": "bare compute", "trainer": "trainer", "file": "from the file"}
    for mode, r in results.items():
        startup = f", start-up {r['startup_s']:.1f} s" if "startup_s" in r else ""
        print(f"{names[mode]:13s}: {r['median_s']:.3f} s/step (median of {r['steps']}), "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB{startup}")
    print(f"trainer overhead: {overhead * 100:+.1f}%")
    print(json.dumps({**results, "overhead": overhead}))


if __name__ == "__main__":
    main()
