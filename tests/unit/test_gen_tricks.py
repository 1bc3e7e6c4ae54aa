"""gen_img's sampling tricks against independent references: Deep Shrink against a UNet forward
written out in kohya's input-block order, Gradual Latent's step against diffusers' own ancestral
Euler step, the unsharp mask against a direct 2-D Gaussian sum, and the start-noise tricks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.sampling.deep_shrink import DeepShrink, apply_deep_shrink, input_block_modules
from library.sampling.gradual_latent import GradualLatent, GradualLatentEulerA, Unsharp, unsharp_mask
from library.sampling.samplers import build_scheduler
from library.sampling.start_noise import NoiseTricks


def _bicubic(h, **size):
    return F.interpolate(h, mode="bicubic", align_corners=False, **size)


def ldm_order_forward(unet, x, t, ctx, depth: int | None, ratio: float) -> torch.Tensor:
    """The UNet run block by block as the original SD code runs it: the input of input block
    ``depth`` shrunk, and a hidden state enlarged to its skip's size before every join."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    blocks = [unet.conv_in]
    for down in unet.down_blocks:
        for i, res in enumerate(down.resnets):
            attn = down.attentions[i] if getattr(down, "attentions", None) else None
            blocks.append(lambda h, res=res, attn=attn: attn(res(h, emb), encoder_hidden_states=ctx).sample
                          if attn is not None else res(h, emb))
        if down.downsamplers:
            blocks.append(down.downsamplers[0])
    skips, h = [], x
    for k, block in enumerate(blocks):
        if k == depth:
            h = _bicubic(h, scale_factor=ratio)
        h = block(h)
        skips.append(h)
    h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
    for up in unet.up_blocks:
        for i, res in enumerate(up.resnets):
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = _bicubic(h, size=skip.shape[-2:])
            h = res(torch.cat([h, skip], dim=1), emb)
            if getattr(up, "attentions", None):
                h = up.attentions[i](h, encoder_hidden_states=ctx).sample
        if up.upsamplers:
            h = up.upsamplers[0](h)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_deep_shrink_equals_the_original_block_order(tiny_sd1, depth):
    """Depth 1 joins a mismatched skip inside an up block, depth 2 at an up block's start, depth 3
    after an up block's first layer without attention: all three ways of the hooks."""
    unet = tiny_sd1.unet
    assert len(input_block_modules(unet)) == 4  # conv_in, resnet, downsampler, resnet
    torch.manual_seed(depth)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    ds = DeepShrink(depth, timesteps_1=600, ratio=0.5)
    with torch.no_grad():
        with apply_deep_shrink(unet, ds):
            early = unet(x, torch.tensor([700, 700]), ctx).sample
            late = unet(x, torch.tensor([500, 500]), ctx).sample
        plain_early = unet(x, torch.tensor([700, 700]), ctx).sample
        plain_late = unet(x, torch.tensor([500, 500]), ctx).sample
        reference = ldm_order_forward(unet, x, torch.tensor([700, 700]), ctx, depth, 0.5)
        unshrunk = ldm_order_forward(unet, x, torch.tensor([700, 700]), ctx, None, 0.5)
    assert torch.allclose(unshrunk, plain_early, atol=1e-5)  # the reference is the UNet when not shrinking
    assert torch.allclose(early, reference, atol=1e-5)
    assert (early - plain_early).abs().max() > 1e-2  # shrinking changed the prediction
    assert torch.equal(late, plain_late)  # below timesteps_1 the UNet is untouched
    # the hooks are gone after the with block
    assert torch.equal(unet(x, torch.tensor([700, 700]), ctx).sample, plain_early)


def test_deep_shrink_second_depth_between_the_two_timesteps():
    ds = DeepShrink(3, timesteps_1=800, depth_2=2, timesteps_2=400)
    assert [ds.depth_at(t) for t in (900, 800, 799, 400, 399)] == [3, 3, 2, 2, None]


def _gl_scheduler(gl: GradualLatent, steps: int = 6):
    base = build_scheduler("euler_a")
    s = GradualLatentEulerA.from_config(base.config)
    s.gradual_latent, s.full_size = gl, (16, 16)
    s.set_timesteps(steps)
    return base, s


