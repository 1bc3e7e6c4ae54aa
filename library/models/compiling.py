"""torch.compile for the denoiser, one repeated block at a time (regional compilation).

Compiling the whole UNet or MMDiT as one graph costs minutes and starts again for every new
bucket shape; compiling each repeated block (a transformer block, a ResNet block) keeps each graph
small, lets blocks of the same shape share compiled code, and leaves the glue between blocks eager.
The blocks are compiled in place after the network's hooks are applied and gradient
checkpointing is set, so the compiled code traces the LoRA forwards too.
"""

from __future__ import annotations

import importlib.util
import shutil

import torch

from library.utils.errors import UserError

# backends that torch lists but that need a package this toolkit does not install
# (module to import, what to pip install)
_NEEDS = {"tensorrt": ("torch_tensorrt", "torch-tensorrt"), "onnxrt": ("onnxscript", "onnxscript"),
          "tvm": ("tvm", "apache-tvm"), "openxla": ("torch_xla", "torch_xla"),
          "ipex": ("intel_extension_for_pytorch", "intel-extension-for-pytorch")}


def available_backends() -> list[str]:
    import torch._dynamo

    return sorted(set(torch._dynamo.list_backends()) | {"eager", "aot_eager", "inductor"})


def check_backend(backend: str, flag: str = "--dynamo_backend") -> None:
    """A backend torch knows, whose package is installed: refused up front with what to install,
    never in the middle of the first step."""
    if backend == "no":
        raise UserError(f"--torch_compile with {flag} no: pick a backend (inductor, aot_eager, ...) or drop "
                        "--torch_compile")
    if backend in _NEEDS and importlib.util.find_spec(_NEEDS[backend][0]) is None:
        raise UserError(f"{flag} {backend}: needs the {_NEEDS[backend][1]} package (pip install "
                        f"{_NEEDS[backend][1]}), which is not installed; inductor and aot_eager come with torch")
    known = available_backends()
    if backend not in known:
        raise UserError(f"{flag} {backend}: not a torch.compile backend here; available: {', '.join(known)}")


def check_toolchain(backend: str, device: torch.device, flag: str = "--dynamo_backend") -> None:
    """inductor writes C++ on CPU and Triton kernels on CUDA: without a compiler for the device it
    would fail at the first step."""
    if backend != "inductor":
        return
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError(f"{flag} inductor on CUDA needs the triton package (pip install triton), or use "
                        f"{flag} aot_eager")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
        raise UserError(f"{flag} inductor on CPU needs a C++ compiler on PATH (g++ or clang++), or use "
                        f"{flag} aot_eager")


def compile_blocks(module: torch.nn.Module, block_classes: tuple[str, ...], backend: str) -> int:
    """Compile every submodule whose class is named in ``block_classes``, in place; return how many.
    A block inside another compiled block is left to its parent."""
    count = 0
    for block in _outermost(module, set(block_classes)):
        block.compile(backend=backend)
        count += 1
    return count


def _outermost(module: torch.nn.Module, names: set[str]):
    if type(module).__name__ in names:
        yield module
        return
    for child in module.children():
        yield from _outermost(child, names)
