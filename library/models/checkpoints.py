"""Single-file checkpoints of any family as a whole, for the file tools (merging a LoRA into a
model, converting): read a file into its modules, whatever its layout, and write it back in the
same layout. The layout is found from the keys; the loaders and savers are the trainers' own.
"""

from __future__ import annotations

import json
import os
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


@dataclass
class Checkpoint:
    """A loaded single file: its layout and modules; ``text_encoders`` in the order LoRA files
    number them (``lora_te``/``lora_te1``, ``lora_te2``, ``lora_te3``), bundled ones only."""

    layout: str  # "sd1", "sd2", "sdxl" or "sd3"
    parts: SDComponents | SDXLComponents | SD3Components
    path: str

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.parts.transformer if self.layout == "sd3" else self.parts.unet

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        p = self.parts
        if self.layout in ("sd1", "sd2"):
            return [p.text_encoder]
        if self.layout == "sdxl":
            return [p.text_encoder_1, p.text_encoder_2]
        return [m for m in (p.clip_l, p.clip_g, p.t5xxl) if m is not None]

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


def read_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a single file of any family into diffusers/transformers modules (no tokenizers)."""
    layout = checkpoint_layout(path)
    if layout in ("sd1", "sd2"):
        parts = load_sd_single_file(path, dtype, with_tokenizer=False)
    elif layout == "sdxl":
        parts = load_sdxl_single_file(path, dtype)
    else:
        parts = load_sd3_single_file(path, dtype, require_text_encoders=False)
    return Checkpoint(layout, parts, str(path))


def write_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
    """Write the modules back as a single file in the checkpoint's own layout (atomically)."""
    if checkpoint.layout in ("sd1", "sd2"):
        save_sd_single_file(path, checkpoint.parts, dtype, metadata)
    elif checkpoint.layout == "sdxl":
        save_sdxl_single_file(path, checkpoint.parts, dtype, metadata)
    else:
        if not str(path).endswith(".safetensors"):
            raise UserError(f"{path}: SD3 checkpoints are written as .safetensors")
        save_sd3_single_file(path, checkpoint.parts, dtype, metadata=metadata)


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
    if layout in ("sd1", "sd2"):
        parts = load_sd_model(str(path), dtype, tokenizer_dir)
    elif layout == "sdxl":
        parts = load_sdxl_model(str(path), dtype, tokenizer_dir)
    else:
        parts = load_sd3_model(str(path), dtype, tokenizer_dir)
    return Checkpoint(layout, parts, str(path))


def write_diffusers(checkpoint: Checkpoint, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                    prediction_type: str | None = None) -> None:
    """Write the model as a diffusers pipeline folder of its family (atomically)."""
    if checkpoint.layout in ("sd1", "sd2"):
        kind = prediction_type or checkpoint.parts.prediction_type or "epsilon"
        save_sd_diffusers(folder, checkpoint.parts, dtype, prediction_type=kind)
    elif checkpoint.layout == "sdxl":
        save_sdxl_diffusers(folder, checkpoint.parts, dtype)
    else:
        save_sd3_diffusers(folder, checkpoint.parts, dtype)
