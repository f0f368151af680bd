"""A tiny random LlamaForCausalLM and a word-level tokenizer made locally, for tests and offline smoke runs.

The tokenizer is a `tokenizers` WordLevel model behind `PreTrainedTokenizerFast`: every listed word (and the
numbers 0..99) is one token, so tests can write expected token ids by hand. It adds a BOS token like Llama's
(``<s> $A``) and carries a small chat template of the same shape as real ones (BOS from the template, a role
marker before each turn, EOS after each assistant turn), so the chat path runs through
``apply_chat_template`` exactly as with a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
