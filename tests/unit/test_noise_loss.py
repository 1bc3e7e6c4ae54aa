"""Noise maths against diffusers' own scheduler (an independent implementation)."""

import pytest
import torch
from diffusers import DDPMScheduler

from library.maths.loss import per_sample_mse, weighted_batch_loss
from library.maths.noise import ddpm_noisy_and_target, scaled_linear_alphas_cumprod


def _reference():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_alphas_cumprod_matches_diffusers():
    torch.testing.assert_close(scaled_linear_alphas_cumprod(), _reference().alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_noisy_input_and_targets_match_diffusers():
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ref = _reference()
    noisy, target = ddpm_noisy_and_target(scaled_linear_alphas_cumprod(), x0, eps, t, v_prediction=False)
    torch.testing.assert_close(noisy, ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)
    assert torch.equal(target, eps)
    _, v = ddpm_noisy_and_target(scaled_linear_alphas_cumprod(), x0, eps, t, v_prediction=True)
    torch.testing.assert_close(v, ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)


def test_weighted_loss_hand_computed():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    per = per_sample_mse(pred, target)
    assert per.tolist() == [1.0, 4.0]
    # (1 * 1 + 4 * 0.5) / 2 = 1.5 (the second sample is a reg image with prior_loss_weight 0.5)
    assert weighted_batch_loss(per, torch.tensor([1.0, 0.5])).item() == 1.5


def test_clip_skip_uses_earlier_layer_through_final_norm(tiny_sd1):
    from library.families.base import LoadedModels
    from library.families.sd import SDFamily, SDOptions

    models = LoadedModels(tiny_sd1.unet, tiny_sd1.vae, [tiny_sd1.text_encoder], [tiny_sd1.tokenizer])
    te = tiny_sd1.text_encoder
    ids = tiny_sd1.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        skip1 = SDFamily(SDOptions(clip_skip=1)).encode_prompts(models, ["a red circle"], torch.device("cpu"))
        skip2 = SDFamily(SDOptions(clip_skip=2)).encode_prompts(models, ["a red circle"], torch.device("cpu"))
        torch.testing.assert_close(skip1, out.last_hidden_state)
        torch.testing.assert_close(skip2, te.final_layer_norm(out.hidden_states[-2]))
    assert not torch.allclose(skip1, skip2)


# ---- kohya's noise and loss options, each against an independent computation -----------------

from library.maths import noise as nz  # noqa: E402
from library.maths.loss import elementwise_loss  # noqa: E402


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    ref_sched = _reference()
    ref = torch.cumprod(1.0 - rescale_zero_terminal_snr(ref_sched.betas), dim=0)
    ours = nz.scaled_linear_alphas_cumprod(zero_terminal_snr=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert ours[-1] == 0 and abs(ours[0] - ref_sched.alphas_cumprod[0]) < 1e-6


def test_snr_matches_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 1, 250, 999])
    torch.testing.assert_close(nz.snr(nz.scaled_linear_alphas_cumprod(), t), compute_snr(_reference(), t),
                               rtol=1e-4, atol=1e-6)


def _diffusers_min_snr(snr, gamma, v):
    # the formula of diffusers' examples/text_to_image/train_text_to_image.py, written out
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    return weights / (snr + 1) if v else weights / snr


def test_snr_loss_scales_hand_computed():
    snr = torch.tensor([0.5, 4.0, 10.0, 2000.0])
    W = nz.SNRWeighting
    for v in (False, True):
        torch.testing.assert_close(nz.snr_loss_scale(snr, W(min_snr_gamma=5.0), v), _diffusers_min_snr(snr, 5.0, v))
    # min-SNR with v-prediction divides by SNR + 1 (kohya once divided by SNR)
    assert nz.snr_loss_scale(snr, W(min_snr_gamma=5.0), True)[1].item() == pytest.approx(4.0 / 5.0)
    clamped = snr.clamp(max=1000)
    torch.testing.assert_close(nz.snr_loss_scale(snr, W(debiased_estimation=True), False), 1 / clamped.sqrt())
    # debiased estimation with v-prediction: 1 / (SNR + 1) (kohya once used 1/sqrt(SNR) here)
    torch.testing.assert_close(nz.snr_loss_scale(snr, W(debiased_estimation=True), True), 1 / (clamped + 1))
    torch.testing.assert_close(nz.snr_loss_scale(snr, W(scale_v_pred_loss_like_noise_pred=True), True),
                               clamped / (clamped + 1))
    torch.testing.assert_close(nz.snr_loss_scale(snr, W(v_pred_like_loss=0.2), False),
                               1 + 0.2 * (clamped + 1) / clamped)
    both = nz.snr_loss_scale(snr, W(min_snr_gamma=5.0, debiased_estimation=True), True)
    torch.testing.assert_close(both, _diffusers_min_snr(snr, 5.0, True) / (clamped + 1))
    assert nz.snr_loss_scale(snr, W(), False) is None


