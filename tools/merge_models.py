"""Weighted merge of two or more checkpoints of one architecture (kohya's tools/merge_models.py and
its flags): every floating tensor becomes ``sum(ratio_i * tensor_i)``.

    python tools/merge_models.py --models a.safetensors b.safetensors --ratios 0.7 0.3 \
        --output merged.safetensors --saving_precision fp16

Tensors are read one at a time from each file (safetensors files are not loaded whole), so memory
stays near the size of the result. ``--unet_only`` merges the denoiser (``model.diffusion_model.``)
and copies the rest from the first model. Tensors not in every file, and integer buffers, come from
the first model and are counted in the summary. Without ``--ratios`` the models weigh equally;
ratios that do not sum to 1 scale the weights, with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.models.checkpoints import LAYOUT_TITLES, checkpoint_layout  # noqa: E402
from library.models.sd_loading import read_state_dict  # noqa: E402
from library.utils.errors import UserError, run_cli  # noqa: E402
from library.utils.files import save_torch  # noqa: E402
from library.utils.safetensors_io import save_safetensors  # noqa: E402

PRECISIONS = DTYPE_NAMES
DENOISER_PREFIX = "model.diffusion_model."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="weighted merge of checkpoints of one architecture")
    p.add_argument("--models", nargs="+", required=True, help="two or more single-file checkpoints")
    p.add_argument("--ratios", type=float, nargs="+", help="one weight per model (default: equal weights)")
    p.add_argument("--output", required=True, help="the merged checkpoint (.safetensors or .ckpt)")
    p.add_argument("--unet_only", action="store_true", help="merge only the denoiser; the rest from the first model")
    p.add_argument("--precision", choices=list(PRECISIONS), default="float", help="dtype the sums are made in")
    p.add_argument("--saving_precision", choices=list(PRECISIONS), default="float", help="dtype of the output")
    p.add_argument("--show_skipped", action="store_true", help="list the tensors copied from the first model")
    return p


def _check(args: argparse.Namespace) -> list[float]:
    if len(args.models) < 2:
        raise UserError("--models: give two or more checkpoints to merge")
    ratios = args.ratios or [1.0 / len(args.models)] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios: {len(ratios)} values for {len(args.models)} --models; give one per model")
    if Path(args.output).resolve() in [Path(m).resolve() for m in args.models]:
        raise UserError(f"--output {args.output} is one of the inputs; write to a new file (inputs are never changed)")
    layouts = {m: checkpoint_layout(m) for m in args.models}
    if len(set(layouts.values())) > 1:
        detail = ", ".join(f"{Path(m).name}: {LAYOUT_TITLES[lay]}" for m, lay in layouts.items())
        raise UserError(f"--models are of different architectures ({detail}); merge models of one architecture")
    if args.ratios and not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        print(f"warning: the ratios sum to {sum(ratios):g}, so the merged weights are scaled by that")
    return ratios


class _Reader:
    """Tensors of one file by key: safetensors lazily, pickles loaded once."""

    def __init__(self, path: str, stack: ExitStack):
        if path.endswith(".safetensors"):
            self._file = stack.enter_context(safe_open(path, framework="pt"))
            self.keys = list(self._file.keys())
            self.get = self._file.get_tensor
        else:
            state = read_state_dict(path)
            self.keys, self.get = list(state), state.__getitem__


def merge(args: argparse.Namespace, ratios: list[float]) -> dict[str, torch.Tensor]:
    work, save = PRECISIONS[args.precision], PRECISIONS[args.saving_precision]
    out, skipped = {}, []
    with ExitStack() as stack:
        readers = [_Reader(m, stack) for m in args.models]
        others = [set(r.keys) for r in readers[1:]]
        for key in tqdm(readers[0].keys, desc="merging"):
            first = readers[0].get(key)
            merged_here = first.is_floating_point() and all(key in keys for keys in others) and \
                (not args.unet_only or key.startswith(DENOISER_PREFIX))
            if not merged_here:
                out[key] = first.to(save) if first.is_floating_point() else first
                skipped.append(key)
                continue
            total = first.to(work) * ratios[0]
            for path, reader, ratio in zip(args.models[1:], readers[1:], ratios[1:]):
                other = reader.get(key)
                if other.shape != first.shape:
                    raise UserError(f"{key}: shape {tuple(other.shape)} in {path} vs {tuple(first.shape)} in "
                                    f"{args.models[0]}: not the same architecture")
                total += other.to(work) * ratio
            out[key] = total.to(save)
    print(f"merged {len(out) - len(skipped)} tensors; {len(skipped)} copied from the first model")
    if args.show_skipped:
        print("\n".join(f"  {k}" for k in skipped))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    ratios = _check(args)
    out = merge(args, ratios)
    recipe = json.dumps([{"model": Path(m).name, "ratio": r} for m, r in zip(args.models, ratios)] +
                        ([{"unet_only": True}] if args.unet_only else []))
    if args.output.endswith(".safetensors"):
        save_safetensors(out, args.output, {"merge_recipe": recipe}, model_hashes=True)
    else:
        save_torch({"state_dict": out}, args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    run_cli(main)
