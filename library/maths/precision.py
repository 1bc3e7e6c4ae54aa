"""Precision and attention settings: fp8 base weights, full half-precision networks, attention kernels."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from library.utils.errors import UserError

FP8 = torch.float8_e4m3fn


#: the dtype names of kohya's precision flags (--save_precision, --precision, ...)
DTYPE_NAMES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def store_in_fp8(module: torch.nn.Module) -> int:
    """Keep the weights of every Linear and Conv2d in float8_e4m3fn (embeddings and norms keep their
    dtype); autocast computes in the mixed-precision dtype. Returns the number of modules changed."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            sub.to(FP8)
            changed += 1
    return changed


def check_precision_flags(mixed_precision: str, full_fp16: bool, full_bf16: bool, fp8_base: bool) -> None:
    """Contradictions between the precision flags, named (raised before any model is loaded)."""
    if full_fp16 and mixed_precision != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16")
    if full_bf16 and mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16")
    if full_fp16 and full_bf16:
        raise UserError("--full_fp16 and --full_bf16 exclude each other")
    if fp8_base and mixed_precision == "no":
        raise UserError("--fp8_base computes in the mixed-precision dtype: add --mixed_precision bf16 (or fp16 on GPU)")


def set_attention(unet: torch.nn.Module, mode: str) -> None:
    """``sdpa`` (PyTorch scaled-dot-product attention, the default), ``xformers``, or ``mem_eff``
    (diffusers' sliced attention, which bounds attention memory by computing it in slices)."""
    if mode == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError, NotImplementedError) as exc:
            raise UserError(f"--xformers: {exc}. xformers needs a CUDA GPU and `pip install xformers`; "
                            "use --sdpa (the default) otherwise") from exc
    elif mode == "mem_eff":
        if not callable(getattr(unet, "set_attention_slice", None)):
            raise UserError("--mem_eff_attn (sliced attention) is for UNets; remove it for this model")
        unet.set_attention_slice("auto")
    else:
        # diffusers' default processors already use PyTorch SDPA (AttnProcessor2_0 for UNets,
        # JointAttnProcessor2_0 for SD3); only a UNet switched to sliced or xformers attention is
        # put back (replacing joint-attention processors would break SD3)
        kinds = {type(p).__name__ for p in unet.attn_processors.values()}
        if any(k.startswith(("Sliced", "XFormers")) for k in kinds) and callable(getattr(unet, "set_attention_slice",
                                                                                         None)):
            unet.set_attn_processor(AttnProcessor2_0())


def allow_fp16_gradients(scaler) -> None:
    """``--full_fp16``: the network's own gradients are fp16, which GradScaler refuses to unscale by
    default; let it (the scale keeps them in range, as kohya does)."""
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - the point is to ignore it
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale
