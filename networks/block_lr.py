"""Block-wise learning rates for UNet LoRA (kohya's ``down_lr_weight``, ``mid_lr_weight``,
``up_lr_weight``, ``block_lr_zero_threshold`` network_args).

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
