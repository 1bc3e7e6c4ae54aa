"""Benchmark: gen_img.py's generation path against diffusers' StableDiffusionPipeline (issue #8).

Full-size SD1.5-architecture random model (fp32), 256 px, 10 steps, euler_a, batch 1, CFG 7.5, in
one process: ``ours`` is gen_img's path (family pipeline + our own prompt encoding with long-prompt
windows and weights, per-image generators), ``diffusers`` calls StableDiffusionPipeline with the
prompt strings and the same scheduler. Both alternate, after one warm-up image each.

    .venv/bin/python bench/bench_gen_img.py           # full size (a few minutes, 2 CPU cores)
    .venv/bin/python bench/bench_gen_img.py --tiny    # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_train_step import build_models  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", type=int, default=3, help="measured images per path")
    a = p.parse_args()
    import torch
    from diffusers import StableDiffusionPipeline

    from library.families.base import LoadedModels
    from library.families.sd import SDFamily, SDOptions
    from library.sampling.generate import GenBatch, run_batch
    from library.sampling.samplers import build_scheduler

    torch.set_num_threads(os.cpu_count() or 2)
    parts = build_models(a.tiny)
    models = LoadedModels(parts.unet, parts.vae, [parts.text_encoder], [parts.tokenizer])
    family = SDFamily(SDOptions(weighted_captions=True))
    prompt, negative = "a photo of a red circle on a table, detailed", "blurry"
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=build_scheduler("euler_a"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ours(seed):
        run_batch(family, models, GenBatch([prompt], [negative], [seed], a.size, a.size, a.steps, 7.5, "euler_a"),
                  torch.device("cpu"))

    def theirs(seed):
        with torch.no_grad():
            pipe(prompt, negative_prompt=negative, width=a.size, height=a.size, num_inference_steps=a.steps,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(seed))

    times = {"ours": [], "diffusers": []}
    for i in range(a.images + 1):
        for name, fn in (("ours", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            fn(i)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    result = {k: {"median_s_per_image": statistics.median(v), "images_per_s": 1 / statistics.median(v),
                   "images": len(v)} for k, v in times.items()}
    print(f"model: {'tiny' if a.tiny else 'SD1.5-size'} random weights, fp32, {a.size}px, {a.steps} steps euler_a, "
          "batch 1, CFG 7.5")
    for name, r in result.items():
        print(f"{name:9s}: {r['images_per_s']:.3f} images/s ({r['median_s_per_image']:.2f} s/image, median of "
              f"{r['images']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
