"""Convert a model between a single file (original layout: what AUTOMATIC1111 and ComfyUI load) and a
diffusers folder (kohya's tools/convert_diffusers20_original_sd.py and its flags), for SD1.x/2.x,
SDXL and SD3; the direction follows from the arguments.

    python tools/convert_diffusers20_original_sd.py model.safetensors out_folder --reference_model ref_folder
    python tools/convert_diffusers20_original_sd.py diffusers_folder model.safetensors --save_precision_as fp16

A diffusers folder needs tokenizers: they are looked up next to the file, under
``--tokenizer_cache_dir``, in ``--reference_model`` (a diffusers folder, or a hub id when online or
cached) or in the Hugging Face cache. ``--reference_model`` also gives the folder its scheduler
config. Folders are written with safetensors weights (``--use_safetensors`` is accepted: it is
always so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.models.checkpoints import (  # noqa: E402
    LAYOUT_TITLES,
    model_layout,
    read_model,
    write_checkpoint,
    write_diffusers,
)
from library.models.sd_loading import CHECKPOINT_SUFFIXES  # noqa: E402
from library.utils.errors import UserError, run_cli  # noqa: E402

PRECISIONS = DTYPE_NAMES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="single file <-> diffusers folder for SD1.x/2.x, SDXL and SD3")
    p.add_argument("model_to_load", help="a single file (.safetensors/.ckpt) or a diffusers folder")
    p.add_argument("model_to_save", help="a single file (by its suffix) or a folder")
    p.add_argument("--v1", action="store_true", help="checked against the model (the family is read from it)")
    p.add_argument("--v2", action="store_true", help="checked against the model (the family is read from it)")
    p.add_argument("--fp16", action="store_true", help="load and save in fp16")
    p.add_argument("--bf16", action="store_true", help="load and save in bf16")
    p.add_argument("--float", action="store_true", help="load and save in float32")
    p.add_argument("--save_precision_as", choices=list(PRECISIONS), help="dtype of the saved weights")
    p.add_argument("--epoch", type=int, help="stored as the checkpoint's epoch")
    p.add_argument("--global_step", type=int, help="stored as the checkpoint's global_step")
    p.add_argument("--reference_model", help="diffusers folder or hub id for the tokenizers and scheduler config")
    p.add_argument("--tokenizer_cache_dir", help="folder with the tokenizer files, for offline conversion")
    p.add_argument("--v_parameterization", action="store_true", help="the folder's scheduler predicts v")
    p.add_argument("--use_safetensors", action="store_true", help="accepted: folders are always written so")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="accepted: the projection type is read from the weights")
    return p


def _reference_folder(reference: str | None) -> Path | None:
    if reference is None:
        return None
    if Path(reference).is_dir():
        return Path(reference)
    try:
        from huggingface_hub import snapshot_download  # only a hub id needs it

        return Path(snapshot_download(reference, allow_patterns=["tokenizer*/*", "scheduler/*", "model_index.json"]))
    except Exception as exc:  # offline and not cached, or no such repository
        raise UserError(f"--reference_model {reference}: not a folder, and not available from the hub ({exc}); "
                        "give a local diffusers folder") from exc


def _use_reference_scheduler(config: Path, folder: Path) -> None:
    """The reference's scheduler config, and its class in model_index.json to match."""
    shutil.copy(config, folder / "scheduler" / "scheduler_config.json")
    name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if name:
        index["scheduler"] = ["diffusers", name]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _dtypes(args: argparse.Namespace) -> tuple[torch.dtype, torch.dtype | None]:
    chosen = [name for name in ("fp16", "bf16", "float") if getattr(args, name)]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join('--' + c for c in chosen)}: give one precision")
    load = PRECISIONS[chosen[0]] if chosen else torch.float32
    save = PRECISIONS[args.save_precision_as] if args.save_precision_as else (load if chosen else None)
    return load, save


def convert(args: argparse.Namespace) -> Path:
    source, target = Path(args.model_to_load), Path(args.model_to_save)
    if not source.exists():
        raise UserError(f"{source}: file or folder not found")
    if target.resolve() == source.resolve():
        raise UserError(f"{target} is the input; write to a new file or folder")
    layout = model_layout(source)
    for flag, wanted in (("v1", "sd1"), ("v2", "sd2")):
        if getattr(args, flag) and layout != wanted:
            raise UserError(f"--{flag} was given but {source} is an {LAYOUT_TITLES[layout]} model; remove --{flag}")
    to_file = target.suffix in CHECKPOINT_SUFFIXES
    if to_file and source.is_file():
        raise UserError(f"{source} and {target} are both single files; one side must be a diffusers folder")
    if not to_file and target.is_dir() and any(target.iterdir()):
        raise UserError(f"{target}: the folder exists and is not empty; give a new folder (nothing is overwritten "
                        "or deleted)")
    if not to_file and target.exists() and not target.is_dir():
        raise UserError(f"{target}: a file is in the way of the folder to write; give a new folder")
    load, save = _dtypes(args)
    reference = _reference_folder(args.reference_model)
    tokenizers = args.tokenizer_cache_dir or (str(reference) if reference else None)
    model = read_model(source, load, tokenizers)
    if to_file:
        meta = {k: str(getattr(args, k)) for k in ("epoch", "global_step") if getattr(args, k) is not None}
        write_checkpoint(model, target, save, meta or None, progress=True)
    else:
        write_diffusers(model, target, save, "v_prediction" if args.v_parameterization else None)
        if reference is not None and (reference / "scheduler" / "scheduler_config.json").is_file():
            _use_reference_scheduler(reference / "scheduler" / "scheduler_config.json", target)
    print(f"saved {target} ({LAYOUT_TITLES[layout]}, {'single file' if to_file else 'diffusers folder'})")
    return target


def main(argv: list[str] | None = None) -> None:
    convert(parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
