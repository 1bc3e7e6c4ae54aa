"""Which modules LoRA attaches to, and the names they have in each LoRA file format.

kohya names UNet modules the way its own UNet classes are laid out: SD1/SD2 in diffusers' layout
(``lora_unet_down_blocks_0_attentions_0_...``) and SDXL in the original SGM layout
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), because kohya's SDXL UNet is
SGM's. Text encoders are ``lora_te_`` (one encoder) or ``lora_te1_``/``lora_te2_`` plus the
transformers path with ``text_model.``.

Files in other namings are read too: kohya-style keys with diffusers block names for an SDXL UNet,
and the diffusers/PEFT form (``unet.<path>.lora_A.weight`` / ``lora_B``, ``text_encoder.``,
``text_encoder_2.``), as ``StableDiffusionXLPipeline.save_lora_weights`` writes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from library.models.sd_keys import unet_module_to_ldm

UNET_TARGET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# text-encoder layers: the attention and MLP linears of every encoder layer, found by path so a
# renamed attention class in transformers cannot silently drop modules
TE_TARGET = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# diffusers/PEFT component prefix -> index of the text encoder (None: the UNet)
_PEFT_PARTS = {"unet": None, "text_encoder": 0, "text_encoder_2": 1}
_SUFFIXES = {"lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "alpha": "alpha",
             "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


@dataclass
class Target:
    """One module LoRA can attach to: its kohya name, the module, and the other names files use for it."""

    name: str
    module: nn.Module | None
    part: str  # "te" or "unet"
    is_conv3: bool = False
    aliases: list[str] = field(default_factory=list)
    dim: int | None = None  # this module's rank when it differs from --network_dim (0: no LoRA)
    fused: tuple[nn.Module, ...] = ()  # Linear layers stored as one matrix in the file (SD3's q/k/v)
    swap_out_halves: bool = False  # the file's output rows are (b, a) where the module has (a, b)
    peft: tuple[str, ...] = ()  # diffusers/PEFT names ("<component>.<module path>"), one per fused layer
    encoder: int = 0  # text encoders: which one (0-based), for per-encoder learning rates


def uses_sgm_names(unet: nn.Module | None) -> bool:
    """kohya names the UNet of SDXL (the one with text_time size conditioning) in SGM's layout."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def te_prefixes(count: int) -> list[str]:
    return ["lora_te"] if count == 1 else [f"lora_te{i + 1}" for i in range(count)]


def te_lora_name(prefix: str, path: str) -> str:
    """kohya name of a text-encoder module; transformers 5 dropped ``text_model.``, the file keeps it."""
    if not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}_{path.replace('.', '_')}"


def _unet_modules(unet: nn.Module, with_conv: bool) -> list[tuple[str, nn.Module, bool]]:
    """(path, module, is_3x3_conv) for every UNet module LoRA attaches to: the Linear and 1x1 convs of
    the transformer blocks, and with ``with_conv`` every conv and linear of resnets and samplers."""
    found, seen = [], set()
    for block_path, block in unet.named_modules():
        kind = type(block).__name__
        if kind not in UNET_TARGET_BLOCKS and not (with_conv and kind in UNET_CONV_BLOCKS):
            continue
        for child_path, child in block.named_modules():
            path = f"{block_path}.{child_path}" if child_path else block_path
            if path in seen:
                continue
            is_conv = isinstance(child, nn.Conv2d)
            if isinstance(child, nn.Linear) or (is_conv and child.kernel_size == (1, 1)):
                found.append((path, child, False))
                seen.add(path)
            elif is_conv and with_conv:
                found.append((path, child, True))
                seen.add(path)
    return found


def find_targets(text_encoders: list[nn.Module], unet: nn.Module | None, with_conv: bool) -> list[Target]:
    """Every module of the model LoRA can attach to, with its kohya name and aliases."""
    targets = []
    for prefix, te, index in zip(te_prefixes(len(text_encoders)), text_encoders, range(len(text_encoders))):
        peft = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        for path, module in te.named_modules():
            if isinstance(module, nn.Linear) and TE_TARGET.search(path):
                flat = path[len("text_model."):] if path.startswith("text_model.") else path
                targets.append(Target(te_lora_name(prefix, path), module, "te", peft=(f"{peft}.{path}",),
                                      encoder=index, aliases=[f"{peft}.{flat}", f"{peft}.text_model.{flat}"]))
    if unet is None:
        return targets
    sgm = uses_sgm_names(unet)
    for path, module, is_conv3 in _unet_modules(unet, with_conv):
        diffusers_name = "lora_unet_" + path.replace(".", "_")
        name = "lora_unet_" + unet_module_to_ldm(path, unet.config).replace(".", "_") if sgm else diffusers_name
        aliases = [f"unet.{path}"] + ([diffusers_name] if sgm else [])
        targets.append(Target(name, module, "unet", is_conv3, aliases, peft=(f"unet.{path}",)))
    return targets


