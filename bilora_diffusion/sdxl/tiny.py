"""Tiny SDXL pipelines built from configs, offline: for tests, benchmarks and the embedded default.

Two topologies:
- ``"dummy"``: the shape of diffusers' own SDXL ``get_dummy_components()`` (two UNet levels, 5-layer CLIPs);
  the fastest thing that still runs every SDXL code path (text_time embedding, two encoders, pooled embeds).
- ``"sdxl"``: SDXL's real block structure — three levels (DownBlock2D, CrossAttnDownBlock2D x2),
  transformer depths 1/2/10, text encoders of 12 and 32 layers — at small widths. Module *names* depend on the
  topology, not on the widths, so exports and key maps checked on it hold for the real model.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOPOLOGIES = ("dummy", "sdxl")


def local_clip_tokenizer(words: list[str] | tuple[str, ...] = (), max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory (no download): single characters and ``words`` as whole-word
    tokens; merges spell the words out, so a listed word is one token."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.-'!?":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        # Left-to-right merges: ("r","e") -> "re", ("re","d</w>") -> "red</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merges.append((current, nxt))
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _clip_config(hidden: int, layers: int, vocab_size: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def tiny_sdxl_components(topology: str = "dummy", seed: int = 0, words: tuple[str, ...] = ()) -> dict:
    """Random-weight components of a StableDiffusionXLPipeline (float32, CPU)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    torch.manual_seed(seed)
    tokenizer = local_clip_tokenizer(words)
    tokenizer_2 = local_clip_tokenizer(words)
    hidden1, hidden2, proj = 16, 32, 32
    te_layers = (5, 5) if topology == "dummy" else (12, 32)
    text_encoder = CLIPTextModel(_clip_config(hidden1, te_layers[0], len(tokenizer), proj))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(hidden2, te_layers[1], len(tokenizer_2), proj))
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2 if topology == "sdxl" else 1,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + proj,
        cross_attention_dim=hidden1 + hidden2,
        use_linear_projection=True,
        norm_num_groups=8,
    )
    if topology == "dummy":
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            **common,
        )
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 2, 10),
            **common,
        )
    # Four levels: the 8x downsampling of SDXL's VAE, so latent sizes are those of the real model.
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        layers_per_block=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def save_tiny_sdxl(path: str, topology: str = "dummy", seed: int = 0) -> str:
    """Write a tiny pipeline folder that ``StableDiffusionXLPipeline.from_pretrained(path)`` loads offline."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(topology, seed))
    pipe.save_pretrained(path)
    return path
