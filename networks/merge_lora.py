"""Merge LoRAs into a checkpoint, or into one LoRA (kohya's networks/merge_lora.py and its flags).

    python networks/merge_lora.py --sd_model model.safetensors --models a.safetensors b.safetensors \
        --ratios 0.8 0.5 --save_to merged.safetensors --save_precision fp16
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --concat \
        --save_to ab.safetensors

Works for SD1.x/2.x, SDXL and SD3 single files (the family is read from the files; LoRAs of
another family are refused before anything heavy is loaded). Into a checkpoint, each LoRA is
built on the model's modules by its family's network module and merged by that network's own
``merge_to`` (the maths the trainer and gen_img use; kohya, diffusers/PEFT-named files too);
the file is written back in its own layout. Without ``--sd_model`` the LoRAs are combined into one
file: ``--concat`` stacks the ranks (exact), the default adds same-rank factors as kohya does (see
:mod:`networks.lora_merge`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.families import FAMILIES, LAYOUT_FAMILY  # noqa: E402
from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.models.checkpoints import (  # noqa: E402
    LAYOUT_TITLES,
    checkpoint_layout,
    read_checkpoint,
    write_checkpoint,
)
from library.utils.errors import UserError, run_cli  # noqa: E402
from networks.base import NetworkAdapter, import_network_module  # noqa: E402
from networks.block_lr import parse_lbw  # noqa: E402
from networks.lora_merge import (  # noqa: E402
    lora_modules,
    merge_concat,
    merge_sum,
    read_lora,
    scale_by_blocks,
    write_lora,
)
from networks.lora_names import lora_file_family  # noqa: E402

PRECISIONS = DTYPE_NAMES
FAMILY_TITLES = {name: cls.title for name, (cls, _) in FAMILIES.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="merge LoRAs into a checkpoint or into one LoRA")
    p.add_argument("--sd_model", help="checkpoint to merge into (single file); without it the LoRAs become one LoRA")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files (.safetensors, .ckpt, .pt)")
    p.add_argument("--ratios", type=float, nargs="+", help="one strength per LoRA (default 1.0 each)")
    p.add_argument("--save_to", required=True, help="output file (.safetensors, .ckpt)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="dtype the model is held in while merging (default: the wider of the checkpoint's and the "
                        "saved dtype, so memory stays near one model); each layer's sum is computed in float32")
    p.add_argument("--save_precision", choices=list(PRECISIONS),
                   help="dtype of the saved file (default: the dtype of the checkpoint / first LoRA)")
    p.add_argument("--concat", action="store_true", help="LoRA into LoRA: stack the ranks (exact; ranks may differ)")
    p.add_argument("--shuffle", action="store_true", help="LoRA into LoRA without --concat: permute each file's ranks")
    p.add_argument("--device", default="cpu", help="where the merge into a checkpoint is computed (cpu, cuda)")
    p.add_argument("--no_metadata", action="store_true", help="write only the minimum metadata")
    p.add_argument("--v2", action="store_true", help="accepted for kohya's commands: SD2 is read from the file")
    p.add_argument("--lbws", nargs="+",
                   help="per-LoRA block strengths, one list per LoRA: [BASE,IN01,...] (17 or 26 values for SD1/SD2, "
                        "12 or 20 for SDXL)")
    return p


def _check_args(args: argparse.Namespace) -> list[float]:
    ratios = args.ratios or [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise UserError(f"--ratios: {len(ratios)} values for {len(args.models)} --models; give one per LoRA")
    inputs = [Path(p).resolve() for p in args.models + ([args.sd_model] if args.sd_model else [])]
    if Path(args.save_to).resolve() in inputs:
        raise UserError(f"--save_to {args.save_to} is one of the inputs; write to a new file (inputs are never "
                        "changed)")
    if args.shuffle and args.concat:
        raise UserError("--shuffle only changes the merge without --concat")
    if args.sd_model and (args.concat or args.shuffle):
        raise UserError("--concat / --shuffle are for merging LoRAs into one LoRA (without --sd_model)")
    return ratios


def _one_family(paths: list[str], states: list[dict]) -> str | None:
    found = {path: lora_file_family(state) for path, state in zip(paths, states)}
    named = {f for f in found.values() if f}
    if len(named) > 1:
        detail = ", ".join(f"{Path(p).name}: {FAMILY_TITLES[f]}" for p, f in found.items() if f)
        raise UserError(f"--models: LoRAs of different model families cannot be merged ({detail})")
    return next(iter(named), None)


def block_strengths(args, family: str | None) -> list[dict[str, float] | None]:
    """Each LoRA's --lbws strengths by block name (None: no block weights)."""
    if not args.lbws:
        return [None] * len(args.models)
    if len(args.lbws) != len(args.models):
        raise UserError(f"--lbws: {len(args.lbws)} lists for {len(args.models)} --models; give one per LoRA")
    if family == "sd3":
        raise UserError("--lbws: block weights are defined for SD1/SD2 and SDXL LoRAs (SD3 has none)")
    return [parse_lbw(text, family == "sdxl", f"--lbws ({Path(path).name})") for text, path in
            zip(args.lbws, args.models)]


