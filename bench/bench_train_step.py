"""Benchmark: LoRA training step time and peak memory of train_network's trainer vs bare compute.

Setup (issue #2): SD1.5-architecture UNet with random weights (full size unless --tiny), 256 px,
batch 1, LoRA dim 16 on the UNet only, AdamW, cached latents, fp32. Two modes, each in its own
process so peak RSS is measured separately:

  trainer  the real Trainer loop (data loader, noise, loss, logging, progress bar); on the CPU it
           runs small-map convolutions through PyTorch's own kernels (library/models/cpu_conv.py)
  bare     the same modules and LoRA, one fixed batch: text encoder forward + UNet forward +
           backward + AdamW step, nothing else, in plain eager PyTorch
  bare_routed  bare with the trainer's convolution routing: the trainer's overhead is measured
           against it, the trainer's speed-up against plain eager against ``bare``

With --uncached the latents are not cached: the trainer reads, resizes and encodes images every
step with 4 data-loader workers, and the bare loop encodes one fixed, already loaded pixel batch
with the VAE every step; the difference is what the data pipeline costs (target under 3%).

With --from_file two more modes run what a user runs: ``train_network.py``'s own ``main`` with its
command line, on a random SD1.5 single file stored in fp16 (written first, in its own process), so
the peak RSS includes loading it; "start-up" is the load plus the latent cache:

  file          the LoRA run above from the file (the text encoder runs every step)
  file_cached   the same with --cache_text_encoder_outputs (VAE and text encoder then leave memory)
  file_bf16     file_cached with --mixed_precision bf16 (frozen weights loaded in bf16, bf16 compute)

    .venv/bin/python bench/bench_train_step.py            # full size (about 3 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_train_step.py --tiny     # smoke (seconds)
    .venv/bin/python bench/bench_train_step.py --compile  # and --torch_compile (inductor; compiling takes minutes)
    .venv/bin/python bench/bench_train_step.py --from_file  # and the user's command line on an fp16 file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_models(tiny: bool):
    """Random-weight SD1.5 (or tiny) modules; returns an SDComponents."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.sd_infer import shipped_config
    from library.models.sd_loading import SDComponents
    from library.models.tiny import make_tiny_sd1
    from library.models.tiny_tokenizer import build_tiny_clip_tokenizer

    if tiny:
        return make_tiny_sd1(0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shipped_config("sd15_unet"))
    vae = AutoencoderKL(**shipped_config("sd15_vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**shipped_config("clip_l_text")))
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, build_tiny_clip_tokenizer(), v2=False)


def make_dataset(root: Path, size: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "1_bench"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text("a photo of sks bench", encoding="utf-8")
    return root


def network_run(family, data: Path, out: Path, total_steps: int, flags: list[str]) -> None:
    """The LoRA trainer: dim 16 on the UNet only, AdamW."""
    from library.args.common import network_training_parser
    from library.config.training_config import build_training_config
    from library.training.trainer import Trainer

    args = network_training_parser("bench").parse_args([
        "--pretrained_model_name_or_path", "random", "--train_data_dir", str(data), "--output_dir", str(out),
        "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only", "--optimizer_type", "AdamW",
        "--max_train_steps", str(total_steps), "--seed", "0", "--console_log_level", "WARNING", *flags])
    Trainer(family, build_training_config(args)).run()


def file_run(model_path: str, script: str = "train_network"):
    """A ``run`` for :func:`train_timed`: an entry script's ``main`` (``script``, e.g.
    ``sdxl_train_network``) with a user's command line (LoRA dim 16 on the UNet only, AdamW, cached
    latents) on the single file ``model_path``."""
    def run(family, data: Path, out: Path, total_steps: int, flags: list[str]) -> None:
        import importlib

        importlib.import_module(script).main([
            "--pretrained_model_name_or_path", model_path, "--train_data_dir", str(data), "--output_dir", str(out),
            "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
            "--network_train_unet_only", "--optimizer_type", "AdamW", "--max_train_steps", str(total_steps),
            "--seed", "0", "--console_log_level", "WARNING", "--cache_latents", *flags])
    return run


def train_timed(family, size: int, steps: int, warmup: int, flags: list[str], run=network_run,
                first_step: dict | None = None) -> list[float]:
    """Run the real trainer with ``family`` on a small generated dataset (``run`` builds the config
    and trains); per-step wall times after warm-up. A step's time is the time between the ends of
    consecutive steps, so data loading, logging and the progress bar count too. Shared by the
    SD1.5, SDXL, SD3 and full-weight benchmarks. ``first_step`` gets "s": the seconds from the start
    to the end of the first step (set-up, caching and, with --torch_compile, compiling), and
    "startup_s": the seconds the models took to load and their latents / text outputs to cache."""
    from library.training import trainer as trainer_mod

    ends: list[float] = []
    loading: list[float] = []
    original, original_load = trainer_mod._Loop._step, trainer_mod.Trainer._load_models

    def timed(self, *args):
        loss = original(self, *args)
        ends.append(time.perf_counter())
        return loss

    def timed_load(self, *args):
        start = time.perf_counter()
        models = original_load(self, *args)
        loading.append(time.perf_counter() - start)
        return models

    trainer_mod._Loop._step, trainer_mod.Trainer._load_models = timed, timed_load
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_dataset(Path(tmp) / "data", size, 4)
            started = time.perf_counter()
            run(family, data, Path(tmp) / "out", steps + warmup, ["--resolution", str(size), *flags])
    finally:
        trainer_mod._Loop._step, trainer_mod.Trainer._load_models = original, original_load
    if first_step is not None:
        first_step.update(s=ends[0] - started, startup_s=loading[0])
    return [b - a for a, b in zip(ends, ends[1:])][warmup - 1:]


def run_trainer(parts, size: int, steps: int, warmup: int, uncached: bool = False, extra: tuple = (),
                first_step: dict | None = None) -> list[float]:
    """The real trainer on the SD1.5 modules (``extra``: more trainer flags)."""
    from library.families.base import LoadedModels
    from library.families.sd import SDFamily

    class InMemorySD(SDFamily):
        def load(self, name_or_path, dtype, tokenizer_dir, device=None):
            return LoadedModels(parts.unet, parts.vae, [parts.text_encoder], [parts.tokenizer], source="random")

    workers = ["--max_data_loader_n_workers", "4", "--persistent_data_loader_workers"]
    flags = workers if uncached else ["--cache_latents"]
    return train_timed(InMemorySD(), size, steps, warmup, [*flags, *extra], first_step=first_step)


def run_bare(parts, size: int, steps: int, warmup: int, uncached: bool = False) -> list[float]:
    """The same work without the trainer around it."""
    import torch

    from library.maths.noise import scaled_linear_alphas_cumprod
    from networks import lora

    net = lora.create_network(1.0, 16, 16, parts.vae, parts.text_encoder, parts.unet)
    net.apply_to(parts.text_encoder, parts.unet, apply_text_encoder=False, apply_unet=True)
    net.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8) * 0.18215
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    ids = parts.tokenizer(["a photo of sks bench"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    alphas = scaled_linear_alphas_cumprod()
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        with torch.no_grad():
            cond = parts.text_encoder(ids).last_hidden_state
            if uncached:
                latents = parts.vae.encode(pixels).latent_dist.sample() * 0.18215
        bare_step(parts.unet, list(net.parameters()), opt, alphas, latents, cond)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bare_step(unet, params: list, opt, alphas, latents, cond) -> None:
    """One training step with nothing around it: noise, UNet forward, MSE, backward, clipping, step."""
    import torch

    from library.maths.noise import ddpm_noisy_and_target

    t = torch.randint(0, 1000, (1,))
    noisy, target = ddpm_noisy_and_target(alphas, latents, torch.randn_like(latents), t, False)
    loss = ((unet(noisy, t, cond).sample - target) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def print_result(times: list[float], **fields) -> None:
    """A child process's result line: median step time, step count, peak RSS, and ``fields``."""
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({**fields, "median_s": statistics.median(times), "steps": len(times),
                      "peak_rss_gib": round(peak_gib, 3)}))


def run_children(script: str, modes: list[str], args: list[str]) -> dict[str, dict]:
    """Run ``script --child <mode> args`` for each mode in its own process (so peak RSS is its own)."""
    results = {}
    for mode in modes:
        out = subprocess.run([sys.executable, script, "--child", mode, *args], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


FILE_MODES = {"file": [], "file_cached": ["--cache_text_encoder_outputs"],
              "file_bf16": ["--cache_text_encoder_outputs", "--mixed_precision", "bf16"]}


def child(mode: str, tiny: bool, size: int, steps: int, warmup: int, uncached: bool, model: str | None) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    if mode in FILE_MODES:  # nothing is built here: the process holds only what the script loads
        first: dict = {}
        times = train_timed(None, size, steps, warmup, FILE_MODES[mode], run=file_run(model), first_step=first)
        print_result(times, mode=mode, first_step_s=round(first["s"], 2), startup_s=round(first["startup_s"], 2))
        return
    parts = build_models(tiny)
    if mode in ("bare", "bare_routed"):
        if mode == "bare_routed":
            from library.models.cpu_conv import route_small_cpu_convolutions

            route_small_cpu_convolutions(parts.unet)
        print_result(run_bare(parts, size, steps, warmup, uncached), mode=mode)
        return
    first: dict = {}
    extra = ("--torch_compile",) if mode == "compiled" else ()
    times = run_trainer(parts, size, steps, warmup, uncached, extra, first)
    print_result(times, mode=mode, first_step_s=round(first["s"], 2), startup_s=round(first["startup_s"], 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--uncached", action="store_true", help="no latent cache: measure the data pipeline (4 workers)")
    p.add_argument("--compile", action="store_true",
                   help="also the trainer with --torch_compile (inductor, the blocks compiled one by one)")
    p.add_argument("--from_file", action="store_true",
                   help="also train_network.py's command line on an fp16 single file (peak RSS includes loading)")
    p.add_argument("--child", choices=["trainer", "bare", "bare_routed", "compiled", *FILE_MODES],
                   help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.tiny, a.size, a.steps, a.warmup, a.uncached, a.model)
        return
    common = (["--size", str(a.size), "--steps", str(a.steps), "--warmup", str(a.warmup)]
              + (["--tiny"] if a.tiny else []) + (["--uncached"] if a.uncached else []))
    results = run_children(__file__, ["bare", "bare_routed", "trainer"] + (["compiled"] if a.compile else []), common)
    if a.from_file:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_model_file(Path(tmp), a.tiny)
            results |= run_children(__file__, list(FILE_MODES), [*common, "--model", model])
    print_table(results, a)


def write_model_file(folder: Path, tiny: bool) -> str:
    """A random SD1.5 (or tiny) single file in fp16 with its tokenizer, written by bench_load.py
    in its own process (so this one's memory is not touched)."""
    path = folder / "random-sd15.safetensors"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_load.py"), "--write", str(path), "--fp16"]
                         + (["--tiny"] if tiny else []), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"writing the model file failed:\n{out.stderr[-3000:]}")
    return str(path)


def print_table(results: dict[str, dict], a) -> None:
    bare, tr = results["bare"], results["trainer"]
    overhead = tr["median_s"] / results["bare_routed"]["median_s"] - 1
    print(f"model: {'tiny' if a.tiny else 'SD1.5-size'} UNet, {a.size}px, batch 1, LoRA dim 16 UNet only, AdamW, fp32, "
          + ("uncached latents, 4 data-loader workers" if a.uncached else "cached latents"))
    names = {"bare": "bare compute", "bare_routed": "bare, routed convs", "trainer": "trainer", "compiled": "compiled",
             "file": "from the file",
             "file_cached": "file, text cached",
             "file_bf16": "file, cached, bf16"}
    rows = [(names[mode], r) for mode, r in results.items()]
    for name, r in rows:
        first = f", first step after {r['first_step_s']:.1f} s" if "first_step_s" in r else ""
        first += f" (start-up {r['startup_s']:.1f} s)" if "startup_s" in r else ""
        ratio = r["median_s"] / bare["median_s"]
        print(f"{name:17s}: {r['median_s']:.3f} s/step (median of {r['steps']}; {ratio:.2f}x bare), "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB{first}")
    target = "3% (data pipeline)" if a.uncached else "5%"
    print(f"trainer overhead against the same kernels (bare, routed convs): {overhead * 100:+.1f}% (target within "
          f"{target}); trainer against plain eager: {tr['median_s'] / bare['median_s']:.2f}x (target <= 0.85x); "
          "peak RSS target < 6.5 GiB"
          + ("; from the file <= 6.1 GiB" if "file" in results else ""))
    print(json.dumps({**results, "overhead": overhead}))


if __name__ == "__main__":
    main()
