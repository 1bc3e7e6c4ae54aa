"""Change a LoRA's rank by SVD (kohya's networks/resize_lora.py and its flags).

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python networks/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module's update is factored again at the new rank (the best approximation of that rank; see
:mod:`networks.lora_resize`), with alpha set so its scale is unchanged. ``--verbose`` prints, per
module, the rank chosen and the share of the update's Frobenius norm kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.utils.errors import UserError, run_cli  # noqa: E402
from networks.lora_merge import lora_modules, read_lora, write_lora  # noqa: E402
from networks.lora_resize import DYNAMIC_METHODS, resize_module  # noqa: E402

PRECISIONS = DTYPE_NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="change a LoRA's rank by SVD")
    p.add_argument("--model", required=True, help="the LoRA to resize (kohya format)")
    p.add_argument("--save_to", required=True, help="output file (.safetensors, .ckpt, .pt)")
    p.add_argument("--new_rank", type=int, required=True, help="the new rank (with --dynamic_method: the largest)")
    p.add_argument("--new_conv_rank", type=int, help="the new rank of 3x3 convolution modules (default --new_rank)")
    p.add_argument("--dynamic_method", choices=DYNAMIC_METHODS,
                   help="choose each module's rank from its singular values")
    p.add_argument("--dynamic_param", type=float, help="sv_ratio: s_max / s limit; sv_fro, sv_cumulative: share kept")
    p.add_argument("--save_precision", choices=list(PRECISIONS), help="dtype of the saved file (default: the input's)")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    p.add_argument("--verbose", action="store_true", help="the rank and kept Frobenius norm of every module")
    return p


def _check(args: argparse.Namespace, modules: dict) -> None:
    if Path(args.save_to).resolve() == Path(args.model).resolve():
        raise UserError(f"--save_to {args.save_to} is the input file; write to a new file (inputs are never changed)")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise UserError("--new_rank / --new_conv_rank must be at least 1")
    if args.dynamic_method and args.dynamic_param is None:
        raise UserError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
    if args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
        raise UserError(f"--dynamic_param {args.dynamic_param}: {args.dynamic_method} keeps a share, in (0, 1]")
    if args.dynamic_method == "sv_ratio" and args.dynamic_param < 1:
        raise UserError(f"--dynamic_param {args.dynamic_param}: sv_ratio is s_max / s, at least 1")
    top = max(down.shape[0] for down, _, _ in modules.values())
    if not args.dynamic_method and args.new_rank > top:
        raise UserError(f"--new_rank {args.new_rank} is above the file's rank {top}: SVD cannot add information; "
                        "give a rank at most that")


def resize(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    state, metadata = read_lora(args.model, "--model")
    modules = lora_modules(state, args.model)
    _check(args, modules)
    dtype = PRECISIONS[args.save_precision] if args.save_precision else next(iter(state.values())).dtype
    out, ranks, kept = {}, [], []
    for name, (down, up, alpha) in tqdm(modules.items(), desc="resizing", disable=args.verbose):
        conv3 = down.ndim == 4 and down.shape[2:] != (1, 1)
        limit = (args.new_conv_rank or args.new_rank) if conv3 else args.new_rank
        r = resize_module(down, up, alpha, limit, args.dynamic_method, args.dynamic_param, args.device)
        out[f"{name}.lora_down.weight"] = r.down.to(dtype)
        out[f"{name}.lora_up.weight"] = r.up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(r.alpha, dtype=dtype)
        ranks.append(r.down.shape[0])
        kept.append(r.kept_fro)
        if args.verbose:
            print(f"{name}: rank {down.shape[0]} -> {r.down.shape[0]}, Frobenius norm kept {r.kept_fro:.1%}")
    print(f"{len(ranks)} modules: ranks {min(ranks)}-{max(ranks)}, Frobenius norm kept {min(kept):.1%} (lowest) "
          f"{sum(kept) / len(kept):.1%} (mean)")
    _save(args, out, metadata, ranks)
    return out


def _save(args, out: dict, metadata: dict, ranks: list[int]) -> None:
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    dynamic = len(set(ranks)) > 1
    meta["ss_network_dim"] = "Dynamic" if dynamic else str(ranks[0])
    alphas = {float(v) for k, v in out.items() if k.endswith(".alpha")}
    meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    how = f"dynamic resize with {args.dynamic_method} {args.dynamic_param}" if args.dynamic_method else \
        f"resized to rank {args.new_rank}"
    comment = metadata.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{how} from {Path(args.model).name}. {comment}".strip()
    write_lora(out, args.save_to, meta)
    print(f"saved {args.save_to}")


def main(argv: list[str] | None = None) -> None:
    resize(parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
