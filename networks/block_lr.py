"""Block-wise settings of UNet LoRA: learning rates (kohya's ``down_lr_weight``, ``mid_lr_weight``,
``up_lr_weight``, ``block_lr_zero_threshold`` network_args) and ranks (``block_dims``,
``block_alphas``, ``conv_block_dims``, ``conv_block_alphas``).

Blocks are numbered as kohya numbers them. SD1/SD2 (25 blocks): 0-11 the input side IN00-IN11
(``down_blocks_i_{resnets,attentions}_j`` is block 1 + 3i + j, its downsampler 3 + 3i), 12 the
middle, 13-24 the output side OUT00-OUT11. SDXL (23 blocks, SGM names): 0 the embeddings, 1-9
``input_blocks_0-8``, 10-12 ``middle_block_0-2``, 13-21 ``output_blocks_0-8``, 22 the output.
A weight multiplies the UNet learning rate of its block; a block whose weight is 0 (or at most
``block_lr_zero_threshold``) gets no LoRA at all.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from library.utils.errors import UserError

logger = logging.getLogger(__name__)

_DIFFUSERS_BLOCK = re.compile(r"lora_unet_(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
# (blocks per side, middle blocks) and whether the list has an embedding and an output entry
_LAYOUTS = {False: (12, 1, False), True: (9, 3, True)}
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_index(lora_name: str, sgm: bool) -> int:
    """The kohya block number of a UNet LoRA module name (-1 for text-encoder or unknown names)."""
    if sgm:
        m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", lora_name)
        if not m:
            return -1
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))
    if lora_name.startswith("lora_unet_mid_block_"):
        return 12
    m = _DIFFUSERS_BLOCK.search(lora_name)
    if not m:
        return -1
    side, level, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    within = 2 if kind in ("upsamplers", "downsamplers") else index
    return 1 + 3 * level + within if side == "down" else 13 + 3 * level + within


def preset(name_with_base: str, length: int) -> list[float]:
    """kohya's named curves over ``length`` blocks, optionally ``+base`` added (``cosine+0.5``)."""
    name, _, base = name_with_base.partition("+")
    try:
        offset = float(base) if base else 0.0
    except ValueError as exc:
        raise UserError(f"--network_args: '{name_with_base}': the part after '+' must be a number") from exc
    ramp = [i / (length - 1) for i in range(length)]
    curves = {"cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
              "sine": [math.sin(math.pi * r / 2) for r in ramp],
              "linear": ramp, "reverse_linear": list(reversed(ramp)), "zeros": [0.0] * length}
    if name not in curves:
        raise UserError(f"--network_args: unknown lr weight preset '{name}' (choose {', '.join(PRESETS)} or give "
                        "comma-separated numbers)")
    return [v + offset for v in curves[name]]


def _values(key: str, text: str | None, length: int) -> list[float] | None:
    if text is None:
        return None
    if text.split("+")[0] in PRESETS:
        values = preset(text, length)
    else:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise UserError(f"--network_args {key}={text}: expected comma-separated numbers or a preset "
                            f"({', '.join(PRESETS)}, optionally +base)") from exc
    if len(values) != length:
        logger.warning("%s has %d values; this model has %d blocks on that side: %s", key, len(values), length,
                       "extra values are ignored" if len(values) > length else "missing ones are 1.0")
    return (values + [1.0] * length)[:length]


def block_lr_weights(args: dict[str, str], sgm: bool) -> list[float] | None:
    """One learning-rate multiplier per block, or None when no block weights were given."""
    if not any(k in args for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        return None
    side, mid, ends = _LAYOUTS[sgm]
    down = _values("down_lr_weight", args.get("down_lr_weight"), side) or [1.0] * side
    middle = _values("mid_lr_weight", args.get("mid_lr_weight"), mid) or [1.0] * mid
    up = _values("up_lr_weight", args.get("up_lr_weight"), side) or [1.0] * side
    try:
        threshold = float(args.get("block_lr_zero_threshold", 0.0))
    except ValueError as exc:
        raise UserError("--network_args block_lr_zero_threshold: expected a number") from exc
    weights = [w if w > threshold else 0.0 for w in down + middle + up]
    return [1.0] + weights + [1.0] if ends else weights


def block_count(sgm: bool) -> int:
    """Blocks in kohya's numbering: 25 for SD1/SD2, 23 for SDXL (with its embedding and output entries)."""
    side, mid, ends = _LAYOUTS[sgm]
    return 2 * side + mid + (2 if ends else 0)


def _per_block(key: str, text: str | None, count: int, kind) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in str(text).strip("[] ").split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--network_args {key}={text}: expected {count} comma-separated "
                        f"{'integers' if kind is int else 'numbers'}") from exc
    if len(values) != count:
        layout = "embedding, IN0-8, MID0-2, OUT0-8, output" if count == 23 else "IN0-11, MID, OUT0-11"
        raise UserError(f"--network_args {key}: {len(values)} values given; this model has {count} blocks "
                        f"({layout}), one value each")
    if any(v < 0 for v in values):
        raise UserError(f"--network_args {key}={text}: values must not be negative")
    return values


