"""The fused backward pass's Adafactor step (library/optim/adafactor_step.py) against
transformers' own Adafactor.step: the same weights and state over its options and tensor shapes,
and no temporary tensor of a gradient's size."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.optimization import Adafactor

from library.optim import adafactor_step
from library.optim import optimizers as optim
from library.optim.adafactor_step import adafactor_step_in_place

SHAPES = [(6,), (5, 7), (4, 3, 3, 3), (2, 3, 4)]  # bias, linear, 3x3 conv, 3-d
OPTIONS = [
    {},  # transformers' defaults: relative step, parameter scale
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "warmup_init": False},  # kohya's usual
    {"warmup_init": True},
    {"lr": 1e-2, "relative_step": False, "beta1": 0.9, "weight_decay": 0.05},
    {"lr": 1e-1, "relative_step": False, "clip_threshold": 0.05},  # the update's RMS clipping binds
]


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]


def _grads(step):
    torch.manual_seed(100 + step)
    return [torch.randn(shape) * (1 + step) for shape in SHAPES]


def _run_both(options, dtype=torch.float32, steps=4):
    plain, lean = _params(dtype), _params(dtype)
    reference, optimizer = Adafactor(plain, **options), Adafactor(lean, **options)
    for step in range(steps):
        for p, q, g in zip(plain, lean, _grads(step)):
            p.grad = g.to(dtype)
            adafactor_step_in_place(optimizer, optimizer.param_groups[0], q, g.clone().to(dtype))
        reference.step()
    return plain, lean, reference, optimizer


@pytest.mark.parametrize("chunk", [8, adafactor_step.CHUNK_ELEMENTS], ids=["blocks", "whole"])
@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "fixed_lr", "warmup_init", "beta1_decay", "clipped"])
def test_equals_transformers_step(options, chunk, monkeypatch):
    monkeypatch.setattr(adafactor_step, "CHUNK_ELEMENTS", chunk)  # 8: a row (or less) squared at a time
    plain, lean, reference, optimizer = _run_both(options)
    for s, p, q in zip(_params(), plain, lean):
        assert not torch.equal(q, s)
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
    for p, q in zip(plain, lean):
        want, got = reference.state[p], optimizer.state[q]
        assert set(got) == set(want) and got["step"] == want["step"] == 4
        for key in want:
            torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]], ids=["defaults", "beta1_decay"])
def test_conv_weights_in_blocks_equal_transformers_to_the_last_bits(options, monkeypatch):
    """A tensor of more than two dimensions is factored over its last two, within each block of
    rows, so its step in blocks (here of one row or less) runs transformers' operations on slices:
    bit for bit on this project's CPUs; two float32 ulps allowed, as slicing can move an element
    between a kernel's vector and scalar code."""
    monkeypatch.setattr(adafactor_step, "CHUNK_ELEMENTS", 8)
    plain, lean, reference, optimizer = _run_both(options)
    for shape, p, q in zip(SHAPES, plain, lean):
        if len(shape) > 2:
            torch.testing.assert_close(q, p, rtol=2.4e-7, atol=0)
            for key, want in reference.state[p].items():
                torch.testing.assert_close(torch.as_tensor(optimizer.state[q][key]), torch.as_tensor(want),
                                           rtol=2.4e-7, atol=0)


def test_weights_move_and_bf16_weights_round_like_transformers():
    start = _params()
    plain, lean, _, _ = _run_both(OPTIONS[1], dtype=torch.bfloat16)
    for s, p, q in zip(start, plain, lean):
        assert q.dtype == torch.bfloat16 and not torch.equal(q.float(), s.detach())
        torch.testing.assert_close(q, p)  # bf16 tolerances: an update can round the other way


def test_a_state_resumes_across_the_two_steps():
    """A state written by the fused step loads into transformers' Adafactor (and back) and goes on
    as if one of them had run throughout."""
    plain, lean, reference, optimizer = _run_both(OPTIONS[0], steps=2)
    resumed = Adafactor(lean, **OPTIONS[0])
    resumed.load_state_dict(optimizer.state_dict())
    for p, q, g in zip(plain, lean, _grads(2)):
        p.grad, q.grad = g, g.clone()
    reference.step()
    resumed.step()
    for p, q in zip(plain, lean):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


class _NewAllocations(TorchDispatchMode):
    """Counts op outputs of at least ``numel`` elements in new memory (not a view or an in-place
    result) and records the largest new output."""

    def __init__(self, numel, known):
        super().__init__()
        self.numel, self.known = numel, {t.untyped_storage().data_ptr() for t in known}
        self.count = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.count += t.numel() >= self.numel
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 3, 3)])
def test_no_temporary_of_the_gradient_size(shape, monkeypatch):
    """transformers' step makes full-size temporaries (grad**2 + eps, the second-moment estimate,
    -update); the fused step makes none bigger than a block (here of 512 elements; a 3x3 conv's
    factors, two thirds of its size, are formed a block at a time too)."""
    monkeypatch.setattr(adafactor_step, "CHUNK_ELEMENTS", 512)
    counts, largest = {}, {}
    for name in ("transformers", "in_place"):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(shape))
        optimizer = Adafactor([param])
        grad = torch.randn(shape)
        param.grad = grad
        optimizer.step()  # the state exists before counting
        optimizer.state[param]["step"] = 3
        with _NewAllocations(param.numel(), [param, grad]) as seen:
            if name == "transformers":
                optimizer.step()
            else:
                adafactor_step_in_place(optimizer, optimizer.param_groups[0], param, grad)
        counts[name], largest[name] = seen.count, seen.largest
    assert counts["transformers"] >= 2 and counts["in_place"] == 0, counts
    assert largest["in_place"] <= 512 < param.numel() == largest["transformers"], largest


def test_the_fused_pass_uses_it_and_frees_each_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    optimizer = Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False)
    fused = optim.FusedBackwardPass(optimizer, params, max_norm=0.0)
    assert fused.lean_adafactor is not None
    held = []  # gradients alive right after each tensor's step (a hook registered after the pass's)
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    torch.manual_seed(0)
    plain_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    reference = Adafactor(plain_model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False)
    x = torch.randn(4, 6)
    model(x).square().mean().backward()
    plain_model(x).square().mean().backward()
    reference.step()
    assert held == [0] * len(params) and all(p.grad is None for p in params)
    for p, q in zip(plain_model.parameters(), params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_a_non_finite_gradient_is_not_applied(max_norm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    fused = optim.FusedBackwardPass(Adafactor(params), params, max_norm=max_norm)
    params[2].register_hook(lambda g: torch.full_like(g, float("nan")))  # the second layer's weight
    model(torch.randn(4, 6)).square().mean().backward()
    assert fused.take_non_finite() == [2] and fused.take_non_finite() == []
    assert torch.equal(params[2], before[2])
    assert all(not torch.equal(p, b) for i, (p, b) in enumerate(zip(params, before)) if i != 2)
    assert all(p.grad is None for p in params)
