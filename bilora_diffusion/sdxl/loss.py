"""The SDXL denoising loss of one micro-batch: noise, timesteps, target, min-SNR weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .models import encode_prompt, tokenize


@dataclass
class MicroBatch:
    """One micro-batch, ready for the UNet. Noise and timesteps are drawn before the step so that every pass
    of a step (lora-sam's two) sees the same ones."""

    latents: torch.Tensor  # [B, 4, h, w], scaled
    time_ids: torch.Tensor  # [B, 6]
    captions: list[str]  # after caption dropout ("" = dropped)
    keys: list[str]  # the samples' files, for messages
    noise: torch.Tensor  # [B, 4, h, w]
    timesteps: torch.Tensor  # [B] long
    prompt_embeds: torch.Tensor | None = None  # cached text embeddings (frozen text encoders)
    pooled: torch.Tensor | None = None
    n_instance: int | None = (
        None  # prior preservation: rows [:n_instance] are instance, the rest class samples
    )


def draw_noise(
    latents: torch.Tensor, num_timesteps: int, noise_offset: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
    return noise, timesteps


def prediction_target(
    scheduler: DDPMScheduler, latents, noise, timesteps, prediction_type: str
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    snr_gamma: float | None,
    prediction_type: str,
    n_instance: int | None = None,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """MSE, optionally with min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma)/SNR for epsilon targets,
    min(SNR, gamma)/(SNR + 1) for v-prediction (whose loss already carries a factor SNR + 1).

    With ``n_instance`` (DreamBooth prior preservation, rows ``[instance; class]``): diffusers' loss
    ``mean(instance rows) + prior_loss_weight · mean(class rows)``, each row weighted as above."""
    if snr_gamma is None and n_instance is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = loss.mean(dim=list(range(1, loss.ndim)))
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
        per_sample = per_sample * weights.to(loss.device)
    if n_instance is None:
        return per_sample.mean()
    from .prior import prior_loss

    return prior_loss(per_sample, n_instance, prior_loss_weight)[0]


def micro_batch_loss(
    mb: MicroBatch,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    text_encoders: list[torch.nn.Module],
    tokenizers: list,
    accelerator,
    dtype: torch.dtype,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """The SDXL loss of one micro-batch, as the trainer (and the step-cost benchmark) computes it: noise the
    latents, condition on cached or freshly encoded prompts (dropped captions = zero embeddings), predict,
    compare with the target."""
    device = accelerator.device
    latents, noise, timesteps = mb.latents.to(device), mb.noise.to(device), mb.timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if mb.prompt_embeds is not None:
        embeds, pooled = mb.prompt_embeds.to(device), mb.pooled.to(device)
    else:
        with accelerator.autocast():
            embeds, pooled = encode_prompt(text_encoders, tokenize(tokenizers, mb.captions))
        keep = torch.tensor([bool(t) for t in mb.captions], device=device, dtype=embeds.dtype)
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
    with accelerator.autocast():
        pred = unet(
            noisy.to(dtype),
            timesteps,
            embeds.to(dtype),
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": mb.time_ids.to(device, dtype)},
        ).sample
    target = prediction_target(scheduler, latents, noise, timesteps, prediction_type)
    return denoising_loss(
        pred, target, scheduler, timesteps, snr_gamma, prediction_type, mb.n_instance, prior_loss_weight
    )
