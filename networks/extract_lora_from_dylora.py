"""Cut fixed-rank LoRAs from a DyLoRA file (kohya's script of the same name and flags).

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to out.safetensors --unit 4

writes ``out-0004.safetensors``, ``out-0008.safetensors``, ... for every multiple of ``--unit`` below
the file's rank: each keeps the first ``r`` ranks of every module (``lora_down[:r]``,
``lora_up[:, :r]``) and its alpha, which is how DyLoRA trained that rank (scale alpha / r). Each file
gets its own hashes and ``ss_network_dim`` (kohya wrote the hashes into the source's metadata).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path, as for the other scripts
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.utils.errors import UserError, run_cli  # noqa: E402
from networks.lora_merge import read_lora, write_lora  # noqa: E402


def leading_ranks(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` ranks of every module of a kohya-format LoRA state dict (alphas kept)."""
    out = {}
    for key, value in state.items():
        if key.endswith("lora_down.weight"):
            out[key] = value[:rank].contiguous()
        elif key.endswith("lora_up.weight"):
            out[key] = value[:, :rank].contiguous()
        else:
            out[key] = value
    return out


def extract(model: str, save_to: str, unit: int) -> list[Path]:
    """Write one file per multiple of ``unit`` below the file's rank; return their paths."""
    if unit < 1:
        raise UserError(f"--unit {unit}: at least 1")
    state, metadata = read_lora(model, "--model")
    ranks = [v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")]
    if not ranks:
        raise UserError(f"--model {model}: no LoRA keys (lora_down.weight) in it")
    top = max(ranks)
    if unit >= top:
        raise UserError(f"--unit {unit}: the file's rank is {top}; give a smaller unit")
    stem, ext = os.path.splitext(save_to)
    written = []
    for rank in range(unit, top, unit):
        part = leading_ranks(state, rank)
        path = Path(f"{stem}-{rank:04d}{ext or '.safetensors'}")
        meta = dict(metadata)
        comment = meta.get("ss_training_comment", "")
        meta.update({"ss_network_dim": str(rank), "ss_network_module": "networks.lora",
                     "ss_training_comment": f"rank {rank} of the DyLoRA {Path(model).name} (rank {top}). {comment}"
                                            .strip()})
        write_lora(part, path, meta)
        print(f"rank {rank}: {path}")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="cut fixed-rank LoRAs from a DyLoRA file")
    p.add_argument("--model", required=True, help="the DyLoRA file (.safetensors, .ckpt or .pt)")
    p.add_argument("--save_to", required=True, help="base name of the files written: <base>-<rank>.<ext>")
    p.add_argument("--unit", type=int, required=True, help="rank step: files for unit, 2 unit, ... below the rank")
    args = p.parse_args(argv)
    extract(args.model, args.save_to, args.unit)


if __name__ == "__main__":
    run_cli(main)
