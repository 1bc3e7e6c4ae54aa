"""A LoRA from the difference of two checkpoints (kohya's networks/extract_lora_from_models.py and
flags): for every module a LoRA of the family's network would wrap, ``tuned - original`` is
factored at ``--dim`` (``--conv_dim`` for 3x3 convolutions) by SVD, the best approximation of that
rank, with alpha = rank.

    python networks/extract_lora_from_models.py --model_org base.safetensors \
        --model_tuned finetuned.safetensors --save_to extracted.safetensors --dim 32 --conv_dim 16

``--clamp_quantile`` (0.99) clips the factors' largest entries to that quantile of their magnitudes
(kohya's guard against outliers; 1.0 keeps them). A text encoder whose weights differ by less than
``--min_diff`` everywhere is left out (the fine-tune did not train it). SD1.x/2.x, SDXL and SD3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.families import FAMILIES, LAYOUT_FAMILY  # noqa: E402
from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.models.checkpoints import LAYOUT_TITLES, checkpoint_layout, read_checkpoint  # noqa: E402
from library.utils.errors import UserError, run_cli  # noqa: E402
from networks.base import import_network_module  # noqa: E402
from networks.lora_merge import write_lora  # noqa: E402
from networks.lora_resize import as_module_shapes, factor  # noqa: E402

PRECISIONS = DTYPE_NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="extract a LoRA from the difference of two checkpoints")
    p.add_argument("--model_org", required=True, help="the original checkpoint (single file)")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned checkpoint (same architecture)")
    p.add_argument("--save_to", required=True, help="output LoRA (.safetensors, .ckpt, .pt)")
    p.add_argument("--dim", type=int, default=4, help="rank of the LoRA (4)")
    p.add_argument("--conv_dim", type=int, help="rank of 3x3 convolution modules (default: no conv LoRA)")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="clip factors at this quantile of |w| (1: off)")
    p.add_argument("--min_diff", type=float, default=0.01, help="a text encoder differing less is left out")
    p.add_argument("--load_precision", choices=list(PRECISIONS), help="dtype the models are loaded in (float)")
    p.add_argument("--save_precision", choices=list(PRECISIONS), help="dtype of the LoRA (default float)")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimum metadata")
    p.add_argument("--v2", action="store_true", help="checked against the files (SD2 is read from them)")
    p.add_argument("--sdxl", action="store_true", help="checked against the files (SDXL is read from them)")
    p.add_argument("--v_parameterization", action="store_true", help="recorded in the metadata (ss_v_parameterization)")
    return p


def _check(args: argparse.Namespace) -> str:
    layouts = {flag: checkpoint_layout(path) for flag, path in (("--model_org", args.model_org),
                                                                 ("--model_tuned", args.model_tuned))}
    org, tuned = layouts["--model_org"], layouts["--model_tuned"]
    if org != tuned:
        raise UserError(f"--model_org is an {LAYOUT_TITLES[org]} checkpoint, --model_tuned an {LAYOUT_TITLES[tuned]} "
                        "one: both must be the same architecture")
    for flag, wanted in (("--v2", "sd2"), ("--sdxl", "sdxl")):
        if getattr(args, flag[2:]) and org != wanted:
            raise UserError(f"{flag} was given but the checkpoints are {LAYOUT_TITLES[org]}; remove {flag}")
    inputs = {Path(args.model_org).resolve(), Path(args.model_tuned).resolve()}
    if Path(args.save_to).resolve() in inputs:
        raise UserError(f"--save_to {args.save_to} is one of the inputs; write to a new file")
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise UserError("--dim / --conv_dim must be at least 1")
    if not 0 < args.clamp_quantile <= 1:
        raise UserError(f"--clamp_quantile {args.clamp_quantile}: a quantile in (0, 1]")
    return org


def _network(module_name: str, checkpoint, dim: int, conv_dim: int | None):
    module = import_network_module(module_name)
    tes = checkpoint.text_encoders
    te = tes[0] if len(tes) == 1 else tes
    extra = {"conv_dim": str(conv_dim)} if conv_dim and module_name == "networks.lora" else {}
    if module_name == "networks.lora_sd3":
        extra["train_t5xxl"] = "True"
    return module.create_network(1.0, dim, float(dim), None, te, checkpoint.denoiser, **extra)


def _weight(lora) -> torch.Tensor:
    """The base weight a LoRA module updates, as (out, in * kernel), rows in the module's order."""
    bases = list(getattr(lora, "_orgs", None) or [lora.org_module])
    return torch.cat([b.weight.detach().float().flatten(1) for b in bases], 0)


def _clamped(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    if quantile >= 1:
        return up, down
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    limit = torch.quantile(values, quantile) if values.numel() <= 2**24 else values.kthvalue(
        max(1, int(quantile * values.numel()))).values
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def extract(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    layout = _check(args)
    dtype = PRECISIONS[args.load_precision or "float"]
    module_name = FAMILIES[LAYOUT_FAMILY[layout]][0].default_network_module
    original = read_checkpoint(args.model_org, dtype)
    org_net = _network(module_name, original, args.dim, args.conv_dim)
    tuned_net = _network(module_name, read_checkpoint(args.model_tuned, dtype), args.dim, args.conv_dim)
    tuned = {m.lora_name: m for m in tuned_net.all_loras()}
    diffs = {m.lora_name: (m, (_weight(tuned[m.lora_name]) - _weight(m)).to(args.device)) for m in org_net.all_loras()}
    for index in sorted(set(org_net.encoder_of.values())):  # each text encoder: trained by the fine-tune?
        names = [n for n, e in org_net.encoder_of.items() if e == index and n in diffs]
        largest = max((float(diffs[n][1].abs().max()) for n in names), default=0.0)
        if largest < args.min_diff:
            print(f"text encoder {index + 1}: differs by at most {largest:.2e} (below --min_diff): left out")
            for n in names:
                del diffs[n]
    out: dict[str, torch.Tensor] = {}
    for name, (lora, diff) in tqdm(diffs.items(), desc="extracting"):
        conv3 = lora.lora_down.weight.ndim == 4 and lora.lora_down.weight.shape[2:] != (1, 1)
        up, down, _ = factor(diff, (args.conv_dim or args.dim) if conv3 else args.dim)
        up, down = _clamped(up, down, args.clamp_quantile)
        if getattr(lora, "swap_out_halves", False):  # the file stores these rows as (b, a)
            up = _swap_halves(up)
        down, up = as_module_shapes(up, down, lora.lora_down.weight, lora.lora_up.weight)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    _save(args, out, layout, module_name, original.parts.base_model_version)
    return out


def _save(args, out: dict, layout: str, module_name: str, base_version: str) -> None:
    out = {k: v.to(PRECISIONS[args.save_precision or "float"]) for k, v in out.items()}
    meta = {"ss_network_module": module_name, "ss_network_dim": str(args.dim), "ss_network_alpha": str(float(args.dim)),
            "ss_v2": str(layout == "sd2"), "ss_base_model_version": base_version}
    if not args.no_metadata:
        meta["ss_training_comment"] = f"extracted: {Path(args.model_tuned).name} - {Path(args.model_org).name}"
        meta["ss_v_parameterization"] = str(args.v_parameterization)
        if args.conv_dim:
            meta["ss_network_args"] = f'{{"conv_dim": "{args.conv_dim}", "conv_alpha": "{float(args.conv_dim)}"}}'
    write_lora(out, args.save_to, meta)
    print(f"saved {args.save_to}: {len(out) // 3} modules")


def main(argv: list[str] | None = None) -> None:
    extract(parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
