"""ONNX image taggers (SmilingWolf's WD v2/v3 and models in the ``tag_mapping.json`` layout) on onnxruntime.

A tagger folder holds ``model.onnx`` and its tag list: ``selected_tags.csv`` (``tag_id,name,category,count``,
one row per model output, the category a Danbooru number: 9 rating, 0 general, 4 character, 3 copyright,
1 artist, 5 meta) or ``tag_mapping.json`` (``{"idx_to_tag": ..., "tag_to_category": ...}`` or
``{"<index>": {"tag": ..., "category": "General"}}``). Each output's category comes from its own row; kohya
assumed four ratings first and all general tags before the characters.

What the model expects is read from its input: the layout (NHWC or NCHW: where the axis of 3 is), the
square size, a fixed batch size and the element type. What no graph records is the pixel convention of
each layout's makers, kept here as data (:data:`PROFILES`): WD takes BGR in 0-255 and outputs
probabilities; the tag_mapping.json taggers take BGR scaled to [-1, 1] and output logits. Both pad the
image to a square with white first.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from library.utils.errors import UserError
from library.utils.files import read_user_text

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CSV_FILE = "selected_tags.csv"
JSON_FILE = "tag_mapping.json"
DANBOORU_CATEGORIES = {"9": "rating", "0": "general", "1": "artist", "3": "copyright", "4": "character", "5": "meta"}
CATEGORIES = ("rating", "general", "character", "copyright", "artist", "meta", "model", "quality")
DEFAULT_SIZE = 448  # WD's input side, used only when a graph leaves it dynamic


@dataclass(frozen=True)
class PixelProfile:
    """How a family of taggers wants its pixels: channel order, value range, and whether the
    outputs still need a sigmoid."""

    bgr: bool
    scale: str  # "0-255" or "-1-1"
    logits: bool


PROFILES = {CSV_FILE: PixelProfile(bgr=True, scale="0-255", logits=False),
            JSON_FILE: PixelProfile(bgr=True, scale="-1-1", logits=True)}


@dataclass(frozen=True)
class TagList:
    """The model's outputs: a name and a category (one of :data:`CATEGORIES`) per output index."""

    names: tuple[str, ...]
    categories: tuple[str, ...]

    def indices(self, category: str) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c == category]


def read_csv_tags(path: Path) -> TagList:
    rows = list(csv.reader(read_user_text(path, "tagger tags file").splitlines()))
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        found = rows[0] if rows else "nothing"
        raise UserError(f"{path}: expected the header tag_id,name,category[,count], found {found}")
    names, categories, unknown = [], [], set()
    for n, row in enumerate(rows[1:], 2):
        if len(row) < 3:
            raise UserError(f"{path}:{n}: a row needs tag_id,name,category; found {row}")
        category = DANBOORU_CATEGORIES.get(row[2].strip())
        if category is None:
            unknown.add(row[2].strip())
            category = "general"
        names.append(row[1])
        categories.append(category)
    if unknown:
        logger.warning("%s: categories %s are not rating/general/character/copyright/artist/meta; "
                       "their tags use the general threshold", path, ", ".join(sorted(unknown)))
    return TagList(tuple(names), tuple(categories))


