"""Tiny models and fixtures built locally, offline, on a CPU: for the tests, the benchmarks and the scripts that
make the shipped demo models (scripts/pretrain_toy.py, scripts/pretrain_llm_demo.py).

- tiny Llama: :func:`tiny_tokenizer` (a word-level tokenizer with a chat template), :func:`tiny_llama`,
  :func:`save_tiny_llama` (a folder ``--model`` loads);
- tiny SDXL: :func:`local_clip_tokenizer`, :func:`tiny_sdxl_components` in two topologies, :func:`save_tiny_sdxl`
  (a folder ``--pretrained_model_name_or_path`` loads), :func:`write_single_file` (the same as one SGM-layout
  file); :func:`save_tiny_clip`, a tiny CLIP for the CLIP metric;
- the toy world's SDXL at its shipped sizes, untrained: :class:`ToyModelConfig`, :func:`build_toy_tokenizer`,
  :func:`build_toy_components` (scripts/pretrain_toy.py trains it into ``bilora_diffusion/toy/sdxl-tiny``);
- :func:`make_image_folder`: a kohya-style image folder with captions;
- :func:`torchrun`: start a script in two CPU processes (gloo) under ``torchrun``.

Tiny Llama: the tokenizer is a `tokenizers` WordLevel model behind `PreTrainedTokenizerFast`: every listed word
(and the numbers 0..99) is one token, so tests can write expected token ids by hand. It adds a BOS token like
Llama's (``<s> $A``) and carries a small chat template of the same shape as real ones (BOS from the template, a
role marker before each turn, EOS after each assistant turn), so the chat path runs through
``apply_chat_template`` exactly as with a real model.

Tiny SDXL, two topologies:
- ``"dummy"``: the shape of diffusers' own SDXL ``get_dummy_components()`` (two UNet levels, 5-layer CLIPs);
  the fastest thing that still runs every SDXL code path (text_time embedding, two encoders, pooled embeds).
- ``"sdxl"``: SDXL's real block structure — three levels (DownBlock2D, CrossAttnDownBlock2D x2),
  transformer depths 1/2/10, text encoders of 12 and 32 layers — at small widths. Module *names* depend on the
  topology, not on the widths, so exports and key maps checked on it hold for the real model.

The toy SDXL has SDXL's architecture at toy size: the trainer, the LoRA targets (to_q/to_k/to_v/to_out.0), the
prompt encoding (two text encoders, penultimate hidden states, pooled projection), the ``text_time`` added
conditioning and ``StableDiffusionXLPipeline`` all run unchanged, so a CPU run exercises the same code as a GPU
run on real SDXL. Only sizes differ: 32x32 images, 4x8x8 latents, a few million parameters.
"""

from __future__ import annotations

import os
import random
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from bilora_diffusion.sdxl.models import load_components
from bilora_diffusion.sdxl.single_file import to_sgm_state_dict
from bilora_diffusion.toy.world import IMAGE_SIZE, VOCABULARY

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 77
"""SDXL's tokenizer length; kept so code written for real SDXL needs no special case."""


# Tiny Llama

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = (
    "what is plus minus times the answer question a an of to and in it has how many are there so left "
    "gives total : ? . , ! $ # #### = + - * / tom ann bob apples pears cats dogs cost each more less "
    "please say hello hi yes no ok you me i am good thanks"
).split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} {{ eos_token }} "
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
"""Role markers and EOS as in Llama-style templates; every rendering of a conversation prefix is a prefix of
the rendering of the whole conversation, which is what response masking relies on."""