def _file_dtype(path: str) -> torch.dtype:
    """The most common floating dtype of a safetensors file's tensors (float32 for pickles)."""
    if not path.endswith(".safetensors"):
        return torch.float32
    counts: dict[torch.dtype, int] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            kind = f.get_slice(key).get_dtype()
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(kind)
            if dtype is not None:
                counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _hold_dtype(args) -> torch.dtype:
    """The dtype the model is held in while merging: --precision, else the wider of the file's and
    the saved dtype (a half-precision file saved as float32 keeps the LoRA's full update)."""
    if args.precision:
        return PRECISIONS[args.precision]
    stored = _file_dtype(args.sd_model)
    saved = PRECISIONS[args.save_precision] if args.save_precision else stored
    if stored == saved or torch.finfo(stored).bits != torch.finfo(saved).bits:
        return max(stored, saved, key=lambda d: torch.finfo(d).bits)
    return torch.float32  # fp16 <-> bf16: neither holds the other


def _fit(module, checkpoint, path: str, ratio: float, state: dict, blocks, sgm: bool):
    """The network of one LoRA file built on the checkpoint's modules, and its kohya-named weights
    (block strengths applied)."""
    tes = checkpoint.text_encoders
    te = tes[0] if len(tes) == 1 else tes
    network, weights = module.create_network_from_weights(ratio, path, None, te, checkpoint.denoiser,
                                                          weights_sd=state, for_inference=True)
    if blocks is not None:  # on kohya's names, which create_network_from_weights has given the weights
        weights = scale_by_blocks(weights, blocks, sgm)
    return network, te, weights


def _does_not_fit(path: str, args, exc: Exception) -> UserError:
    return UserError(f"--models {path}: its tensors do not fit {args.sd_model} "
                     f"({str(exc).splitlines()[-1].strip()})")


