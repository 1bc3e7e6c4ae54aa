"""Offline-first tokenizer lookup for every text encoder the families use.

For a checkpoint file, each tokenizer is looked for in ``--tokenizer_cache_dir`` (in the folder
named below, or the cache folder itself for the first tokenizer), then in that folder next to the
checkpoint (the diffusers folder names), then in the Hugging Face cache (the hub when online). One
message names every place tried when none has it. transformers 5 returns an empty tokenizer,
without an error, for a hub id that is neither cached nor reachable: that counts as not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast

from library.utils.errors import UserError


@dataclass(frozen=True)
class TokenizerSpec:
    folder: str  # its diffusers folder name
    hub_id: str
    subfolder: str | None
    kind: str  # "clip" or "t5"
    pad_token: str | None = None  # OpenCLIP-G pads with "!" (id 0), as kohya and SDXL/SD3 expect


SPECS = {
    "clip_l": TokenizerSpec("tokenizer", "openai/clip-vit-large-patch14", None, "clip"),
    "sd2": TokenizerSpec("tokenizer", "stabilityai/stable-diffusion-2", "tokenizer", "clip"),
    "clip_g": TokenizerSpec("tokenizer_2", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None, "clip", "!"),
    "t5xxl": TokenizerSpec("tokenizer_3", "google/t5-v1_1-xxl", None, "t5"),
}
_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


def _load(spec: TokenizerSpec, source: str, **kwargs):
    if spec.pad_token:
        kwargs["pad_token"] = spec.pad_token
    if spec.kind == "t5":
        return T5TokenizerFast.from_pretrained(source, **kwargs)
    return CLIPTokenizer.from_pretrained(source, **kwargs)


def resolve_tokenizer(name: str, ckpt: Path, tokenizer_dir: str | None):
    """The tokenizer ``name`` (a key of :data:`SPECS`) for the checkpoint ``ckpt``."""
    spec = SPECS[name]
    candidates = []
    if tokenizer_dir:
        candidates.append(Path(tokenizer_dir) / spec.folder)
        if spec.folder == "tokenizer":
            candidates.append(Path(tokenizer_dir))
    candidates.append(Path(ckpt).parent / spec.folder)
    for cand in candidates:
        if any((cand / f).is_file() for f in _FILES):
            return _load(spec, str(cand))
    problem: Exception | None = None
    try:
        tokenizer = _load(spec, spec.hub_id, **({"subfolder": spec.subfolder} if spec.subfolder else {}))
        if len(tokenizer) > 256:
            return tokenizer
    except Exception as exc:  # noqa: BLE001 - any failure means the same to the user
        problem = exc
    raise UserError(f"no {name} tokenizer found for {ckpt}: looked in {', '.join(map(str, candidates))} and the "
                    f"Hugging Face cache for {spec.hub_id}. Put its files (tokenizer.json, or vocab.json + "
                    f"merges.txt, or spiece.model) in a '{spec.folder}' folder next to the checkpoint or under "
                    f"--tokenizer_cache_dir, or go online once so {spec.hub_id} is cached.") from problem


def model_tokenizers(name_or_path: str, tokenizer_dir: str | None, names: tuple[str, ...]) -> list:
    """A model's tokenizers without its weights (for checks before loading): for a single file,
    each of ``names`` (keys of :data:`SPECS`) found as :func:`resolve_tokenizer` finds it; for a
    diffusers folder or hub id, its tokenizer subfolders."""
    path = Path(name_or_path)
    if path.is_file():
        return [resolve_tokenizer(name, path, tokenizer_dir) for name in names]
    try:
        return [_load(SPECS[name], name_or_path, subfolder=SPECS[name].folder) for name in names]
    except (OSError, ValueError) as exc:
        raise UserError(f"{name_or_path}: its tokenizers could not be read ({str(exc).splitlines()[0]})") from exc
