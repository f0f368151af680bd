"""Tag-style captions as kohya's sd-scripts treat them: ``1girl, solo, red hair, smiling`` is a list of tags;
``--shuffle_caption`` shuffles them, ``--keep_tokens N`` keeps the first N in place (the trigger word),
``--caption_tag_dropout p`` drops each of the other tags with probability p, ``--caption_separator`` splits them.

Every draw comes from the generator the caller passes (the trainer seeds it from seed, epoch and sample), so a
caption is a function of (seed, step, sample) and an exact resume sees the same captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TagOptions:
    """How captions are treated as tags (the trainer's --shuffle_caption, --keep_tokens, ...)."""

    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","
    tag_dropout: float = 0.0

    @property
    def varies(self) -> bool:
        """Whether a caption can change from one step to the next (then text embeddings cannot be cached)."""
        return self.shuffle or self.tag_dropout > 0


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags, stripped, empty ones (a trailing separator) left out."""
    return [tag for tag in (t.strip() for t in caption.split(separator)) if tag]


def join_tags(tags: list[str], separator: str = ",") -> str:
    """Tags written back with the separator and a space (``a, b``), as kohya writes them."""
    joiner = separator if separator[-1:].isspace() else separator + " "
    return joiner.join(tags)


def process_caption(caption: str, tags: TagOptions, generator: torch.Generator) -> str:
    """One draw of ``caption``: the first ``keep_tokens`` tags in place, the others shuffled (``shuffle``),
    then each of them dropped with probability ``tag_dropout``. A caption is returned unchanged when nothing
    varies; an empty caption (a dropped one) stays empty."""
    if not tags.varies or not caption:
        return caption
    parts = split_tags(caption, tags.separator)
    kept, rest = parts[: tags.keep_tokens], parts[tags.keep_tokens :]
    if tags.shuffle and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    if tags.tag_dropout > 0 and rest:
        draws = torch.rand(len(rest), generator=generator).tolist()
        rest = [tag for tag, u in zip(rest, draws) if u >= tags.tag_dropout]
    return join_tags(kept + rest, tags.separator)