def read_json_tags(path: Path) -> TagList:
    try:
        data = json.loads(read_user_text(path, "tagger tags file"))
        if isinstance(data, dict) and "idx_to_tag" in data:
            by_index = {int(k): v for k, v in data["idx_to_tag"].items()}
            category_of = data.get("tag_to_category", {})
            entries = {i: (tag, category_of.get(tag, "General")) for i, tag in by_index.items()}
        else:
            entries = {int(k): (v["tag"], v.get("category", "General")) for k, v in data.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a tag mapping ({{\"idx_to_tag\", \"tag_to_category\"}} or "
                        f"{{index: {{\"tag\", \"category\"}}}}): {exc}") from exc
    if sorted(entries) != list(range(len(entries))):
        raise UserError(f"{path}: the tag indices must run 0..{len(entries) - 1} without gaps")
    names = tuple(entries[i][0] for i in range(len(entries)))
    categories = tuple(str(entries[i][1]).lower() if str(entries[i][1]).lower() in CATEGORIES else "general"
                       for i in range(len(entries)))
    return TagList(names, categories)


def tags_file(folder: Path) -> Path | None:
    for name in (CSV_FILE, JSON_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_files(folder: Path) -> list[str]:
    missing = [] if (folder / MODEL_FILE).is_file() else [MODEL_FILE]
    if tags_file(folder) is None:
        missing.append(f"{CSV_FILE} (or {JSON_FILE})")
    return missing


def locate_tagger(model_dir: str, repo_id: str, force_download: bool) -> Path:
    """The folder holding the tagger: ``model_dir`` itself when it has the files, else kohya's
    ``model_dir/<repo_id with / as _>``, downloaded from the hub when files are missing (or with
    ``force_download``) unless the hub is offline."""
    direct = Path(model_dir)
    lacking = missing_files(direct)
    if not force_download and len(lacking) < 2:  # model_dir holds a tagger, or part of one
        if lacking:
            raise UserError(f"tagger folder {direct}: missing {lacking[0]}; copy it there from the model's repo "
                            f"(or give --model_dir the folder that holds both files)")
        return direct
    folder = direct / repo_id.replace("/", "_")
    missing = missing_files(folder)
    if missing or force_download:
        _download(repo_id, folder, missing, force_download)
    return folder


def _download(repo_id: str, folder: Path, missing: list[str], force: bool) -> None:
    where = f"{folder} (or put the files in --model_dir itself)"
    if (folder / "saved_model.pb").is_file() and not (folder / MODEL_FILE).is_file():
        raise UserError(f"{folder} holds the Keras version of the tagger, which is not supported here; "
                        f"download {MODEL_FILE} from {repo_id} into it (WD v2 and v3 repos have one)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"tagger folder {where}: missing {', '.join(missing)}; the hub is offline "
                        f"(HF_HUB_OFFLINE=1), so download {repo_id} there first")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, MODEL_FILE, local_dir=folder, force_download=force)
        try:
            hf_hub_download(repo_id, CSV_FILE, local_dir=folder, force_download=force)
        except Exception:  # noqa: BLE001 - the tag_mapping.json layout has no CSV
            hf_hub_download(repo_id, JSON_FILE, local_dir=folder, force_download=force)
    except Exception as exc:  # noqa: BLE001 - network, authentication and missing-repo errors vary
        raise UserError(f"tagger folder {where}: missing {', '.join(missing) or 'nothing'}, and downloading "
                        f"{repo_id} failed ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class InputSpec:
    """What the graph's image input looks like."""

    name: str
    layout: str  # "NHWC" or "NCHW"
    size: int
    fixed_batch: int | None
    dtype: type


def input_spec(session) -> InputSpec:
    first = session.get_inputs()[0]
    shape = list(first.shape)
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise UserError(f"the tagger's input {first.name} has shape {shape}: expected an image batch "
                        "[N, H, W, 3] or [N, 3, H, W]")
    layout = "NHWC" if shape[3] == 3 else "NCHW"
    sides = shape[1:3] if layout == "NHWC" else shape[2:4]
    if all(isinstance(s, int) and s > 0 for s in sides):
        if sides[0] != sides[1]:
            raise UserError(f"the tagger's input {first.name} is {sides[1]}x{sides[0]}: only square inputs are "
                            "supported")
        size = sides[0]
    else:
        size = DEFAULT_SIZE
        logger.info("the tagger's input size is dynamic; using %d", size)
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    dtype = np.float16 if "float16" in first.type else np.float32
    return InputSpec(first.name, layout, size, batch, dtype)


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """The image centred on a white square (what the taggers were trained on)."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return np.pad(rgb, ((top, side - height - top), (left, side - width - left), (0, 0)), constant_values=255)


class OnnxTagger:
    """One tagger: its tags, its input, and probabilities for a batch of prepared images."""

    def __init__(self, folder: Path, providers: list[str] | None = None):
        import onnxruntime as ort

        missing = missing_files(folder)
        if missing:
            raise UserError(f"tagger folder {folder}: missing {', '.join(missing)}")
        tags_path = tags_file(folder)
        self.tags = read_csv_tags(tags_path) if tags_path.name == CSV_FILE else read_json_tags(tags_path)
        self.profile = PROFILES[tags_path.name]
        available = ort.get_available_providers()
        chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for broken files
            raise UserError(f"{folder / MODEL_FILE}: onnxruntime cannot load it ({exc})") from exc
        self.spec = input_spec(self.session)
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags.names):
            raise UserError(f"{tags_path} lists {len(self.tags.names)} tags but {folder / MODEL_FILE} has {outputs} "
                            "outputs: the two files are from different models")
        logger.info("tagger %s: %d tags, input %s %dx%d%s, on %s", folder, len(self.tags.names), self.spec.layout,
                    self.spec.size, self.spec.size, f", batch {self.spec.fixed_batch}" if self.spec.fixed_batch else "",
                    self.session.get_providers()[0])

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """One RGB uint8 image as this model's input (without the batch axis)."""
        square = pad_to_square(rgb)
        side = self.spec.size
        shrink = square.shape[0] > side
        image = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        image = image.astype(np.float32)
        if self.profile.bgr:
            image = image[:, :, ::-1]
        if self.profile.scale == "-1-1":
            image = image / 127.5 - 1.0
        if self.spec.layout == "NCHW":
            image = image.transpose(2, 0, 1)
        return np.ascontiguousarray(image, dtype=self.spec.dtype)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """[len(images), tags] probabilities; a graph with a fixed batch gets chunks of that size,
        the last one padded with copies of its last image (whose outputs are dropped)."""
        step = self.spec.fixed_batch or len(images)
        out = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            padded = chunk + [chunk[-1]] * (step - len(chunk))
            result = self.session.run(None, {self.spec.name: np.stack(padded)})[0][: len(chunk)]
            out.append(result.astype(np.float32))
        probs = np.concatenate(out)
        return 1.0 / (1.0 + np.exp(-np.clip(probs, -30, 30))) if self.profile.logits else probs