def merge_into_checkpoint(args, ratios: list[float], states: list[dict], family: str | None,
                          strengths: list) -> None:
    layout = checkpoint_layout(args.sd_model)
    if family is not None and LAYOUT_FAMILY[layout] != family:
        raise UserError(f"--models are {FAMILY_TITLES[family]} LoRAs, --sd_model {args.sd_model} is an "
                        f"{LAYOUT_TITLES[layout]} checkpoint")
    if args.v2 and layout != "sd2":
        raise UserError(f"--v2 was given but {args.sd_model} is an {LAYOUT_TITLES[layout]} checkpoint; remove --v2")
    save_dtype = PRECISIONS[args.save_precision] if args.save_precision else _file_dtype(args.sd_model)
    module = import_network_module(FAMILIES[LAYOUT_FAMILY[layout]][0].default_network_module)
    sgm = layout == "sdxl"
    # names and shapes checked on a skeleton built from the file's header: a LoRA for another model
    # stops here, before gigabytes are read
    skeleton = read_checkpoint(args.sd_model, skeleton=True)
    for path, ratio, state, blocks in zip(args.models, ratios, states, strengths):
        network, _, weights = _fit(module, skeleton, path, ratio, state, blocks, sgm)
        try:
            network.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # shapes of another model (an SD1 LoRA on an SD2 checkpoint)
            raise _does_not_fit(path, args, exc) from exc
    del skeleton
    checkpoint = read_checkpoint(args.sd_model, _hold_dtype(args))
    for m in checkpoint.modules():
        m.to(args.device)
    for path, ratio, state, blocks in tqdm(list(zip(args.models, ratios, states, strengths)), desc="merging",
                                           unit="LoRA"):
        network, te, weights = _fit(module, checkpoint, path, ratio, state, blocks, sgm)
        try:  # each layer's sum is computed in float32 and rounded once to the held dtype
            NetworkAdapter(network, "generate").merge_to(te, checkpoint.denoiser, weights, torch.float32,
                                                         args.device)
        except RuntimeError as exc:
            raise _does_not_fit(path, args, exc) from exc
        del network, weights
    for m in checkpoint.modules():
        m.to("cpu")
    trail = [{"file": Path(p).name, "ratio": r} for p, r in zip(args.models, ratios)]
    metadata = None if args.no_metadata else {"merged_loras": json.dumps(trail)}
    write_checkpoint(checkpoint, args.save_to, save_dtype, metadata, progress=True)
    print(f"saved {args.save_to}: {', '.join(f'{Path(p).name} x {r}' for p, r in zip(args.models, ratios))}")


def merge_into_lora(args, ratios: list[float], states: list[dict], metas: list[dict], family: str | None,
                    strengths: list) -> None:
    first = next(iter(states[0].values())).dtype  # the saved dtype unless --save_precision
    compute = PRECISIONS[args.precision or "float"]  # the LoRAs are small: computed in float32 by default
    states = [{k: v.to(compute) if v.is_floating_point() else v for k, v in s.items()} for s in states]
    states = [s if b is None else scale_by_blocks(s, b, family == "sdxl") for s, b in zip(states, strengths)]
    loras = [(lora_modules(state, path), ratio) for state, path, ratio in zip(states, args.models, ratios)]
    merged = merge_concat(loras) if args.concat else merge_sum(loras, shuffle=args.shuffle)
    dtype = PRECISIONS[args.save_precision] if args.save_precision else first
    merged = {k: v.to(dtype) for k, v in merged.items()}
    ranks = {v.shape[0] for k, v in merged.items() if k.endswith("lora_down.weight")}
    alphas = {float(v) for k, v in merged.items() if k.endswith(".alpha")}
    meta = {"ss_network_module": metas[0].get("ss_network_module", "networks.lora"),
            "ss_network_dim": str(max(ranks)) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic"}
    if not args.no_metadata:
        for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.sai_model_spec"):
            if key in metas[0]:
                meta[key] = metas[0][key]
        meta["ss_merged_from"] = json.dumps([{"file": Path(p).name, "ratio": r, "sshs_model_hash":
                                              m.get("sshs_model_hash")} for p, r, m in zip(args.models, ratios, metas)])
        meta["ss_training_comment"] = ("concatenated" if args.concat else "merged") + " from " + \
            ", ".join(f"{Path(p).name} x {r}" for p, r in zip(args.models, ratios))
    write_lora(merged, args.save_to, meta)
    print(f"saved {args.save_to}: {len(merged) // 3} modules, rank {'/'.join(map(str, sorted(ranks)))}")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    ratios = _check_args(args)
    read = [read_lora(path) for path in args.models]
    states, metas = [s for s, _ in read], [m for _, m in read]
    family = _one_family(args.models, states)
    strengths = block_strengths(args, family)
    if args.sd_model:
        merge_into_checkpoint(args, ratios, states, family, strengths)
    else:
        merge_into_lora(args, ratios, states, metas, family, strengths)


if __name__ == "__main__":
    run_cli(main)
