"""kohya's DeepSpeed flags for the full-weight trainers, read into :class:`ShardingOptions`.

The run is sharded with torch's FSDP2 (``fully_shard``, the engine accelerate's FSDP plugin uses
since version 2), not with DeepSpeed's engine: the flags keep kohya's names and what they ask for,
ZeRO's stages map onto FSDP2's choices (see :func:`sharding_options`), and no extra package is
needed. Everything is checked here, before any model loads.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from library.utils.errors import UserError

logger = logging.getLogger(__name__)

#: kohya's DeepSpeed flags (its deepspeed_utils)
SHARDING_FLAGS = ("deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                  "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                  "fp16_master_weights_and_gradients")
#: optimizers whose update is element by element and whose code runs on sharded (DTensor) weights;
#: factored (Adafactor), quantised (bitsandbytes) and adaptive-step ones (D-Adaptation, Prodigy:
#: a sum over the whole model) are not, and dotted paths are accepted from torch.optim only
SHARDABLE_OPTIMIZERS = ("adamw", "sgdnesterov")
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class ShardingOptions:
    """How the trained weights, their gradients and the optimizer state are split over processes."""

    zero_stage: int  # 1 or 2: weights gathered once per step and kept through backward; 3: regathered for backward
    offload: bool  # shards (weights, gradients, optimizer state) kept in host memory between uses

    @property
    def reshard_after_forward(self) -> bool:
        return self.zero_stage == 3


def sharding_options(args: argparse.Namespace) -> ShardingOptions | None:
    """``--deepspeed`` and its flags as kohya takes them, or None when the run is not sharded.

    ZeRO 1 and 2 shard the optimizer state (and 2 the gradients) but keep whole weights on every
    GPU; FSDP2 always keeps the weights sharded between steps too, so both become FSDP2 with the
    weights gathered once per step (``reshard_after_forward=False``), and 3 regathers them for
    backward (``True``), which saves the most memory. Either offload flag offloads all three kinds
    of tensor (FSDP2's ``CPUOffloadPolicy`` moves them together)."""
    given = [name for name in SHARDING_FLAGS if getattr(args, name, None) not in (None, False)]
    if not given:
        return None
    if not getattr(args, "deepspeed", False):
        raise UserError(f"{', '.join('--' + n for n in given)}: DeepSpeed options; they take effect with --deepspeed "
                        "(as in kohya's scripts): add --deepspeed, or remove them")
    stage = 2 if args.zero_stage is None else args.zero_stage  # kohya's default
    if stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage {stage}: ZeRO stages are 0, 1, 2 and 3")
    _refuse_unsupported(args)
    offload = _offload(args)
    if stage == 0:
        if offload:
            raise UserError("--zero_stage 0 shards nothing, so there is nothing to offload: use --zero_stage 2 or 3 "
                            "with --offload_optimizer_device / --offload_param_device cpu")
        logger.info("--deepspeed --zero_stage 0: data-parallel without sharding (as without --deepspeed)")
        return None
    _check_combination(args)
    _check_processes()
    if args.zero3_save_16bit_model:
        logger.info("--zero3_save_16bit_model: saved models are always gathered whole, in --save_precision")
    return ShardingOptions(stage, offload)


def _refuse_unsupported(args: argparse.Namespace) -> None:
    for flag in ("offload_optimizer_nvme_path", "offload_param_nvme_path"):
        if getattr(args, flag):
            raise UserError(f"--{flag}: offloading to NVMe is not in this version; offload to host memory with "
                            f"--{flag.replace('_nvme_path', '_device')} cpu")
    if args.zero3_init_flag:
        raise UserError("--zero3_init_flag: building the model already sharded is not in this version (each process "
                        "loads the whole model, then keeps its shard); remove the flag")
    if args.fp16_master_weights_and_gradients:
        raise UserError("--fp16_master_weights_and_gradients: sharded runs keep float32 master weights; remove the "
                        "flag (--full_bf16 trains in bf16)")


def _offload(args: argparse.Namespace) -> bool:
    devices = {flag: getattr(args, flag) for flag in ("offload_optimizer_device", "offload_param_device")}
    for flag, device in devices.items():
        if device not in (None, "none", "cpu"):
            hint = "; NVMe offloading is not in this version" if device == "nvme" else ""
            raise UserError(f"--{flag} {device}: choose cpu or none{hint}")
    return any(device == "cpu" for device in devices.values())


def _check_processes() -> None:
    """Sharding needs several processes; the launcher tells each one the count (torchrun and
    accelerate launch: WORLD_SIZE; MPI launchers: their own variables, as accelerate reads them)."""
    world = max(int(os.environ.get(name) or 1) for name in _WORLD_SIZE_VARIABLES)
    if world < 2:
        raise UserError("--deepspeed shards the weights over processes, and this run has one: launch it with "
                        "accelerate launch --num_processes N (N > 1). On one GPU, --full_bf16, "
                        "--gradient_checkpointing and --fused_backward_pass (Adafactor) cut memory instead")


def _check_combination(args: argparse.Namespace) -> None:
    """What does not run on sharded weights yet, named before anything loads."""
    clashes = [("--fused_backward_pass", getattr(args, "fused_backward_pass", False)),
               ("--fused_optimizer_groups", getattr(args, "fused_optimizer_groups", None)),
               ("--blocks_to_swap", getattr(args, "blocks_to_swap", None)),
               ("--torch_compile", getattr(args, "torch_compile", False)),
               ("--full_fp16", getattr(args, "full_fp16", False)),
               ("--mixed_precision fp16", getattr(args, "mixed_precision", None) == "fp16")]
    named = [flag for flag, on in clashes if on]
    if named:
        raise UserError(f"--deepspeed with {', '.join(named)}: not together in this version (sharded runs train "
                        "float32 or bf16 weights with an optimizer step after backward); remove one of them")
    name = str(args.optimizer_type)
    if name.lower() not in SHARDABLE_OPTIMIZERS and not name.startswith("torch.optim."):
        raise UserError(f"--optimizer_type {name} with --deepspeed: sharded runs take AdamW, SGDNesterov or a "
                        "torch.optim class (their update is element by element on each shard)")