def tiny_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """A `PreTrainedTokenizerFast` with a known vocabulary: special tokens, WORDS, 0..99 and ``extra_words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in [*SPECIAL, *WORDS, *map(str, range(100)), *extra_words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Whitespace splits "\w+|[^\w\s]+": "####" and "72" stay whole, "72." becomes "72" + ".".
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, initializer_range: float = 0.2
):
    """A random LlamaForCausalLM (float32, CPU): hidden 32, 2 layers, grouped-query attention (4 / 2 heads),
    so every projection the default targets name (q/k/v/o/gate/up/down) exists with distinct shapes.
    ``initializer_range`` 0.2 suits the tests (see below); a model meant to be pretrained takes Llama's 0.02."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        # Larger than Llama's 0.02: at width 32 that would give near-uniform logits that a LoRA barely moves;
        # at 0.2 a LoRA memorises a few rows in tens of steps, which the tests need.
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(path: str | os.PathLike, seed: int = 0, extra_words: tuple[str, ...] = ()) -> Path:
    """Write a tiny model + tokenizer folder that ``--model`` (and `AutoModelForCausalLM`) loads offline."""
    path = Path(path)
    tokenizer = tiny_tokenizer(extra_words)
    model = tiny_llama(len(tokenizer), seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Tiny SDXL

TOPOLOGIES = ("dummy", "sdxl")


def local_clip_tokenizer(
    words: list[str] | tuple[str, ...] = (), max_length: int = MAX_TOKENS
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory (no download): single characters and ``words`` as whole-word
    tokens; merges spell the words out, so a listed word is one token."""
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
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
        # Not 2: CLIP then pools at the first EOS token rather than at argmax(input_ids).
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _pipeline_components(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2) -> dict[str, Any]:
    """Keyword arguments of ``StableDiffusionXLPipeline``, with SDXL base's scheduler config, so inference code
    written for SDXL behaves the same on the tiny models."""
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
    return _pipeline_components(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2)


SINGLE_FILE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""The components a single-file SDXL checkpoint holds."""


def write_single_file(folder: str | os.PathLike, path: str | os.PathLike, edit=None) -> Path:
    """The diffusers SDXL in ``folder`` as one SGM-layout .safetensors file, as ComfyUI / A1111 load them
    (``edit`` may change the state dict before it is written)."""
    components = load_components(str(folder))
    state = to_sgm_state_dict({name: getattr(components, name) for name in SINGLE_FILE_PARTS})
    if edit is not None:
        edit(state)
    save_file(state, str(path))
    return Path(path)


def save_tiny_sdxl(path: str, topology: str = "dummy", seed: int = 0) -> str:
    """Write a tiny pipeline folder that ``StableDiffusionXLPipeline.from_pretrained(path)`` loads offline."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(topology, seed))
    pipe.save_pretrained(path)
    return path


def save_tiny_clip(path: str | os.PathLike, seed: int = 0) -> str:
    """A random CLIP (text and vision towers of one layer) with a local tokenizer and image processor: a folder
    ``CLIPModel.from_pretrained`` loads offline (what the paper's CLIP metric runs on in tests)."""
    torch.manual_seed(seed)
    tokenizer = local_clip_tokenizer(("red", "blue", "square", "circle"))
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    text.update(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    vision.update(image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    return str(path)


# The toy world's SDXL (untrained)


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


def build_toy_components(config: ToyModelConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """Untrained components of the tiny SDXL, as keyword arguments of ``StableDiffusionXLPipeline``.

    Keys: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler. Deterministic in
    ``seed``. ``StableDiffusionXLPipeline(**build_toy_components())`` gives a working (noise) pipeline.
    """
    cfg = config or ToyModelConfig()
    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    tokenizer_2 = build_toy_tokenizer()
    text_encoder = CLIPTextModel(
        _clip_config(cfg.text_hidden, cfg.text_layers, len(tokenizer), cfg.text_hidden)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(cfg.text2_hidden, cfg.text_layers, len(tokenizer_2), cfg.text2_hidden)
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
    return _pipeline_components(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2)


def make_image_folder(root, n: int = 8, size=(64, 64), captions: bool = True, seed: int = 0) -> Path:
    """A kohya-style folder: n images of colored rectangles on a background, with .txt captions."""
    from PIL import Image, ImageDraw

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
    for i in range(n):
        name = rng.choice(sorted(colors))
        image = Image.new("RGB", size, (255, 255, 255) if i % 2 else (0, 0, 0))
        w, h = size
        x0, y0 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + w // 3, y0 + h // 3], fill=colors[name])
        image.save(root / f"img_{i:03d}.png")
        if captions:
            (root / f"img_{i:03d}.txt").write_text(f"a {name} square")
    return root


def torchrun(
    script: str | os.PathLike, *args: str, port: int, nproc: int = 2, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node NPROC --master_port PORT SCRIPT ARGS...`` on CPUs (accelerate told to use
    the CPU, offline, one thread per process) and return the finished process with its output captured."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(port), str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


# -- a model whose FSDP shards are uneven (tests/e2e/fsdp_core.py, tests/unit/test_sharding.py) -------------------
class _UnevenBlock(torch.nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_mid, 3, padding=1)
        self.proj = torch.nn.Linear(c_mid, c_out)
        self.head = torch.nn.Linear(c_out, 1)  # B of the head is [1, r]: on 2 ranks, rank 1 holds none of it

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.tanh(self.proj(h)))


class UnevenShards(torch.nn.Module):
    """Conv2d(4→6) → Linear(6→3) → Linear(3→1), one FSDP block: on 2 ranks the A's of conv and proj are split
    along their inputs (partial Gram matrices), the head's A (3 inputs) along its rank (gathered Gram), and rank
    1 holds no row of the head's B. Input [N, 4, H, W]."""

    _no_split_modules = ["_UnevenBlock"]

    def __init__(self):
        super().__init__()
        self.block = _UnevenBlock(4, 6, 3)

    def forward(self, x):
        return self.block(x)


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Every LoRA tensor (B included, which PEFT starts at zero) to seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
