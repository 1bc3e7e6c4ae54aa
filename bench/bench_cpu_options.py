"""Benchmark: which CPU settings make the bare LoRA training step faster than plain eager (issue #21).

The step is bench_train_step.py's bare one (SD1.5-size UNet with random weights, 256 px, batch 1,
LoRA dim 16 on the UNet, AdamW, fp32, one fixed batch, the text conditioning computed once), run
once per variant, each in its own process so a setting cannot leak into the next:

  eager           the defaults (all cores, oneDNN on, PyTorch's SDPA attention)
  threads_1       torch.set_num_threads(1)
  no_onednn       torch.backends.mkldnn.enabled = False (convolutions through PyTorch's own kernels)
  channels_last   the UNet and its input in channels-last memory format
  bf16_autocast   forward under torch.autocast("cpu", torch.bfloat16)
  math_attention  diffusers' plain attention processor instead of SDPA
  small_maps      convolutions on maps of at most 16x16 through PyTorch's own kernels, the rest
                  through oneDNN (library/models/cpu_conv.py; what the trainer does on the CPU)

    .venv/bin/python bench/bench_cpu_options.py            # full size (about 6 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_cpu_options.py --tiny     # smoke (seconds)
    .venv/bin/python bench/bench_cpu_options.py --variants eager threads_1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_train_step import bare_step, build_models, run_children  # noqa: E402

VARIANTS = ("eager", "threads_1", "no_onednn", "channels_last", "bf16_autocast", "math_attention", "small_maps")


def apply_variant(variant: str, unet):
    """Set ``variant`` up on ``unet``; returns (the context each forward runs in, memory format)."""
    import torch

    fmt = torch.contiguous_format
    if variant == "threads_1":
        torch.set_num_threads(1)
    elif variant == "no_onednn":
        torch.backends.mkldnn.enabled = False
    elif variant == "channels_last":
        fmt = torch.channels_last
        unet.to(memory_format=fmt)
    elif variant == "small_maps":
        from library.models.cpu_conv import route_small_cpu_convolutions

        route_small_cpu_convolutions(unet)
    elif variant == "math_attention":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if variant == "bf16_autocast":
        return (lambda: torch.autocast("cpu", torch.bfloat16)), fmt
    return contextlib.nullcontext, fmt


def child(variant: str, tiny: bool, size: int, steps: int, warmup: int) -> None:
    import torch

    from library.maths.noise import scaled_linear_alphas_cumprod
    from networks import lora

    torch.set_num_threads(os.cpu_count() or 2)
    parts = build_models(tiny)
    net = lora.create_network(1.0, 16, 16, parts.vae, parts.text_encoder, parts.unet)
    net.apply_to(parts.text_encoder, parts.unet, apply_text_encoder=False, apply_unet=True)
    net.requires_grad_(True)
    context, fmt = apply_variant(variant, parts.unet)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    torch.manual_seed(0)
    latents = (torch.randn(1, 4, size // 8, size // 8) * 0.18215).contiguous(memory_format=fmt)
    ids = parts.tokenizer(["a photo of sks bench"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = parts.text_encoder(ids).last_hidden_state
    alphas, params, times = scaled_linear_alphas_cumprod(), list(net.parameters()), []
    for i in range(steps + warmup):
        start = time.perf_counter()
        with context():
            bare_step(parts.unet, params, opt, alphas, latents, cond)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({"variant": variant, "median_s": statistics.median(times), "steps": len(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.tiny, a.size, a.steps, a.warmup)
        return
    variants = ["eager"] + [v for v in a.variants if v != "eager"]  # eager first: the others' reference
    results = run_children(__file__, variants, ["--size", str(a.size), "--steps", str(a.steps), "--warmup",
                                                str(a.warmup)] + (["--tiny"] if a.tiny else []))
    eager = results["eager"]["median_s"]
    print(f"{'tiny' if a.tiny else 'SD1.5-size'} UNet, {a.size}px, batch 1, LoRA dim 16, AdamW, fp32, bare step")
    for name, r in results.items():
        print(f"{name:15s}: {r['median_s']:.3f} s/step (median of {r['steps']}; {r['median_s'] / eager:.2f}x eager)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