def test_huber_schedules_and_losses_hand_computed():
    ac = nz.scaled_linear_alphas_cumprod()
    t = torch.tensor([0, 500, 1000 - 1])
    a = ac[t]
    sigma = ((1 - a) / a).sqrt()
    torch.testing.assert_close(nz.huber_c("snr", 0.1, 1.0, t, ac), 0.9 / (1 + sigma) ** 2 + 0.1)
    torch.testing.assert_close(nz.huber_c("exponential", 0.1, 2.0, torch.tensor([0, 1000]), ac),
                               torch.tensor([2.0, 0.2]))
    torch.testing.assert_close(nz.huber_c("constant", 0.1, 3.0, t, ac), torch.full((3,), 0.3))
    pred, target, c = torch.full((1, 1, 1, 1), 3.0), torch.zeros(1, 1, 1, 1), torch.tensor([4.0])
    assert elementwise_loss(pred, target, "l2").item() == 9.0
    assert elementwise_loss(pred, target, "l1").item() == 3.0
    assert elementwise_loss(pred, target, "huber", c).item() == pytest.approx(8.0)  # 2*4*(5-4)
    assert elementwise_loss(pred, target, "smooth_l1", c).item() == pytest.approx(2.0)  # 2*(5-4)


def _rng(n=2, seed=0):
    from library.maths.rng import SampleRNG

    return SampleRNG(seed, [(0, 0, j) for j in range(n)])


def test_noise_offset_is_a_per_channel_constant():
    torch.manual_seed(0)
    noise, latents = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = nz.offset_noise(noise, latents, 0.1, False, None, _rng())
    expected = noise + 0.1 * _rng().randn(4, 1, 1)
    torch.testing.assert_close(out, expected)
    adaptive = nz.offset_noise(noise, latents, 0.1, False, 0.5, _rng())
    strength = (0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    torch.testing.assert_close(adaptive, noise + strength * _rng().randn(4, 1, 1))
    rng = _rng()
    u = _rng().batch_uniform()
    torch.testing.assert_close(nz.offset_noise(noise, latents, 0.1, True, None, rng),
                               noise + 0.1 * u * _rng().randn(4, 1, 1))


def test_multires_noise_unit_std_and_low_frequencies():
    torch.manual_seed(0)
    base = torch.randn(2, 4, 64, 64)
    out = nz.multires_noise(base, 6, 0.8, _rng())
    assert out.shape == base.shape and abs(out.std().item() - 1.0) < 1e-5

    # coarse levels add spatially correlated noise: neighbouring pixels correlate more than in white noise
    def neighbour_corr(x):
        return torch.corrcoef(torch.stack([x[..., :, :-1].flatten(), x[..., :, 1:].flatten()]))[0, 1]

    assert neighbour_corr(out) > neighbour_corr(base) + 0.1


def test_sample_rng_is_keyed_per_sample_not_per_call():
    from library.maths.rng import SampleRNG

    whole = SampleRNG(7, [(1, 3, 0), (1, 3, 1), (1, 3, 2), (1, 3, 3)])
    first, second = SampleRNG(7, [(1, 3, 0), (1, 3, 1)]), SampleRNG(7, [(1, 3, 2), (1, 3, 3)])
    torch.testing.assert_close(whole.randn(4, 2, 2), torch.cat([first.randn(4, 2, 2), second.randn(4, 2, 2)]))
    assert whole.randint(0, 1000).tolist() == first.randint(0, 1000).tolist() + second.randint(0, 1000).tolist()
    assert first.batch_uniform() == second.batch_uniform()  # batch-level draws are shared
    assert not torch.equal(SampleRNG(8, [(1, 3, 0)]).randn(3), SampleRNG(7, [(1, 3, 0)]).randn(3))


def test_input_perturbation_changes_input_not_target():
    torch.manual_seed(0)
    x0, eps, pert = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 400, 900])
    noisy, target = nz.ddpm_noisy_and_target(nz.scaled_linear_alphas_cumprod(), x0, eps, t, False, input_noise=pert)
    torch.testing.assert_close(noisy, _reference().add_noise(x0, pert, t), rtol=1e-5, atol=1e-6)
    assert torch.equal(target, eps)


def test_contradictory_options_are_named():
    probs = nz.DDPMOptions(adaptive_noise_scale=0.1, snr_weighting=nz.SNRWeighting(
        scale_v_pred_loss_like_noise_pred=True)).problems()
    assert "--adaptive_noise_scale needs --noise_offset" in probs
    assert "--scale_v_pred_loss_like_noise_pred needs --v_parameterization" in probs
    assert nz.DDPMOptions(v_parameterization=True, snr_weighting=nz.SNRWeighting(v_pred_like_loss=0.1)).problems()
    assert nz.DDPMOptions(min_timestep=500, max_timestep=500).problems() == []
    assert nz.sample_timesteps(_rng(3), 500, 500).tolist() == [500, 500, 500]