def to_kohya_names(state: dict[str, torch.Tensor], targets: list[Target]) -> dict[str, torch.Tensor]:
    """Rename a LoRA state dict in any naming this module knows to kohya's; keys it cannot place are
    kept as they are (the caller reports them). PEFT files carry no alpha: their scale is 1, so
    alpha = rank is added. diffusers/PEFT LoRAs of layers kohya stores as one matrix (SD3's q/k/v)
    become one fused module, exactly: a shared ``lora_A`` stays the down projection, separate ones
    are stacked with a block-diagonal up; rows kohya stores swapped (SD3's final adaLN) are swapped."""
    alias = {a: t.name for t in targets for a in t.aliases}
    by_peft = {p: (t, i) for t in targets for i, p in enumerate(t.peft)}
    out: dict[str, torch.Tensor] = {}
    peft_parts: dict[str, tuple[Target, dict[int, dict[str, torch.Tensor]]]] = {}
    for key, value in state.items():
        module, suffix = _split(key)
        if suffix in ("lora_A.weight", "lora_B.weight") and module in by_peft:
            target, index = by_peft[module]
            peft_parts.setdefault(target.name, (target, {}))[1].setdefault(index, {})[suffix] = value
        elif suffix is None or module not in alias:
            out[key] = value
        else:
            out[f"{alias[module]}.{_SUFFIXES[suffix]}"] = value
    for name, (target, parts) in peft_parts.items():
        down, up = _joined(target, parts)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
    for key, value in list(out.items()):
        name = key.rsplit(".", 2)[0]
        if key.endswith(".lora_down.weight") and f"{name}.alpha" not in out:
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _joined(target: Target, parts: dict[int, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's down and up of one target from its PEFT layers' ``lora_A`` / ``lora_B``."""
    if not target.fused:
        down, up = parts[0]["lora_A.weight"], parts[0]["lora_B.weight"]
        return down, (_swap_halves(up) if target.swap_out_halves else up)
    outs = [m.out_features for m in target.fused]
    downs = {i: p["lora_A.weight"] for i, p in parts.items()}
    first = next(iter(downs.values()))
    if all(torch.equal(d, first) for d in downs.values()):  # one shared down (what kohya's layout is)
        ups = [parts[i]["lora_B.weight"] if i in parts else first.new_zeros(out, first.shape[0])
               for i, out in enumerate(outs)]
        return first, torch.cat(ups, 0)
    order = sorted(downs)
    down = torch.cat([downs[i] for i in order], 0)
    up = down.new_zeros(sum(outs), down.shape[0])
    column = 0
    for i in order:
        b = parts[i]["lora_B.weight"]
        row = sum(outs[:i])
        up[row:row + outs[i], column:column + b.shape[1]] = b
        column += b.shape[1]
    return down, up


def _split(key: str) -> tuple[str, str | None]:
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


# key fragments that only one model family's LoRA files have (kohya or diffusers/PEFT naming);
# UNet names in diffusers' layout are shared by SD and SDXL except for the blocks only one has
_FAMILY_MARKS = (
    ("sd3", re.compile(r"^(lora_unet_joint_blocks_|transformer\.transformer_blocks\.|lora_te3_)")),
    ("sdxl", re.compile(r"^(lora_unet_(input_blocks|output_blocks|middle_block)_|lora_te[12]_|text_encoder_2\.)"
                        r"|(down|up)_blocks[._]\d+[._]attentions[._]\d+[._]transformer_blocks[._][1-9]")),
    ("sd", re.compile(r"^lora_te_|down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions")),
)


def lora_file_family(keys) -> str | None:
    """Which model family a LoRA file's keys name ("sd", "sdxl" or "sd3"; None when they do not
    tell): read before any model loads, to refuse a file of another family early. SD3's CLIP
    encoders are ``lora_te1_/te2_`` as SDXL's, so SD3's own marks are looked at first."""
    keys = list(keys)
    for family, marks in _FAMILY_MARKS:
        if any(marks.search(k) for k in keys):
            return family
    return None
