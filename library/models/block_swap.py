"""Block swap (kohya's ``--blocks_to_swap N``): the weights of the last N transformer blocks live in
CPU memory and take turns in N device-memory slots, so the accelerator holds (blocks - N) blocks
at any time instead of all of them.

Forward: blocks 0..B-N-1 are resident. After block i < N has run, it leaves and block B-N+i
comes in (its weights are copied into the slot block i used; block i's go to host memory).
Backward runs the blocks in reverse: when block b-1's backward starts, block b's has finished
(autograd runs the nodes of later blocks first), so a late block b >= B-N leaves then and early
block b-(B-N) comes back, in time for its own backward. "Block b-1's backward starts" is when
the gradients of all its outputs are complete: hooks on those output tensors count them. (Not a
module backward hook: that wraps the outputs in extra autograd nodes, which reorders how shared
gradients, such as the timestep embedding's from every block, are summed, so trained weights
came out a rounding error away from an unswapped run's.) Every parameter object always
holds its own weights, only their location changes, so autograd's saved weights are right
whenever the block they belong to runs. On CUDA the copies are queued on a side stream and a
block waits for its transfer only when it is about to run.

``resident`` is the bookkeeping of which blocks are in device memory; a block that runs while not
resident raises at once (the tests check this on CPU, where the copies are real but both sides
are host memory).

Trained blocks (full-weight training): a parameter's gradient travels with its weights, so it
always sits where the weights are; the optimizer steps each parameter where it is at that moment
(unfused: after backward, in host memory for the swapped blocks, like an optimizer offload;
``--fused_backward_pass``: inside its block's backward, on the device) and its state stays
there, which is the same place every step.

Weights without a same-shaped twin in the block they are exchanged with (SD3.5 Medium's extra
attention, the last block's reduced context half) are moved to the device once and stay there.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import torch
from torch import nn

from library.utils.errors import UserError

logger = logging.getLogger(__name__)


class BlockSwap:
    """Swaps the last ``n`` of ``blocks`` between ``device`` and host memory during training steps."""

    def __init__(self, blocks: nn.ModuleList, n: int, device: torch.device):
        total = len(blocks)
        if not 0 < n <= total - 2:
            raise UserError(f"--blocks_to_swap {n}: this model has {total} blocks; swap 1 to {total - 2}")
        self.blocks, self.n, self.device = blocks, n, torch.device(device)
        self.first_late = total - n
        self.host = torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: dict[int, object] = {}  # block index -> CUDA event of its inbound copy
        self.resident = set(range(self.first_late))
        self.max_resident = len(self.resident)
        self.in_backward = False  # gradient checkpointing re-runs forwards inside backward
        # (what, block) for tests and debugging: the latest ones only, so a long run does not grow it
        self.events: deque[tuple[str, int]] = deque(maxlen=4096)
        self.grads_moved = 0  # trained parameters' gradients moved with their weights
        for i, block in enumerate(blocks):
            block.to(self.device if i < self.first_late else self.host)
            block.register_forward_pre_hook(self._before(i, "forward"))
            block.register_forward_hook(self._after_forward(i))

    # ----------------------------------------------------------------- hooks
    def _before(self, i: int, phase: str):
        def hook(module, *_):
            self._wait(i)
            if i not in self.resident:
                raise RuntimeError(f"block swap: block {i} runs its {phase} pass while its weights are offloaded")
            self.events.append((phase, i))
        return hook

    def _after_forward(self, i: int):
        def hook(module, args, output):
            if self.in_backward:  # gradient checkpointing re-running the block inside backward
                return
            if i < self.n:  # block i is done until backward: its slot goes to B-N+i
                self._exchange(out=i, into=self.first_late + i)
            self._watch_output_grads(i, module, output)
        return hook

    def _watch_output_grads(self, i: int, module, output) -> None:
        """Call :meth:`_backward_starts` once the gradients of all of block i's outputs exist."""
        outputs = output if isinstance(output, tuple) else (output,)
        tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        pending = [len(tensors)]

        def on_grad(grad):
            pending[0] -= 1
            if pending[0] == 0:
                self._backward_starts(i, module)
        for t in tensors:
            t.register_hook(on_grad)

    def _backward_starts(self, i: int, module) -> None:
        self.in_backward = True
        late = i + 1
        if self.first_late <= late < len(self.blocks) and late in self.resident:  # its backward is done
            self._exchange(out=late, into=late - self.first_late)
        self._before(i, "backward")(module)

    def prepare_forward(self) -> None:
        """Restore the start layout (early blocks resident) if a forward without backward (sampling,
        validation, an aborted step) left the late blocks in."""
        self.in_backward = False
        for i in reversed(range(self.n)):  # the order backward uses: right also when N > B/2
            late = self.first_late + i
            if late in self.resident and i not in self.resident:
                self._exchange(out=late, into=i)

    # ----------------------------------------------------------------- transfers
    def _wait(self, i: int) -> None:
        event = self.pending.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _exchange(self, out: int, into: int) -> None:
        """Block ``out`` to host memory, block ``into`` to the device (into ``out``'s memory where the
        shapes match)."""
        leaving, coming = self.blocks[out], self.blocks[into]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # ``out`` has finished with it
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            incoming = dict(coming.named_parameters())
            for name, p_out in leaving.named_parameters():
                p_in = incoming.pop(name, None)
                if p_in is None or p_in.shape != p_out.shape or p_in.dtype != p_out.dtype:
                    # no twin of the same shape (SD3.5 Medium's attn2, the last block's context
                    # half): this weight stays where it is, so memory that autograd saved views
                    # point at is never reused for something else
                    if p_in is not None:
                        incoming[name] = p_in
                    continue
                slot = p_out.data
                to_host = torch.empty(slot.shape, dtype=slot.dtype, device=self.host,
                                      pin_memory=self.stream is not None)
                to_host.copy_(slot, non_blocking=self.stream is not None)
                slot.copy_(p_in.data, non_blocking=self.stream is not None)  # reuse the device memory
                p_in.data = slot
                p_out.data = to_host
                self._move_grad(p_out, self.host)
                self._move_grad(p_in, self.device)
            for p_in in incoming.values():  # no twin: moved once and kept on the device
                if p_in.device != self.device:
                    p_in.data = p_in.data.to(self.device, non_blocking=self.stream is not None)
                    self._move_grad(p_in, self.device)
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
                self.pending[into] = event
        self.resident.discard(out)
        self.resident.add(into)
        self.max_resident = max(self.max_resident, len(self.resident))
        self.events.append(("swap", out * 1000 + into))


    def _move_grad(self, param: torch.Tensor, device: torch.device) -> None:
        """A trained parameter's gradient (accumulating, or waiting for the optimizer) follows it."""
        if param.grad is not None:
            param.grad = param.grad.to(device, non_blocking=self.stream is not None)
            self.grads_moved += 1


def install_block_swap(transformer: nn.Module, blocks: nn.ModuleList, n: int, device: torch.device) -> BlockSwap:
    """Set up swapping for ``blocks`` of ``transformer``; every forward starts from the start layout."""
    swap = BlockSwap(blocks, n, device)
    transformer.register_forward_pre_hook(lambda module, args: swap.prepare_forward())
    logger.info("block swap: %d of %d blocks in host memory, %d resident", n, len(blocks), len(blocks) - n)
    return swap
