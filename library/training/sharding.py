"""Sharded full-weight training (``--deepspeed``): torch FSDP2 over the trained modules.

Each trained module is split over the processes with ``fully_shard``: the denoiser block by block
(the family's ``compiled_blocks``, so only one block's weights are gathered at a time) and then as
a whole for what lies between the blocks, each trained text encoder as one unit. The parameters
become DTensors holding this process's shard; the optimizer, created afterwards, keeps state for
the shard only; FSDP2 averages the gradients over processes in backward (reduce-scatter), so the
loop's own all-reduce is not used.

Everything that reads whole weights (saving a model, a state folder) is collective: every process
calls it, rank 0 receives the whole tensors in host memory and writes, the others write nothing.
Forward passes are collective too (each block gathers its weights from every process), so sample
images and validation run on every process in the same order.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from library.config.sharding import ShardingOptions
from library.utils.errors import UserError

logger = logging.getLogger(__name__)

#: the layers of the text encoders users train (transformers' CLIP and T5), each sharded on its own
TEXT_ENCODER_BLOCKS = ("CLIPEncoderLayer", "T5Block")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0 only


class Sharding:
    """The trained modules of one run, sharded; collective reads and writes of their whole state."""

    def __init__(self, options: ShardingOptions, device: torch.device, num_processes: int):
        if num_processes < 2 or not dist.is_initialized():
            raise UserError("--deepspeed shards the weights over processes: launch with accelerate launch "
                            "--num_processes N (N > 1); on one GPU, --full_bf16, --gradient_checkpointing and "
                            "--fused_backward_pass cut memory instead")
        self.options, self.device = options, device
        self.rank = dist.get_rank()
        self.modules: list[torch.nn.Module] = []

    def shard(self, module: torch.nn.Module, block_types: tuple[str, ...] = ()) -> int:
        """Shard ``module`` (its blocks of ``block_types`` each on their own, then the rest); returns
        how many blocks were sharded separately."""
        kwargs = {"reshard_after_forward": self.options.reshard_after_forward}
        if self.options.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        blocks = [m for m in module.modules() if type(m).__name__ in block_types and m is not module]
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        _keep_output_capture(module)
        self.modules.append(module)
        return len(blocks)

    def describe(self) -> str:
        stage = self.options.zero_stage
        held = "weights regathered for backward" if stage == 3 else "weights gathered once per step"
        where = ", shards offloaded to host memory" if self.options.offload else ""
        return f"sharded over {dist.get_world_size()} processes (FSDP2, ZeRO stage {stage}: {held}{where})"

    def barrier(self) -> None:
        """Wait for every process (after rank 0 wrote what all of them gathered)."""
        dist.barrier()

    # ------------------------------------------------------------------ collective reads and writes
    def model_state(self, net: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``net``'s whole state dict on rank 0 (host memory); an empty dict elsewhere."""
        return get_model_state_dict(net, options=_GATHER)

    def optimizer_state(self, net: torch.nn.Module, optimizer) -> dict:
        """The optimizer's whole state on rank 0, keyed by parameter names (not positions)."""
        return get_optimizer_state_dict(net, _inner(optimizer), options=_GATHER)

    def load(self, net: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
        """Every process holds the whole state read from a state folder and keeps its shard."""
        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net, model_state, options=whole)
        set_optimizer_state_dict(net, _inner(optimizer), optimizer_state, options=whole)

    @contextmanager
    def whole_weights(self):
        """Inside, rank 0's trained modules answer ``state_dict()`` with whole tensors (so the
        model writers run unchanged) and the block yields whether this process writes."""
        gathered = [(module, get_model_state_dict(module, options=_GATHER)) for module in self.modules]
        handles = []
        if self.rank == 0:
            for module, whole in gathered:
                handles.append(module.register_state_dict_post_hook(_substitute(whole)))
        try:
            yield self.rank == 0
        finally:
            for handle in handles:
                handle.remove()
            self.barrier()  # nobody runs ahead (and deletes or reads) before rank 0 has written


def _substitute(whole: dict[str, torch.Tensor]):
    def hook(module, state_dict, prefix, local_metadata):
        for key in list(state_dict):
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name in whole:
                state_dict[key] = whole[name]
    return hook


def _keep_output_capture(module: torch.nn.Module) -> None:
    """transformers 5 looks up what a model can return (``output_hidden_states``) by the name of
    its class, and ``fully_shard`` swaps the class for a subclass (``FSDPCLIPTextModel``): without
    this the sharded encoder silently returns no hidden states."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # an older transformers looks outputs up otherwise
        return
    if hasattr(module, "_can_record_outputs"):
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
