"""SDXL loss pieces against hand computations: min-SNR weights, the v-prediction target."""

import torch
from diffusers import DDPMScheduler

from bilora_diffusion.sdxl.loss import denoising_loss, prediction_target


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def test_min_snr_weights_for_epsilon_and_v_prediction():
    sched = scheduler()
    t = torch.tensor([10, 500, 990])
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)  # SNR(t) = alpha_bar / (1 - alpha_bar)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    gamma = 5.0
    eps = denoising_loss(pred, target, sched, t, gamma, "epsilon")
    torch.testing.assert_close(eps, (per_sample * torch.clamp(snr, max=gamma) / snr).mean())
    v = denoising_loss(pred, target, sched, t, gamma, "v_prediction")
    torch.testing.assert_close(v, (per_sample * torch.clamp(snr, max=gamma) / (snr + 1)).mean())
    plain = denoising_loss(pred, target, sched, t, None, "epsilon")
    torch.testing.assert_close(plain, ((pred - target) ** 2).mean())


def test_v_prediction_target():
    sched = scheduler()
    t = torch.tensor([3, 700])
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target(sched, x0, noise, t, "v_prediction"), a * noise - s * x0)
    assert prediction_target(sched, x0, noise, t, "epsilon") is noise


# -- SampleGeometry ---------------------------------------------------------------------------------------------


# -- latent cache -----------------------------------------------------------------------------------------------


# -- validation samples -----------------------------------------------------------------------------------------
