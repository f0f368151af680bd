"""The pretrained tiny SDXL-architecture model of the toy world, shipped in :data:`TOY_MODEL_DIR`.

:func:`load_toy_pipeline` loads it; :func:`encode_prompt_ids` and :func:`add_time_ids` condition the UNet as the
pipeline does (what scripts/pretrain_toy.py trains with). The untrained model it was pretrained from is built
by ``bilora_diffusion.testing.build_toy_components``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from bilora_diffusion.toy.world import IMAGE_SIZE

TOY_MODEL_DIR = Path(__file__).resolve().parent / "sdxl-tiny"
"""The pretrained toy model shipped with the package (diffusers folder layout)."""


def load_toy_pipeline(
    path: str | Path = TOY_MODEL_DIR, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """Load the shipped tiny SDXL offline. float32 by default: the CPU has no fast fp16 kernels."""
    return StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)


def encode_prompt_ids(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    ids: torch.Tensor,
    ids_2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding, as ``StableDiffusionXLPipeline.encode_prompt`` does it (clip_skip=None).

    ids, ids_2: (B, 77) token ids from tokenizer and tokenizer_2. Returns prompt_embeds (B, 77, h1 + h2),
    the concatenated penultimate hidden states, and pooled (B, h2), text_encoder_2's projected EOS state.
    Pretraining must condition exactly as the pipeline does, or sampling would see other embeddings.
    """
    out_1 = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return embeds, out_2.text_embeds


def add_time_ids(batch_size: int, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop top-left, target size) for uncropped square images."""
    ids = torch.tensor([image_size, image_size, 0, 0, image_size, image_size], dtype=torch.float32)
    return ids.repeat(batch_size, 1)
