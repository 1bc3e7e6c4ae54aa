"""The moving average of --ema, hand-computed."""

import pytest
import torch

from library.training.ema import WeightEMA, ema_decay


def test_decay_warms_up_as_diffusers_does():
    assert ema_decay(0.9999, 0) == pytest.approx(0.1) and ema_decay(0.9999, 8) == pytest.approx(0.5)
    assert ema_decay(0.5, 100) == 0.5


def test_updates_swaps_and_state():
    w = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    ema = WeightEMA({"w": w}, decay=0.5, update_every=2, on_cpu=True)
    with torch.no_grad():
        w.copy_(torch.tensor([10.0, 4.0]))
    ema.after_step(1)  # not a multiple of 2: no update
    assert torch.equal(ema.averages["w"], torch.tensor([0.0, 4.0]))
    ema.after_step(2)  # d = min(0.5, 1/10) = 0.1: 0.1 * 0 + 0.9 * 10
    torch.testing.assert_close(ema.averages["w"], torch.tensor([9.0, 4.0]))
    with ema.applied():
        assert torch.equal(w.detach(), torch.tensor([9.0, 4.0]))
    assert torch.equal(w.detach(), torch.tensor([10.0, 4.0]))
    other = WeightEMA({"w": w}, decay=0.5, update_every=2, on_cpu=True)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.averages["w"], ema.averages["w"])
    with pytest.raises(KeyError):
        other.load_state_dict({})
