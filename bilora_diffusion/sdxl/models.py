"""SDXL components and conditioning, exactly as diffusers' SDXL LoRA training scripts do it."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from .components import SDXLComponents
from .single_file import is_single_file, load_single_file_components, load_vae_file


def load_components(
    path: str,
    vae_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> SDXLComponents:
    """Load the base model's parts from a Hub id, a local diffusers folder, or one SGM-layout .safetensors file
    (configs from ``single_file_config`` or the shipped SDXL base 1.0 ones; every tensor checked against the
    file). float32; the trainer casts."""
    if is_single_file(path):
        return load_single_file_components(path, single_file_config, vae_path)
    kw = {"revision": revision}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
    if vae_path and is_single_file(vae_path):
        vae = load_vae_file(vae_path, path)
    elif vae_path:
        vae = AutoencoderKL.from_pretrained(vae_path, **kw)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)
    return SDXLComponents(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", variant=variant, **kw
        ),
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **kw),
        tokenizer_2=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
    )


def tokenize(tokenizers: list[object], captions: list[str]) -> list[torch.Tensor]:
    return [
        tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tok in tokenizers
    ]


def encode_prompt(
    text_encoders: list[torch.nn.Module], input_ids: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: the penultimate hidden states of both encoders concatenated on the feature
    axis ([B, 77, 768 + 1280] on SDXL), and the pooled projection of encoder 2 ([B, 1280])."""
    embeds = []
    pooled = None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=True)
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's value is kept)
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """The VAE's downsampling from pixels to latents (8 on SDXL), as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
