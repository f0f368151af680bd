"""The parts of an SDXL pipeline a trainer holds, and casting them without warnings a user cannot act on.

A leaf module: `models` (loading from a folder or the Hub) and `single_file` (loading from one SGM-layout
file) both build `SDXLComponents`, and neither imports the other's loader for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection


@dataclass
class SDXLComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: DDPMScheduler

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    @property
    def tokenizers(self) -> list[object]:
        return [self.tokenizer, self.tokenizer_2]


def dtype_kwargs(dtype) -> dict:
    """The ``from_pretrained`` keyword for a dtype: ``dtype=`` where diffusers has it (``torch_dtype`` is
    deprecated there with a FutureWarning), ``torch_dtype=`` on the older diffusers this project supports."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def cast(model, device=None, dtype=None):
    """``model.to(device, dtype)``. A diffusers model that keeps no module in float32 (the SDXL UNet and VAE)
    is cast by torch's own ``Module.to``: diffusers' ``to()`` logs "There are modules in ... that should be
    kept in float32: []" on every dtype cast, even when that list is empty. A model that does keep some in
    float32, or a quantized one, goes through its own ``to()``."""
    import torch

    if device is not None:
        model = model.to(device)
    if dtype is None:
        return model
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "is_quantized", False):
        return model.to(dtype=dtype)
    return torch.nn.Module.to(model, dtype=dtype)
