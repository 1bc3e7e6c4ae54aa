"""Benchmark: full-weight training step time and peak memory, trainer vs bare compute (issue #13).

SD1.5-architecture UNet with random weights (full size unless --tiny), 256 px, batch 1, the UNet
trained (text encoder frozen), cached latents, fp32. Each mode in its own process, so peak RSS is
its own:

  bare_adamw        UNet forward + backward + gradient clipping + AdamW step on one fixed batch, with
                    the small-map convolutions routed as the trainer routes them on CPU
                    (library/models/cpu_conv.py), so the difference is the trainer's own cost
  trainer_adamw     the real Trainer with ModelTraining (train_db.py's path) and AdamW
  trainer_adafactor the trainer with Adafactor (a plain step after the whole backward)
  trainer_fused     the trainer with Adafactor and --fused_backward_pass (each tensor stepped
                    inside backward, its gradient freed at once)

    .venv/bin/python bench/bench_full_train_step.py          # full size (about 6 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_full_train_step.py --tiny   # smoke (seconds)
    .venv/bin/python bench/bench_full_train_step.py --repeat 3  # the memory saving as a median of 3 pairs
    .venv/bin/python bench/bench_full_train_step.py --live_memory  # and the allocator's figures (below)

Peak RSS counts what glibc keeps of freed memory too, which moves a run's peak by a few tenths of
a GiB from run to run. ``--live_memory`` also runs the two Adafactor modes with one step under
torch.profiler's memory profiler and reports the bytes of live tensors at the step's start and at
its peak: the CPU counterpart of ``torch.cuda.max_memory_allocated``, the same in every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_train_step import (  # noqa: E402
    bare_step,
    build_models,
    print_result,
    run_children,
    train_timed,
)

ADAFACTOR = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False"]
FLAGS = {"trainer_adamw": ["--optimizer_type", "AdamW"], "trainer_adafactor": ADAFACTOR,
         "trainer_fused": [*ADAFACTOR, "--fused_backward_pass"]}


def model_run(family, data: Path, out: Path, total_steps: int, flags: list[str]) -> None:
    """train_db.py's path: the UNet's own weights, the text encoder frozen."""
    from library.args.model_training import model_training_parser
    from library.config.training_config import build_training_config
    from library.training.model_weights import ModelTraining
    from library.training.trainer import Trainer

    args = model_training_parser("bench", "dreambooth").parse_args([
        "--pretrained_model_name_or_path", "random", "--train_data_dir", str(data), "--output_dir", str(out),
        "--stop_text_encoder_training", "-1", "--learning_rate", "1e-6", "--max_train_steps", str(total_steps),
        "--seed", "0", "--console_log_level", "WARNING", "--cache_latents", *flags])
    config = build_training_config(args, "dreambooth")
    Trainer(family, config, ModelTraining(config.model)).run()


def run_trainer(parts, mode: str, size: int, steps: int, warmup: int, extra: list[str]) -> list[float]:
    from library.families.base import LoadedModels
    from library.families.sd import SDFamily

    class InMemorySD(SDFamily):
        def load(self, name_or_path, dtype, tokenizer_dir, device=None):
            return LoadedModels(parts.unet, parts.vae, [parts.text_encoder], [parts.tokenizer], source="random",
                                variant="sd1", parts=parts)

    return train_timed(InMemorySD(), size, steps, warmup, FLAGS[mode] + extra, run=model_run)


@contextlib.contextmanager
def live_memory_of_step(index: int, figures: dict):
    """Run the trainer's ``index``-th step (from 0) under torch.profiler's memory profiler;
    ``figures`` gets the live tensor bytes (GiB) at the step's start and at its peak. Only
    tensors the step touches count, which here are all of them (weights, optimizer state, the
    frozen text encoder's weights, activations, gradients, temporaries)."""
    from torch.profiler import ProfilerActivity, profile

    from library.training import trainer as trainer_mod

    original, calls = trainer_mod._Loop._step, []

    def step(self, *args):
        calls.append(None)
        if len(calls) - 1 != index:
            return original(self, *args)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            loss = original(self, *args)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "timeline.json")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA's snapshots; CPU has none
                prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)  # [times, [bytes by category] at each time]
        totals = [sum(point) for point in sizes]
        figures.update(live_start_gib=totals[0] / 2**30, live_peak_gib=max(totals) / 2**30)
        return loss

    trainer_mod._Loop._step = step
    try:
        yield
    finally:
        trainer_mod._Loop._step = original


