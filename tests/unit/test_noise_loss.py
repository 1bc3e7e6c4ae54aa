"""Noise maths against diffusers' own scheduler (an independent implementation)."""

import torch
from diffusers import DDPMScheduler

from library.training.loss import per_sample_mse, weighted_batch_loss
from library.training.noise import ddpm_noisy_and_target, scaled_linear_alphas_cumprod


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