@dataclass(frozen=True)
class BlockRanks:
    """kohya's ``block_dims`` / ``block_alphas`` / ``conv_block_dims`` / ``conv_block_alphas``: the
    rank and alpha of UNet LoRA modules per block (0: no LoRA in that block); text encoders and
    modules outside the numbered blocks keep ``--network_dim``."""

    dims: list[int] | None
    alphas: list[float] | None
    conv_dims: list[int] | None
    conv_alphas: list[float] | None
    sgm: bool

    def rank(self, lora_name: str, is_conv3: bool, dim: int, alpha: float | None) -> tuple[int, float | None]:
        index = block_index(lora_name, self.sgm)
        dims, alphas = (self.conv_dims, self.conv_alphas) if is_conv3 else (self.dims, self.alphas)
        if index < 0 or dims is None:
            return dim, alpha
        return dims[index], (alphas[index] if alphas is not None else alpha)


def block_ranks(args: dict[str, str], sgm: bool, alpha: float | None, conv_alpha: float | None) -> BlockRanks | None:
    """The per-block ranks asked for in ``args``, or None; missing alphas follow ``--network_alpha``
    (``conv_alpha`` for convs), as in kohya."""
    keys = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
    if not any(k in args for k in keys):
        return None
    n = block_count(sgm)
    dims = _per_block("block_dims", args.get("block_dims"), n, int)
    conv_dims = _per_block("conv_block_dims", args.get("conv_block_dims"), n, int)
    for alphas_key, dims_key, given in (("block_alphas", "block_dims", dims), ("conv_block_alphas", "conv_block_dims",
                                                                             conv_dims)):
        if alphas_key in args and given is None:
            raise UserError(f"--network_args {alphas_key} needs {dims_key} (the ranks those alphas go with)")
    alphas = _per_block("block_alphas", args.get("block_alphas"), n, float) or \
        ([alpha] * n if dims is not None else None)
    conv_alphas = _per_block("conv_block_alphas", args.get("conv_block_alphas"), n, float) or \
        ([conv_alpha if conv_alpha is not None else 1.0] * n if conv_dims is not None else None)
    return BlockRanks(dims, alphas, conv_dims, conv_alphas, sgm)


# kohya's and the LoRA Block Weight extension's per-block strengths (--lbws): BASE is the text
# encoders; the long forms give every block, the short ones only the blocks with attention
_LBW_FULL = {False: ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)],
             True: ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)]}
_LBW_SHORT = {False: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05",
                      "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"],
              True: ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04",
                     "OUT05"]}


def parse_lbw(text: str, sgm: bool, where: str = "--lbws") -> dict[str, float]:
    """``[1,0,1,...]`` (or ``1,0,1``) -> block name -> strength; 26 or 17 values for SD1/SD2, 20 or
    12 for SDXL. Blocks a short list leaves out keep strength 1."""
    try:
        values = [float(v) for v in re.split(r"[\s,\[\]]+", text) if v]
    except ValueError as exc:
        raise UserError(f"{where} {text}: expected a list of numbers like [1,0,1,...]") from exc
    for names in (_LBW_FULL[sgm], _LBW_SHORT[sgm]):
        if len(values) == len(names):
            return {**dict.fromkeys(_LBW_FULL[sgm], 1.0), **dict(zip(names, values))}
    sizes = f"{len(_LBW_FULL[sgm])} or {len(_LBW_SHORT[sgm])}"
    raise UserError(f"{where} {text}: {len(values)} values; {'SDXL' if sgm else 'SD1/SD2'} LoRAs take {sizes} "
                    f"(BASE, then the blocks: {', '.join(_LBW_SHORT[sgm][1:])} for the short form)")


def lbw_block(lora_name: str, sgm: bool) -> str | None:
    """The LoRA Block Weight name of a module (BASE for text encoders; None outside the blocks)."""
    if lora_name.startswith("lora_te"):
        return "BASE"
    index = block_index(lora_name, sgm)
    if index < 0:
        return None
    if not sgm:  # 0-11 input, 12 middle, 13-24 output
        return "MID" if index == 12 else (f"IN{index:02d}" if index < 12 else f"OUT{index - 13:02d}")
    if 1 <= index <= 9:
        return f"IN{index - 1:02d}"
    if 10 <= index <= 12:
        return "MID"
    return f"OUT{index - 13:02d}" if 13 <= index <= 21 else None
