"""The tiny SDXL-architecture model of the toy world: configs, tokenizers, and untrained components.

Why SDXL's architecture at toy size: the trainer, the LoRA targets (to_q/to_k/to_v/to_out.0), the prompt
encoding (two text encoders, penultimate hidden states, pooled projection), the ``text_time`` added
conditioning and ``StableDiffusionXLPipeline`` all run unchanged, so a CPU run exercises the same code as a
GPU run on real SDXL. Only sizes differ: 32x32 images, 4x8x8 latents, a few million parameters.

:func:`build_toy_components` returns untrained components (for tests and for pretraining);
:func:`load_toy_pipeline` loads the pretrained model shipped in :data:`TOY_MODEL_DIR`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bilora_diffusion.toy.world import IMAGE_SIZE, VOCABULARY

TOY_MODEL_DIR = Path(__file__).resolve().parent / "sdxl-tiny"
"""The pretrained toy model shipped with the package (diffusers folder layout)."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 77
"""SDXL's tokenizer length; kept so code written for real SDXL needs no special case."""


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the tiny SDXL. Defaults are what the shipped model uses."""

    image_size: int = IMAGE_SIZE
    """Pixels per side; the VAE downsamples 4x (three blocks), so latents are image_size / 4."""
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (64, 128, 128)
    """SDXL's three levels (320, 640, 1280 in the real model)."""
    unet_layers_per_block: int = 1
    unet_heads: tuple[int, ...] = (2, 4, 4)
    """Attention heads per level (diffusers calls this ``attention_head_dim``, as SDXL's config does)."""
    text_hidden: int = 32
    """Width of text_encoder (CLIP-L's 768 in SDXL)."""
    text2_hidden: int = 64
    """Width and projection size of text_encoder_2 (OpenCLIP-bigG's 1280 in SDXL)."""
    text_layers: int = 2
    """Two layers at least: SDXL reads the penultimate hidden state."""
    time_embed_dim: int = 8
    """``addition_time_embed_dim`` (256 in SDXL): the six size/crop ids each take this many features."""


def _bpe_merges(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE merges that turn every word (with CLIP's ``</w>`` suffix) into a single symbol.

    Why learn rather than write merges per word: BPE applies merges by global rank, so a hand-written
    ``r e`` (for "red") would split "green" wrongly. Merging the most frequent adjacent pair over all
    words, until each is one symbol, gives merges that reproduce themselves at encoding time.
    """
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    symbols = sorted({s for seq in seqs for s in seq})
    merges: list[tuple[str, str]] = []
    while any(len(seq) > 1 for seq in seqs):
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        pair = min(counts, key=lambda p: (-counts[p], p))  # deterministic tie-break
        merges.append(pair)
        symbols.append(pair[0] + pair[1])
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == pair:
                    out.append(pair[0] + pair[1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return symbols, merges


def build_toy_tokenizer(words: tuple[str, ...] = VOCABULARY) -> CLIPTokenizer:
    """A CLIPTokenizer that maps each caption word to exactly one token (ids 0 and 1 are BOS and EOS).

    Built locally from the word list, so no download is needed; ``save_pretrained`` makes it loadable
    offline with ``CLIPTokenizer.from_pretrained``.
    """
    symbols, merges = _bpe_merges(sorted(set(words)))
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    ids = tokenizer(list(words), add_special_tokens=False).input_ids
    bad = [w for w, i in zip(words, ids, strict=True) if len(i) != 1]
    if bad:
        raise RuntimeError(f"toy tokenizer splits {bad} into several tokens")
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        # Not 2: CLIP then pools at the first EOS token rather than at argmax(input_ids).
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_toy_components(config: ToyModelConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """Untrained components of the tiny SDXL, as keyword arguments of ``StableDiffusionXLPipeline``.

    Keys: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler. Deterministic in
    ``seed``. ``StableDiffusionXLPipeline(**build_toy_components())`` gives a working (noise) pipeline.
    """
    cfg = config or ToyModelConfig()
    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    tokenizer_2 = build_toy_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, cfg.text_hidden, cfg.text_layers, cfg.text_hidden))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, cfg.text2_hidden, cfg.text_layers, cfg.text2_hidden)
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=cfg.image_size,
        scaling_factor=1.0,  # set from the trained encoder's latent std by scripts/pretrain_toy.py
    )
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=32,
        cross_attention_dim=cfg.text_hidden + cfg.text2_hidden,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.time_embed_dim + cfg.text2_hidden,
        transformer_layers_per_block=1,
    )
    # SDXL base's scheduler config, so inference code written for SDXL behaves the same here.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
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


def config_dict(config: ToyModelConfig) -> dict[str, Any]:
    """JSON-ready form of a :class:`ToyModelConfig` (saved in checkpoints)."""
    return asdict(config)


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
