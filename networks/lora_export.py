"""The diffusers/PEFT form of a LoRA network (``--save_lora_format diffusers``).

diffusers' ``load_lora_weights`` reads ``pytorch_lora_weights.safetensors`` with keys
``<component>.<module path>.lora_A.weight`` / ``lora_B.weight`` (component: ``unet``,
``transformer``, ``text_encoder``, ``text_encoder_2``); PEFT reads ``adapter_model.safetensors``
(keys ``base_model.model.<module path>...``) with ``adapter_config.json``. Neither stores kohya's
alpha: the scale alpha/rank is folded into ``lora_B``, so the files mean the same update at scale 1.
SD3's fused q/k/v LoRA becomes three LoRAs sharing ``lora_A`` (exact), and the adaLN rows kohya
stores as (shift, scale) are put back in diffusers' (scale, shift) order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from library.utils.errors import UserError
from library.utils.files import atomic_path
from library.utils.safetensors_io import save_safetensors

logger = logging.getLogger(__name__)

DENOISERS = ("unet", "transformer")
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def peft_state_dict(network) -> dict[str, torch.Tensor]:
    """``{"<component>.<path>.lora_A.weight": ..., ".lora_B.weight": ...}`` for every LoRA module."""
    targets = {t.name: t for t in network.targets}  # the trainer checks the network has them
    out: dict[str, torch.Tensor] = {}
    for module in network.all_loras():
        target = targets.get(module.lora_name)
        if target is None or not target.peft:
            raise UserError(f"the network module {module.lora_name} has no diffusers name; --save_lora_format "
                            "diffusers needs networks.lora or networks.lora_sd3")
        down = module.lora_down.weight.detach().float().cpu()
        up = module.lora_up.weight.detach().float().cpu() * module.scale
        if target.swap_out_halves:
            up = _swap_halves(up)
        ups = up.split(module.splits) if target.fused else [up]
        for name, b in zip(target.peft, ups):
            out[f"{name}.lora_A.weight"] = down.clone()
            out[f"{name}.lora_B.weight"] = b.contiguous()
    return out


def diffusers_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``load_lora_weights`` reads of a :func:`peft_state_dict`: the parts diffusers loads."""
    skipped = sorted({k.split(".")[0] for k in state} - set(DIFFUSERS_COMPONENTS))
    if skipped:
        logger.warning("diffusers form: %s LoRA left out (diffusers' loaders do not read it)", ", ".join(skipped))
    return {k: v for k, v in state.items() if k.split(".")[0] in DIFFUSERS_COMPONENTS}


def write_diffusers_lora(network, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (all parts diffusers loads) and a PEFT adapter of the
    denoiser (``adapter_config.json`` + ``adapter_model.safetensors``) into ``folder``."""
    state = peft_state_dict(network)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(diffusers_part(state), folder / "pytorch_lora_weights.safetensors", {"format": "pt"},
                     model_hashes=True)
    denoiser = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".")[0] in DENOISERS}
    if denoiser:
        ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in denoiser.items() if k.endswith("lora_A.weight")}
        rank = max(ranks.values())
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(ranks),
                  "rank_pattern": {k: r for k, r in ranks.items() if r != rank},
                  "alpha_pattern": {k: r for k, r in ranks.items() if r != rank},
                  "lora_dropout": 0.0, "bias": "none", "task_type": None, "init_lora_weights": True}
        save_safetensors({f"base_model.model.{k}": v for k, v in denoiser.items()},
                         folder / "adapter_model.safetensors", {"format": "pt"}, model_hashes=True)
        with atomic_path(folder / "adapter_config.json") as tmp:
            Path(tmp).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
