"""Flow-matching maths (library/maths/flow.py) against diffusers' SD3 training helpers and hand values."""

import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from library.maths import flow


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"])
def test_density_matches_diffusers(scheme):
    ref = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                                generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    if scheme == "logit_normal":  # torch.normal(mean, std) draws mean + std * N(0, 1)
        normal, uniform = torch.randn(64, generator=draws), None
    else:
        uniform, normal = torch.rand(64, generator=draws), None
    ours = flow.density_sample(scheme, uniform, normal, 0.3, 1.2, 1.29)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "uniform", "logit_normal"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(flow.loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())
    assert torch.isfinite(flow.loss_weighting(scheme, torch.zeros(1))).all()  # timestep 0


def test_shift_timesteps_and_interpolation_by_hand():
    assert flow.shift_u(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert flow.shift_u(torch.tensor([0.25]), 1.0).item() == 0.25
    assert flow.timesteps_from_u(torch.tensor([0.0, 0.4999, 0.999]), 0, 1000).tolist() == [0, 499, 999]
    assert flow.timesteps_from_u(torch.tensor([0.5]), 200, 400).tolist() == [300]
    x0, noise = torch.full((1, 2, 2, 2), 2.0), torch.full((1, 2, 2, 2), -1.0)
    noisy, v = flow.noisy_and_velocity(x0, noise, torch.tensor([0.25]))
    assert torch.allclose(noisy, torch.full_like(x0, 0.75 * 2 - 0.25)) and torch.allclose(v, torch.full_like(x0, -3.0))


def test_preconditioned_loss_equals_diffusers_example_formula():
    """diffusers' SD3 example with precondition_outputs: pred * (-sigma) + x_t against x0, weighted.
    Our family computes |sigma v_pred - sigma v|^2 times the same weighting: the same number."""
    from library.families.base import NoisyBatch
    from library.families.sd3 import SD3Family, SD3Options

    torch.manual_seed(0)
    x0, noise, pred = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    timesteps = torch.tensor([100, 500, 900])
    sigmas = timesteps.float() / 1000
    noisy, v = flow.noisy_and_velocity(x0, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    for scheme in ("uniform", "sigma_sqrt", "cosmap"):
        family = SD3Family(SD3Options(flow=flow.FlowOptions(weighting_scheme=scheme)))
        ours = family.per_sample_loss(pred, NoisyBatch(noisy, timesteps, v))
        weighting = compute_loss_weighting_for_sd3(scheme, s)
        reference = (weighting * (pred * (-s) + noisy - x0) ** 2).reshape(3, -1).mean(1)
        assert torch.allclose(ours, reference, rtol=1e-5), scheme
    # sigma_sqrt gives back plain velocity MSE
    family = SD3Family(SD3Options(flow=flow.FlowOptions(weighting_scheme="sigma_sqrt")))
    plain = ((pred - v) ** 2).reshape(3, -1).mean(1)
    assert torch.allclose(family.per_sample_loss(pred, NoisyBatch(noisy, timesteps, v)), plain, rtol=1e-5)


def test_option_problems():
    assert flow.FlowOptions(weighting_scheme="bogus").problems()
    assert flow.FlowOptions(training_shift=0).problems()
    assert flow.FlowOptions(min_timestep=500, max_timestep=100).problems()
    assert not flow.FlowOptions().problems()
    assert math.isclose(flow.shift_u(torch.tensor(1.0), 7.0).item(), 1.0)


def test_positional_embedding_windows():
    """Centred windows equal diffusers' own crop; the scaled table's centred window is the base-size
    sin-cos grid; a crop moves the window."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from library.models.sd3_pos_embed import PosEmbedOptions, scaled_sincos_table, window
    from library.models.tiny import make_tiny_sd3

    pe = make_tiny_sd3(seed=0).transformer.pos_embed
    reference = pe.cropped_pos_embed(16, 12)
    options = PosEmbedOptions(pe)
    assert torch.equal(pe.cropped_pos_embed(16, 12), reference)  # installed, no crop: diffusers' centred window
    options.crop = (0.0, 0.0)
    corner = pe.cropped_pos_embed(16, 12)
    table = pe.pos_embed.reshape(1, 32, 32, -1)
    assert torch.equal(corner, table[:, :8, :6].reshape(1, 48, -1)) and not torch.equal(corner, reference)
    scaled = scaled_sincos_table(32, 24, 16)
    centre = window(scaled, 24, 16, 16, None)
    expected = get_2d_sincos_pos_embed(32, 16, base_size=16, output_type="pt").float()
    assert torch.allclose(centre[0], expected, atol=1e-5)
