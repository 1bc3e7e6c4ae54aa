"""Block swap on CPU: the copies are real (weights are exchanged between blocks' memory), so a swap
at the wrong moment would give wrong gradients; residency is tracked and a block that runs while
offloaded raises. Loss and gradients must equal the run without swapping."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from library.models.block_swap import install_block_swap
from library.models.tiny import TINY_SD3_MMDIT
from library.utils.errors import UserError
from networks import lora_sd3

LAYERS = 6


def _model(seed=0, **extra):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY_SD3_MMDIT, "num_layers": LAYERS, **extra}).eval().requires_grad_(False)


def _with_lora(model):
    torch.manual_seed(2)
    net = lora_sd3.create_network(1.0, 4, 4, None, [], model)
    net.apply_to([], model, apply_text_encoder=False)
    torch.manual_seed(1)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    net.requires_grad_(True)
    return net


def _step(model, net, seed):
    torch.manual_seed(seed)
    net.zero_grad(set_to_none=True)
    out = model(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 10, 128),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([100.0, 700.0])).sample
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}


SD35M = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1, 2)}


@pytest.mark.parametrize("n, extra, checkpointing", [(1, {}, False), (3, {}, False), (4, SD35M, False),
                                                    (2, {}, True), (4, SD35M, True)])
def test_same_loss_and_gradients_with_swapping(n, extra, checkpointing):
    """Also with more swapped blocks than half (a slot passes through a chain of blocks) and with
    gradient checkpointing (blocks run their forward again inside backward)."""
    plain, swapped = _model(**extra), _model(**extra)
    if checkpointing:
        for m in (plain, swapped):
            m.enable_gradient_checkpointing()
            m.train()
    plain_net, swapped_net = _with_lora(plain), _with_lora(swapped)
    swap = install_block_swap(swapped, swapped.transformer_blocks, n, torch.device("cpu"))
    for seed in (0, 1):  # two steps: the layout is back to the start after each backward
        loss_a, grads_a = _step(plain, plain_net, seed)
        loss_b, grads_b = _step(swapped, swapped_net, seed)
        assert loss_a == loss_b
        assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
        assert swap.resident == set(range(LAYERS - n))
    assert swap.max_resident == LAYERS - n  # never more blocks in device memory than B - N
    swaps = [e for e in swap.events if e[0] == "swap"]
    assert len(swaps) == 2 * 2 * n  # each step: N out after forward, N back in backward
    runs = 2 if not checkpointing else 4  # checkpointing runs each forward a second time
    assert sorted(i for p, i in swap.events if p == "forward") == sorted(list(range(LAYERS)) * runs)
    assert sorted(i for p, i in swap.events if p == "backward") == sorted(list(range(LAYERS)) * 2)


def test_forward_without_backward_then_training():
    model = _model()
    net = _with_lora(model)
    swap = install_block_swap(model, model.transformer_blocks, 2, torch.device("cpu"))
    reference_model = _model()
    reference_net = _with_lora(reference_model)
    with torch.no_grad():  # sampling or validation: the late blocks stay in afterwards
        model(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 10, 128),
              pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    assert swap.resident != set(range(LAYERS - 2))
    loss, grads = _step(model, net, 5)  # the next forward restores the start layout first
    ref_loss, ref_grads = _step(reference_model, reference_net, 5)
    assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_running_an_offloaded_block_is_caught_and_limits_are_checked():
    model = _model()
    swap = install_block_swap(model, model.transformer_blocks, 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="block 5 runs its forward pass while its weights are offloaded"):
        model.transformer_blocks[5](hidden_states=torch.randn(1, 16, 32), encoder_hidden_states=torch.randn(1, 10, 32),
                                    temb=torch.randn(1, 32))
    assert swap.resident == {0, 1, 2, 3}
    with pytest.raises(UserError, match="swap 1 to 4"):
        install_block_swap(_model(), _model().transformer_blocks, 5, torch.device("cpu"))


def _full_step(model, optimizer, seed):
    torch.manual_seed(seed)
    out = model(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 10, 128),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([100.0, 700.0])).sample
    (out.float() ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trained_blocks_move_with_their_gradients(checkpointing):
    """Full-weight training: every weight of the model trains (AdamW, two steps); the swapped
    blocks' gradients travel with them (counted), and every weight ends bit-identical to the
    unswapped model's, the shared timestep embedding's too (its gradient sums every block's)."""
    models = [_model().requires_grad_(True), _model().requires_grad_(True)]
    for m in models:
        if checkpointing:
            m.enable_gradient_checkpointing()
        m.train()
    swap = install_block_swap(models[1], models[1].transformer_blocks, 2, torch.device("cpu"))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    for seed in (0, 1):
        for m, opt in zip(models, optimizers):
            _full_step(m, opt, seed)
    assert swap.grads_moved > 0 and swap.resident == set(range(LAYERS - 2))
    plain = models[0].state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in models[1].state_dict().items())


def test_moving_average_is_restored_whatever_the_layout():
    """Sample images with --ema: the averages are copied in, a forward (no backward) leaves the
    late blocks resident, and the weights copied back are the trained ones, in their own blocks.
    (On CPU both places are host memory, so values are what this checks, not devices.)"""
    from library.training.ema import WeightEMA

    model = _model().requires_grad_(True)
    swap = install_block_swap(model, model.transformer_blocks, 2, torch.device("cpu"))
    ema = WeightEMA(dict(model.named_parameters()), 0.5, 1, on_cpu=False)
    for average in ema.averages.values():
        average.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(), torch.no_grad():
        model(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 10, 128),
              pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
        assert swap.resident != set(range(LAYERS - 2))
        assert torch.equal(model.transformer_blocks[0].norm1.linear.weight, before[
            "transformer_blocks.0.norm1.linear.weight"] + 1)
    swap.prepare_forward()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
