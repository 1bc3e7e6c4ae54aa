"""Benchmark: peak memory and time of loading a full-size SD1.5 single file.

Writes a random-weight SD1.5-architecture checkpoint in the original layout (about 4.3 GB in fp32,
2.1 GB with --fp16) to a temporary folder, then loads it in a fresh process with our loader and
reports peak RSS against the size of the tensors (target: under 1.3x, i.e. never two full copies).

    .venv/bin/python bench/bench_load.py [--fp16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_checkpoint(path: Path, fp16: bool, tiny: bool = False) -> int:
    """Save a random SD1.5 single file (or the tiny model); returns the bytes of its tensors."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.sd_infer import shipped_config
    from library.models.sd_loading import SDComponents, save_sd_single_file
    from library.models.tiny_tokenizer import build_tiny_clip_tokenizer

    torch.manual_seed(0)
    if tiny:
        from library.models.tiny import make_tiny_sd1
        parts = make_tiny_sd1(0)
    else:
        parts = SDComponents(UNet2DConditionModel(**shipped_config("sd15_unet")),
                             AutoencoderKL(**shipped_config("sd15_vae")),
                             CLIPTextModel(CLIPTextConfig(**shipped_config("clip_l_text"))),
                             build_tiny_clip_tokenizer(), v2=False)
    save_sd_single_file(path, parts, dtype=torch.float16 if fp16 else None)
    parts.tokenizer.save_pretrained(str(path.parent / "tokenizer"))
    return sum(t.numel() * t.element_size() for m in (parts.unet, parts.vae, parts.text_encoder)
               for t in m.state_dict().values()) // (2 if fp16 else 1)


def child(path: str, fp16: bool) -> None:
    import torch

    from library.models.sd_loading import load_sd_model

    start = time.perf_counter()
    parts = load_sd_model(path, torch.float16 if fp16 else torch.float32)
    # safetensors maps the file lazily: read every weight once, as training will, so RSS counts it
    with torch.no_grad():
        for m in (parts.unet, parts.vae, parts.text_encoder):
            for t in m.state_dict().values():
                t.float().sum() if t.numel() < 1 << 24 else t.view(-1)[:: 1024].sum()
    seconds = time.perf_counter() - start
    loaded = sum(t.numel() * t.element_size() for m in (parts.unet, parts.vae, parts.text_encoder)
                 for t in m.state_dict().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "loaded_bytes": loaded, "peak_rss_bytes": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp16", action="store_true", help="store and load the weights in fp16")
    p.add_argument("--keep", help="write the checkpoint here and keep it")
    p.add_argument("--tiny", action="store_true", help="the tiny model instead (smoke test)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--write", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.fp16)
        return
    if a.write:
        print(write_checkpoint(Path(a.write), a.fp16, a.tiny))
        return
    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "random-sd15.safetensors"
    # writing and loading run in their own processes, so neither sees the other's memory
    flags = (["--fp16"] if a.fp16 else []) + (["--tiny"] if a.tiny else [])
    writer = subprocess.run([sys.executable, __file__, "--write", str(path)] + flags,
                            capture_output=True, text=True, check=False)
    if writer.returncode != 0:
        sys.exit(writer.stderr[-3000:])
    tensor_bytes = int(writer.stdout.strip().splitlines()[-1])
    out = subprocess.run([sys.executable, __file__, "--child", str(path)] + (["--fp16"] if a.fp16 else []),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1024 ** 3
    print(json.dumps({**r, "tensor_bytes": tensor_bytes}))
    print(f"file {path.stat().st_size / gib:.2f} GiB, tensors {tensor_bytes / gib:.2f} GiB; load {r['seconds']:.1f} s, "
          f"peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB = {r['peak_rss_bytes'] / tensor_bytes:.2f}x the tensors "
          "(target under 1.3x)")
    if not a.keep:
        path.unlink()


if __name__ == "__main__":
    main()
