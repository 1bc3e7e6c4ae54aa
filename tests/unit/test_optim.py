"""Optimizer and LR-scheduler registries."""

import pytest
import torch

from library.optim import optimizers as optim
from library.utils.errors import UserError


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 8))]


def _one_step(opt, params, steps=1):
    before = params[0].detach().clone()
    for _ in range(steps):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
    return not torch.equal(before, params[0].detach())


@pytest.mark.parametrize("name,cls_name,module", [
    ("AdamW", "AdamW", "torch.optim"), ("SGDNesterov", "SGD", "torch.optim"),
    ("AdamW8bit", "AdamW8bit", "bitsandbytes"), ("PagedAdamW8bit", "PagedAdamW8bit", "bitsandbytes"),
    ("Lion8bit", "Lion8bit", "bitsandbytes"), ("SGDNesterov8bit", "SGD8bit", "bitsandbytes"),
    ("Lion", "Lion", "lion_pytorch"), ("DAdaptation", "DAdaptAdamPreprint", "dadaptation"),
    ("DAdaptAdam", "DAdaptAdam", "dadaptation"), ("DAdaptLion", "DAdaptLion", "dadaptation"),
    ("Prodigy", "Prodigy", "prodigyopt"), ("Adafactor", "Adafactor", "transformers"),
    ("AdamWScheduleFree", "AdamWScheduleFree", "schedulefree"),
    ("RAdamScheduleFree", "RAdamScheduleFree", "schedulefree"),
    ("torch.optim.RMSprop", "RMSprop", "torch.optim"),
])
def test_registry_builds_and_steps(name, cls_name, module):
    pytest.importorskip(module.split(".")[0])
    params = _params()
    lr = 1.0 if name.lower().startswith(("dadapt", "prodigy")) else 1e-2
    opt = optim.build_optimizer(name, [{"params": params, "lr": lr}], lr, {})
    assert type(opt).__name__ == cls_name
    optim.prepare_optimizer_for_training(opt)
    assert _one_step(opt, params, steps=6)  # RAdam-style optimizers hold still for their first steps


def test_sgd_nesterov_defaults_and_args():
    opt = optim.build_optimizer("sgdnesterov", [{"params": _params()}], 0.1, optim.parse_optimizer_args(
        ["momentum=0.8", "weight_decay=1e-4"]))
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.8
    assert opt.defaults["weight_decay"] == 1e-4


def test_adafactor_relative_step_gets_its_schedule():
    opt = optim.build_optimizer("Adafactor", [{"params": _params(), "lr": 1e-3}], 1e-3, {})
    assert opt.defaults["relative_step"] is True
    sched = optim.build_lr_scheduler(optim.SchedulerSpec("constant", 0, 100), opt, initial_lr=1e-3)
    assert type(sched).__name__ == "AdafactorSchedule"


def test_schedule_free_eval_mode_swaps_weights():
    pytest.importorskip("schedulefree")
    params = _params()
    opt = optim.build_optimizer("AdamWScheduleFree", [{"params": params, "lr": 0.1}], 0.1, {})
    optim.prepare_optimizer_for_training(opt)
    for _ in range(3):
        _one_step(opt, params)
    train_weights = params[0].detach().clone()
    with optim.optimizer_eval_mode(opt):
        assert not torch.equal(params[0], train_weights)
    torch.testing.assert_close(params[0].detach(), train_weights)
    sched = optim.build_lr_scheduler(optim.SchedulerSpec("cosine", 0, 100), opt)
    assert sched.get_last_lr() == [0.1]  # schedule-free keeps a constant lr


