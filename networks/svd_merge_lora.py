"""Merge LoRAs into one LoRA of a chosen rank by SVD (kohya's networks/svd_merge_lora.py and flags).

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.3 \
        --new_rank 16 --new_conv_rank 8 --save_to ab.safetensors

Each module's updates are summed in full (``sum(ratio_i * alpha_i / rank_i * up_i @ down_i)``) and
factored at the new rank by SVD, the best approximation of that rank; alpha = rank (scale 1).
Unlike merge_lora.py's sum, no cross terms come in, and the inputs may have any ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.utils.errors import UserError, run_cli  # noqa: E402
from networks.lora_merge import lora_modules, read_lora, scale_by_blocks, update_of, write_lora  # noqa: E402
from networks.lora_names import lora_file_family  # noqa: E402
from networks.lora_resize import as_module_shapes, factor  # noqa: E402
from networks.merge_lora import block_strengths  # noqa: E402

PRECISIONS = DTYPE_NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="merge LoRAs into one LoRA of a chosen rank by SVD")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files (kohya format)")
    p.add_argument("--ratios", type=float, nargs="+", help="one strength per LoRA (default 1.0 each)")
    p.add_argument("--save_to", required=True, help="output file (.safetensors, .ckpt, .pt)")
    p.add_argument("--new_rank", type=int, default=4, help="rank of the result (4)")
    p.add_argument("--new_conv_rank", type=int, help="rank of 3x3 convolution modules (default --new_rank)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="float",
                   help="dtype the updates are summed in (the SVD itself runs in float32)")
    p.add_argument("--save_precision", choices=list(PRECISIONS), help="dtype of the saved file (default float)")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimum metadata")
    p.add_argument("--v2", action="store_true", help="accepted for kohya's commands (the files say the family)")
    p.add_argument("--sdxl", action="store_true", help="accepted for kohya's commands (the files say the family)")
    p.add_argument("--lbws", nargs="+", help="per-LoRA block strengths, as networks/merge_lora.py takes them")
    return p


def svd_merge(loras: list[tuple[dict, float]], rank: int, conv_rank: int, device: str,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The summed updates of every module, factored at ``rank`` (``conv_rank`` for 3x3 convs)."""
    names = sorted({n for modules, _ in loras for n in modules})
    out: dict[str, torch.Tensor] = {}
    for name in tqdm(names, desc="svd merge"):
        present = [(modules[name], ratio) for modules, ratio in loras if name in modules]
        shapes = {(down.shape[1:], up.shape[0]) for (down, up, _), _ in present}
        if len(shapes) > 1:
            raise UserError(f"{name}: the files' modules have different shapes there; are they for one model?")
        total = sum(ratio * update_of(down, up, alpha).to(device, dtype) for (down, up, alpha), ratio in present)
        (like_down, like_up, _), _ = present[0]
        conv3 = like_down.ndim == 4 and like_down.shape[2:] != (1, 1)
        up2d, down2d, _ = factor(total, conv_rank if conv3 else rank)
        down, up = as_module_shapes(up2d, down2d, like_down, like_up)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    ratios = args.ratios or [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios: {len(ratios)} values for {len(args.models)} --models; give one per LoRA")
    if Path(args.save_to).resolve() in [Path(m).resolve() for m in args.models]:
        raise UserError(f"--save_to {args.save_to} is one of the inputs; write to a new file")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank / --new_conv_rank must be at least 1")
    read = [read_lora(path) for path in args.models]
    families = {lora_file_family(state) for state, _ in read} - {None}
    if len(families) > 1:
        raise UserError(f"--models: LoRAs of different model families ({', '.join(sorted(families))}) cannot be merged")
    strengths = block_strengths(args, next(iter(families), None))
    states = [s if b is None else scale_by_blocks(s, b, "sdxl" in families) for (s, _), b in zip(read, strengths)]
    loras = [(lora_modules(state, path), ratio) for state, path, ratio in zip(states, args.models, ratios)]
    merged = svd_merge(loras, args.new_rank, args.new_conv_rank or args.new_rank, args.device,
                       PRECISIONS[args.precision])
    dtype = PRECISIONS[args.save_precision or "float"]
    merged = {k: v.to(dtype) for k, v in merged.items()}
    first = read[0][1]
    meta = {"ss_network_module": first.get("ss_network_module", "networks.lora"),
            "ss_network_dim": str(args.new_rank), "ss_network_alpha": str(float(args.new_rank))}
    if not args.no_metadata:
        meta.update({k: first[k] for k in ("ss_base_model_version", "ss_v2") if k in first})
        meta["ss_merged_from"] = json.dumps([{"file": Path(p).name, "ratio": r} for p, r in zip(args.models, ratios)])
        meta["ss_training_comment"] = f"SVD merge at rank {args.new_rank} of " + \
            ", ".join(f"{Path(p).name} x {r}" for p, r in zip(args.models, ratios))
    write_lora(merged, args.save_to, meta)
    print(f"saved {args.save_to}: {len(merged) // 3} modules")


if __name__ == "__main__":
    run_cli(main)
