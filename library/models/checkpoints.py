"""Single-file checkpoints of any family as a whole, for the file tools (merging a LoRA into a
model, converting): read a file into its modules, whatever its layout, and write it back in the
same layout. The layout is found from the keys; the loaders and savers are the trainers' own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from library.models.sd3_loading import (
    SD3Components,
    load_sd3_model,
    load_sd3_single_file,
    save_sd3_diffusers,
    save_sd3_single_file,
)
from library.models.sd_loading import (
    SDComponents,
    detect_layout,
    load_sd_model,
    load_sd_single_file,
    read_state_dict,
    save_sd_diffusers,
    save_sd_single_file,
)
from library.models.sdxl_loading import (
    SDXLComponents,
    load_sdxl_model,
    load_sdxl_single_file,
    save_sdxl_diffusers,
    save_sdxl_single_file,
)
from library.utils.errors import UserError

LAYOUT_TITLES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3"}


@dataclass(frozen=True)
class _LayoutIO:
    """How one layout is read and written (the trainers' own loaders and savers)."""

    read_file: Callable  # (path, dtype, device) -> parts, without tokenizers
    write_file: Callable  # (path, parts, dtype, metadata, progress)
    read_any: Callable  # (single file or folder, dtype, tokenizer_dir) -> parts with tokenizers
    write_folder: Callable  # (folder, parts, dtype, prediction_type)


def _write_sd3_file(path, parts, dtype, metadata, progress) -> None:
    if not str(path).endswith(".safetensors"):
        raise UserError(f"{path}: SD3 checkpoints are written as .safetensors")
    save_sd3_single_file(path, parts, dtype, metadata=metadata, progress=progress)


def _write_sd_folder(folder, parts, dtype, prediction_type) -> None:
    save_sd_diffusers(folder, parts, dtype, prediction_type=prediction_type or parts.prediction_type or "epsilon")


_SD = _LayoutIO(lambda path, dtype, device: load_sd_single_file(path, dtype, device=device, with_tokenizer=False),
                save_sd_single_file,
                lambda path, dtype, tok: load_sd_model(str(path), dtype, tok), _write_sd_folder)
_IO = {
    "sd1": _SD, "sd2": _SD,
    "sdxl": _LayoutIO(load_sdxl_single_file, save_sdxl_single_file,
                      lambda path, dtype, tok: load_sdxl_model(str(path), dtype, tok),
                      lambda folder, parts, dtype, _: save_sdxl_diffusers(folder, parts, dtype)),
    "sd3": _LayoutIO(lambda path, dtype, device: load_sd3_single_file(path, dtype, require_text_encoders=False,
                                                                      device=device),
                     _write_sd3_file, lambda path, dtype, tok: load_sd3_model(str(path), dtype, tok),
                     lambda folder, parts, dtype, _: save_sd3_diffusers(folder, parts, dtype)),
}


@dataclass
class Checkpoint:
    """A loaded model: its layout and modules (the parts say which is the denoiser and which text
    encoders are bundled, in the order LoRA files number them)."""

    layout: str  # "sd1", "sd2", "sdxl" or "sd3"
    parts: SDComponents | SDXLComponents | SD3Components
    path: str

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.parts.denoiser

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.parts.text_encoder_list

    def modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.parts.vae, *self.text_encoders]


def checkpoint_layout(path: str | os.PathLike) -> str:
    """The layout of a single file from its keys alone (safetensors: the header only)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                keys = dict.fromkeys(f.keys())
        except Exception as exc:  # safetensors' errors for a truncated or foreign file vary
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        keys = read_state_dict(path)
    layout = detect_layout(keys)
    if layout == "unknown":
        raise UserError(f"{path}: not an SD1/SD2, SDXL or SD3 single-file checkpoint (no known key layout)")
    return layout


def read_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    skeleton: bool = False) -> Checkpoint:
    """Load a single file of any family into diffusers/transformers modules (no tokenizers).
    ``skeleton``: the modules on the meta device, built from a safetensors header alone (no
    tensor is read), to check what will be merged into the model before loading it."""
    layout = checkpoint_layout(path)
    return Checkpoint(layout, _IO[layout].read_file(path, dtype, "meta" if skeleton else None), str(path))


def write_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None, progress: bool = False) -> None:
    """Write the modules back as a single file in the checkpoint's own layout (atomically,
    tensor by tensor; ``progress`` shows a bar of the bytes written)."""
    _IO[checkpoint.layout].write_file(path, checkpoint.parts, dtype, metadata, progress)


_PIPELINE_LAYOUTS = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}


def model_layout(path: str | os.PathLike) -> str:
    """The layout of a single file (from its keys) or of a diffusers folder (from model_index.json;
    SD2 from its text encoder's width)."""
    folder = Path(path)
    if not folder.is_dir():
        return checkpoint_layout(path)
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"{folder} is a folder but not a diffusers model (no model_index.json)")
    name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    if name in _PIPELINE_LAYOUTS:
        return _PIPELINE_LAYOUTS[name]
    if name != "StableDiffusionPipeline":
        raise UserError(f"{folder}: a {name or 'unknown'} pipeline; SD1.x/2.x, SDXL and SD3 folders are read")
    te = folder / "text_encoder" / "config.json"
    width = json.loads(te.read_text(encoding="utf-8")).get("hidden_size") if te.is_file() else None
    return "sd2" if width == 1024 else "sd1"


def read_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               tokenizer_dir: str | None = None) -> Checkpoint:
    """A single file or diffusers folder of any family, with its tokenizers (for writing a folder)."""
    layout = model_layout(path)
    return Checkpoint(layout, _IO[layout].read_any(path, dtype, tokenizer_dir), str(path))


def write_diffusers(checkpoint: Checkpoint, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                    prediction_type: str | None = None) -> None:
    """Write the model as a diffusers pipeline folder of its family (atomically)."""
    _IO[checkpoint.layout].write_folder(folder, checkpoint.parts, dtype, prediction_type)


def text_encoder_widths(path: str | os.PathLike) -> list[int] | None:
    """The token-embedding width of each bundled text encoder (in the family's order), read without
    loading a tensor: from a safetensors header or a diffusers folder's configs. None for what
    cannot be read that way (a ``.ckpt``, a hub id), whose widths are known only once loaded."""
    folder = Path(path)
    if folder.is_dir():
        configs = [folder / name / "config.json" for name in ("text_encoder", "text_encoder_2")]
        return [json.loads(c.read_text(encoding="utf-8"))["hidden_size"] for c in configs if c.is_file()] or None
    if not (folder.is_file() and folder.suffix == ".safetensors"):
        return None
    return [te.get_input_embeddings().weight.shape[1] for te in read_checkpoint(folder, skeleton=True).text_encoders]
