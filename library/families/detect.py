"""Which family a model on disk belongs to, from the file's keys or the diffusers folder's index."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from library.families import LAYOUT_FAMILY, PIPELINE_FAMILY
from library.models.sd_loading import detect_layout, read_state_dict
from library.utils.errors import UserError


def family_of_model(path: str, flag: str) -> str | None:
    """The family name of a single file or diffusers folder; None when ``path`` is neither (a hub
    id). A file of no layout this project knows is refused, naming ``flag``."""
    p = Path(path)
    index = p / "model_index.json"
    if index.is_file():
        return PIPELINE_FAMILY.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""), "sd")
    if not p.is_file():
        return None
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), "pt") as f:
                layout = detect_layout(dict.fromkeys(f.keys()))
        except Exception as exc:  # noqa: BLE001 - safetensors' errors for foreign or truncated files vary
            raise UserError(f"{flag} {p}: not a readable safetensors file ({exc})") from exc
    else:
        layout = detect_layout(read_state_dict(p))
    if layout not in LAYOUT_FAMILY:
        raise UserError(f"{flag} {p}: not a Stable Diffusion checkpoint this script knows (SD1/SD2, SDXL, SD3)")
    return LAYOUT_FAMILY[layout]