def test_unknown_and_missing_packages(monkeypatch):
    with pytest.raises(UserError, match="unknown"):
        optim.check_optimizer_name("adamq")
    with pytest.raises(UserError, match="cannot import"):
        optim.build_optimizer("nosuchpkg.Opt", [{"params": _params()}], 1e-3, {})
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("prodigyopt"):
            raise ImportError("No module named 'prodigyopt'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(UserError, match="pip install prodigyopt"):
        optim.build_optimizer("Prodigy", [{"params": _params()}], 1.0, {})


def _lrs(spec, steps):
    opt = torch.optim.SGD(_params(), lr=1.0)
    sched = optim.build_lr_scheduler(spec, opt)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedulers_hand_checked():
    assert _lrs(optim.SchedulerSpec("constant", 0, 10), 3) == [1.0, 1.0, 1.0]
    assert _lrs(optim.SchedulerSpec("constant", 2, 10), 3) == [0.0, 0.5, 1.0]  # warm-up turns it into *_with_warmup
    lin = _lrs(optim.SchedulerSpec("linear", 0, 10), 10)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5)
    cos = _lrs(optim.SchedulerSpec("cosine", 0, 10), 10)
    assert cos[5] == pytest.approx(0.5)
    poly = _lrs(optim.SchedulerSpec("polynomial", 0, 10, power=2.0), 10)
    assert poly[5] == pytest.approx(0.25, abs=1e-6)
    restarts = _lrs(optim.SchedulerSpec("cosine_with_restarts", 0, 10, num_cycles=2), 10)
    assert restarts[0] == 1.0 and restarts[5] == pytest.approx(1.0)
    min_lr = _lrs(optim.SchedulerSpec("cosine_with_min_lr", 0, 10, min_lr_ratio=0.1), 11)
    assert min(min_lr) == pytest.approx(0.1, abs=0.03)
    inv = _lrs(optim.SchedulerSpec("inverse_sqrt", 0, 10, args=("timescale=1",)), 5)
    assert inv[3] == pytest.approx(1 / 2)  # 1/sqrt((3 + 1) / 1)
    wsd = _lrs(optim.SchedulerSpec("warmup_stable_decay", 2, 10, decay_steps=4), 10)
    assert wsd[:3] == [0.0, 0.5, 1.0] and wsd[5] == 1.0 and wsd[9] < 0.5
    custom = _lrs(optim.SchedulerSpec("constant", 0, 10, custom_type="StepLR", args=("step_size=2", "gamma=0.5")), 5)
    assert custom == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_warmup_forms():
    assert optim.warmup_steps("10", 200) == 10
    assert optim.warmup_steps("0.05", 200) == 10
    assert optim.warmup_steps("5%", 200) == 10
    with pytest.raises(UserError):
        optim.warmup_steps("ten", 200)


def test_loraplus_groups(tiny_sd1):
    from networks import lora

    net = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, loraplus_lr_ratio="16")
    groups, names = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-5, 1.6e-4, 1e-4, 1.6e-3]
    ups = {id(m.lora_up.weight) for m in net.unet_loras}
    assert {id(p) for p in groups[3]["params"]} == ups


def test_full_fp16_gradients_can_be_unscaled():
    from library.maths.precision import allow_fp16_gradients

    def fresh():
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale((p.float() * 1.0).sum()).backward()  # fp16 gradients of 1024 (the scale)
        return torch.optim.SGD([p], lr=0.1), scaler, p

    opt, scaler, _ = fresh()
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt)
    opt, scaler, p = fresh()
    allow_fp16_gradients(scaler)
    scaler.unscale_(opt)
    assert p.grad.tolist() == [1.0] * 4


def test_fused_optimizer_groups_step_each_part_inside_backward():
    """Five layers in three parts: three steps per backward, each while later parts' gradients do
    not exist yet, gradients freed as their part steps, an unused layer's part completed after
    backward by finish(); the weights equal a plain AdamW step's bit for bit."""
    def layers():
        torch.manual_seed(0)
        return torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(5))

    plain, fused = layers(), layers()
    params = [p for m in fused for p in m.parameters()]
    reference = torch.optim.AdamW(plain.parameters(), lr=0.1)
    optimizer = torch.optim.AdamW(params, lr=0.1)
    held = []
    original_step = optimizer.step

    def counting_step(*a, **k):
        held.append(sum(p.grad is not None for p in params))
        return original_step(*a, **k)

    optimizer.step = counting_step
    groups = optim.FusedOptimizerGroups(optimizer, params, 3, max_norm=0.0)  # parts of 4, 4 and 2 tensors
    x = torch.randn(2, 4)
    for model in (plain, fused):
        out = x
        for m in list(model)[1:]:  # the first layer is not used: no gradient
            out = m(out)
        out.square().mean().backward()
    assert len(held) == 2 and max(held) <= 4  # the last two parts, stepped inside backward
    groups.finish()  # the first part: layer 1's tensors (no gradient) and layer 2's
    assert len(held) == 3 and all(p.grad is None for p in params)
    reference.step()
    for a, b in zip(plain.parameters(), params):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="use one of them"):
        optim.check_fused_optimizer_groups(2, "AdamW", 1, fused_backward=True)
    with pytest.raises(UserError, match="estimates its step size"):
        optim.check_fused_optimizer_groups(2, "Prodigy", 1, fused_backward=False)