def test_gradual_latent_step_is_diffusers_step_then_enlarged():
    """A growing step = diffusers' ancestral step without its noise, enlarged, plus fresh noise of
    the new size times sigma_up * s_noise; other steps are diffusers' step exactly."""
    gl = GradualLatent(start_timesteps=1000, ratio=0.5, ratio_step=0.25, every_n_steps=2, s_noise=0.7)
    base, ours = _gl_scheduler(gl)
    base.set_timesteps(6)
    sample, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = ours.timesteps[0]
    # diffusers: det + n * sigma_up with n drawn from the generator; recover det from the same draw
    g = torch.Generator().manual_seed(5)
    n_small = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    diffusers_out = base.step(eps, t, sample, generator=g).prev_sample
    s_from, s_to = base.sigmas[0], base.sigmas[1]
    sigma_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    det = diffusers_out - n_small * sigma_up
    grown = ours.step(eps, t, sample, generator=torch.Generator().manual_seed(5)).prev_sample
    assert grown.shape == (1, 4, 8, 8)  # ratio 0.5 -> 0.75 of 16 is 12, kept a multiple of 8 -> 8
    n_big = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = _bicubic(det, size=(8, 8)) + n_big * sigma_up * 0.7
    assert torch.allclose(grown, expected, atol=1e-5)
    # the next step (only 1 step since growing, every_n_steps 2) is diffusers' step
    t1 = ours.timesteps[1]
    ours_next = ours.step(eps, t1, grown, generator=torch.Generator().manual_seed(6)).prev_sample
    base_next = base.step(eps, t1, grown, generator=torch.Generator().manual_seed(6)).prev_sample
    assert torch.equal(ours_next, base_next)


def test_gradual_latent_sizes_over_a_run_end_at_full_size():
    gl = GradualLatent(start_timesteps=700, ratio=0.5, ratio_step=0.25, every_n_steps=2)
    _, s = _gl_scheduler(gl, steps=8)
    x, sizes = torch.randn(1, 4, 8, 8), []
    for t in s.timesteps:
        s.scale_model_input(x, t)
        x = s.step(torch.zeros_like(x), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        sizes.append(x.shape[-1])
    first_below = next(i for i, t in enumerate(s.timesteps) if t < 700)
    assert sizes[:first_below] == [8] * first_below  # before the start timestep: no growth
    assert sizes[first_below] == 8 and sizes[-1] == 16  # 0.75 * 16 = 12 -> 8; the last step reaches 16
    assert sizes.index(16) == min(first_below + 2, len(sizes) - 1)


def test_unsharp_mask_equals_a_direct_gaussian_sum():
    u = Unsharp(5, 1.3, 0.6)
    x = torch.randn(1, 2, 7, 9)
    r = 2
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.3) ** 2)
    k2 = np.outer(taps, taps) / np.outer(taps, taps).sum()
    xn = x.numpy()

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    blurred = np.zeros_like(xn)
    for c in range(2):
        for yy in range(7):
            for xx in range(9):
                blurred[0, c, yy, xx] = sum(k2[i + r, j + r] * xn[0, c, reflect(yy + i, 7), reflect(xx + j, 9)]
                                            for i in range(-r, r + 1) for j in range(-r, r + 1))
    expected = xn + 0.6 * (xn - blurred)
    assert np.allclose(unsharp_mask(x, u).numpy(), expected, atol=1e-5)


def test_unsharp_params_parse_and_reject():
    assert Unsharp.parse("3,0.5,0.5") == Unsharp(3, 0.5, 0.5, True)
    assert Unsharp.parse("5, 1, 0.3, 0") == Unsharp(5, 1.0, 0.3, False)
    for bad in ("3,0.5", "4,0.5,0.5", "3,0,0.5"):
        with pytest.raises(ValueError):
            Unsharp.parse(bad)


def test_noise_tricks_are_per_seed_and_in_range():
    noise = torch.randn(1, 4, 16, 16)
    off = NoiseTricks(offset_prob=1.0, offset_range=(0.2, 0.3))
    shifted, applied = off.apply(noise, seed=7)
    delta = (shifted - noise).flatten()
    assert torch.allclose(delta, delta[0].expand_as(delta)) and 0.2 <= applied["noise offset"] <= 0.3
    assert torch.equal(off.apply(noise, seed=7)[0], shifted)  # the same seed draws the same
    assert not torch.equal(off.apply(noise, seed=8)[0], shifted)
    pyramid, applied = NoiseTricks(pyramid_prob=1.0, pyramid_discount_range=(0.5, 0.5)).apply(noise, seed=7)
    assert applied == {"pyramid noise discount": 0.5} and abs(pyramid.std().item() - 1) < 1e-4
    assert NoiseTricks().apply(noise, seed=7) == (noise, {})
    rate = sum(bool(NoiseTricks(offset_prob=0.3).apply(noise, seed=s)[1]) for s in range(400)) / 400
    assert 0.2 < rate < 0.4