def run_bare(parts, size: int, steps: int, warmup: int) -> list[float]:
    import torch

    from library.maths.noise import scaled_linear_alphas_cumprod
    from library.models.cpu_conv import route_small_cpu_convolutions

    unet = parts.unet.train().requires_grad_(True)
    route_small_cpu_convolutions(unet)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8) * 0.18215
    ids = parts.tokenizer(["a photo of sks bench"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    alphas = scaled_linear_alphas_cumprod()
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        with torch.no_grad():
            cond = parts.text_encoder(ids).last_hidden_state
        bare_step(unet, params, opt, alphas, latents, cond)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def child(mode: str, tiny: bool, size: int, steps: int, warmup: int, extra: list[str], live: bool) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    parts = build_models(tiny)
    if mode == "bare_adamw":
        print_result(run_bare(parts, size, steps, warmup), mode=mode)
        return
    figures = {"gradients_gib": sum(p.numel() * p.element_size() for p in parts.unet.parameters()) / 2**30}
    with live_memory_of_step(warmup, figures) if live else contextlib.nullcontext():
        times = run_trainer(parts, mode, size, steps, warmup, extra)
    print_result(times, mode=mode, **figures)  # with --live, one measured step ran under the profiler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke test)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="the trainer modes with gradient checkpointing (activations no longer hide the gradients' "
                        "memory); the bare mode is left out then")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the two Adafactor modes this many times and report the median saving (glibc's "
                        "fragmentation moves a run's peak by a few tenths of a GiB)")
    p.add_argument("--live_memory", action="store_true",
                   help="also run the two Adafactor modes with one step under torch.profiler's memory profiler and "
                        "report live tensor bytes (independent of glibc; the profiled runs' times are not reported)")
    p.add_argument("--child", choices=["bare_adamw", *FLAGS], help=argparse.SUPPRESS)
    p.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    extra = ["--gradient_checkpointing"] if a.gradient_checkpointing else []
    if a.child:
        child(a.child, a.tiny, a.size, a.steps, a.warmup, extra, a.live)
        return
    modes = list(FLAGS) if a.gradient_checkpointing else ["bare_adamw", *FLAGS]
    common = ["--size", str(a.size), "--steps", str(a.steps), "--warmup", str(a.warmup)] + \
        (["--tiny"] if a.tiny else []) + extra
    results = run_children(__file__, modes, common)
    print(f"model: {'tiny' if a.tiny else 'SD1.5-size'} UNet trained whole, {a.size}px, batch 1, fp32, cached latents"
          + (", gradient checkpointing" if extra else ""))
    for mode in modes:
        r = results[mode]
        print(f"{mode:17s}: {r['median_s']:.3f} s/step (median of {r['steps']}), peak RSS {r['peak_rss_gib']:.2f} GiB")
    overhead = results["trainer_adamw"]["median_s"] / results["bare_adamw"]["median_s"] - 1 \
        if "bare_adamw" in results else float("nan")
    savings = [results["trainer_adafactor"]["peak_rss_gib"] - results["trainer_fused"]["peak_rss_gib"]]
    for _ in range(a.repeat - 1):
        again = run_children(__file__, ["trainer_adafactor", "trainer_fused"], common)
        savings.append(again["trainer_adafactor"]["peak_rss_gib"] - again["trainer_fused"]["peak_rss_gib"])
    saved = statistics.median(savings)
    print((f"trainer overhead (AdamW): {overhead * 100:+.1f}% (target within 5%); " if "bare_adamw" in results else "")
          + "fused backward saves "
          f"{saved:.2f} GiB of peak RSS against plain Adafactor"
          + (f" (median of {len(savings)} pairs of runs: {', '.join(f'{x:.2f}' for x in savings)})"
             if len(savings) > 1 else ""))
    live = live_memory_report(run_children(__file__, ["trainer_adafactor", "trainer_fused"], [*common, "--live"])) \
        if a.live_memory else {}
    print(json.dumps({**results, "overhead": overhead, "fused_saves_gib": saved, "savings_gib": savings, **live}))


def live_memory_report(live: dict[str, dict]) -> dict:
    """Print the allocator-level figures of the two Adafactor runs; returns them for the JSON line."""
    plain, fused = live["trainer_adafactor"], live["trainer_fused"]
    for mode, r in live.items():
        print(f"{mode:17s}: live tensors {r['live_start_gib']:.3f} GiB at the step's start, {r['live_peak_gib']:.3f} "
              f"GiB at its peak (+{r['live_peak_gib'] - r['live_start_gib']:.3f})")
    saved = plain["live_peak_gib"] - fused["live_peak_gib"]
    print(f"fused backward saves {saved:.3f} GiB of live tensors at the peak; a full set of the UNet's gradients is "
          f"{plain['gradients_gib']:.3f} GiB")
    return {"live": live, "fused_saves_live_gib": saved}


if __name__ == "__main__":
    main()
