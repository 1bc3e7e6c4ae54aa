"""Benchmark: peak memory of the model file tools on a full-size SDXL single file (issue #17).

Writes a random-weight SDXL-base-architecture checkpoint in fp16 (about 6.5 GiB of tensors) and a
rank-16 LoRA on its UNet and both text encoders, then runs each tool in a fresh process and reports
its peak RSS against the checkpoint's tensor bytes (target: under 1.3x, i.e. one model plus a
layer, never two copies; ``imports`` is the baseline the imports alone cost):

  merge      networks/merge_lora.py: the LoRA into the checkpoint, saved as fp16
  to_folder  tools/convert_diffusers20_original_sd.py: the single file to a diffusers folder (fp16)
  to_file    the same tool: that folder back to a single file (fp16)

    .venv/bin/python bench/bench_file_tools.py            # full size (about 10 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_file_tools.py --tiny     # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1024 ** 3


def write_inputs(folder: Path, tiny: bool) -> int:
    """The random checkpoint and LoRA; returns the checkpoint's tensor bytes."""
    import torch

    from bench.bench_sdxl_train_step import build_models
    from library.models.sdxl_loading import save_sdxl_single_file
    from library.utils.safetensors_io import read_header, save_safetensors
    from networks import lora

    parts = build_models(tiny)
    save_sdxl_single_file(folder / "model.safetensors", parts, dtype=torch.float16)
    parts.tokenizer_1.save_pretrained(str(folder / "tokenizer"))
    parts.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
    with torch.device("meta"):  # the LoRA's shapes, then random factors of them
        network = lora.create_network(1.0, 16, 8, None, [parts.text_encoder_1, parts.text_encoder_2], parts.unet)
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.full((), 8.0) if k.endswith(".alpha") else torch.randn(v.shape, generator=generator) * 0.01)
             for k, v in network.state_dict().items()}
    save_safetensors({k: v.half() for k, v in state.items()}, folder / "lora.safetensors", {}, model_hashes=True)
    header = read_header(folder / "model.safetensors")
    return sum(t.end - t.start for t in header.tensors.values())


def child(tool: str, folder: str) -> None:
    """Run one tool in this process and print its time and peak RSS."""
    f = Path(folder)
    start = time.perf_counter()
    if tool == "imports":  # the baseline: what importing the tools costs before any file is read
        from networks import merge_lora  # noqa: F401
        from tools import convert_diffusers20_original_sd  # noqa: F401
    elif tool == "merge":
        from networks import merge_lora

        merge_lora.main(["--sd_model", str(f / "model.safetensors"), "--models", str(f / "lora.safetensors"),
                         "--save_to", str(f / "merged.safetensors"), "--save_precision", "fp16"])
    else:
        from tools import convert_diffusers20_original_sd as convert

        if tool == "to_folder":
            convert.main([str(f / "model.safetensors"), str(f / "folder"), "--fp16",
                          "--tokenizer_cache_dir", str(f)])
        else:
            convert.main([str(f / "folder"), str(f / "back.safetensors"), "--fp16"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": peak}))


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL model instead (smoke test)")
    p.add_argument("--keep", help="write the files here and keep them")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    if a.write:
        print(write_inputs(Path(a.write), a.tiny))
        return
    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-file-tools-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:  # every step in its own process, so none sees another's memory
        tensor_bytes = int(_run(["--write", str(folder)] + (["--tiny"] if a.tiny else [])))
        results = {"tensor_bytes": tensor_bytes}
        for tool in ("imports", "merge", "to_folder", "to_file"):
            r = json.loads(_run(["--child", tool, str(folder)]))
            results[tool] = {**r, "ratio": r["peak_rss_bytes"] / tensor_bytes}
            print(f"{tool:10s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_bytes'] / GIB:6.2f} GiB = "
                  f"{results[tool]['ratio']:.2f}x the checkpoint's {tensor_bytes / GIB:.2f} GiB of tensors", flush=True)
        print(json.dumps(results))
    finally:
        if not a.keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
