"""Tag-style captions (--shuffle_caption, --keep_tokens, --caption_separator, --caption_tag_dropout) against
references: the first k tags stay in place, the rest is a permutation (or a subset under dropout), the dropout
rate, determinism per (seed, step, sample), the text-embedding cache turned off (exact resume: tests/e2e/test_captions.py)."""

import math
from collections import Counter

import pytest
import torch

from bilora_diffusion.data.captions import TagOptions, join_tags, process_caption, split_tags
from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.sdxl.train import SDXLTrainer
from bilora_diffusion.training import seeded

TAGS = [f"tag{i}" for i in range(8)]
CAPTION = ", ".join(TAGS)


def draw(tags: TagOptions, seed: int, caption: str = CAPTION) -> list[str]:
    return split_tags(process_caption(caption, tags, torch.Generator().manual_seed(seed)), tags.separator)


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_shuffle_keeps_the_first_k_tags_and_permutes_the_rest(keep):
    tags = TagOptions(shuffle=True, keep_tokens=keep)
    orders = set()
    for seed in range(200):
        out = draw(tags, seed)
        assert out[:keep] == TAGS[:keep]
        assert sorted(out[keep:]) == sorted(TAGS[keep:])  # a permutation: nothing lost, nothing repeated
        orders.add(tuple(out[keep:]))
    # (8-keep)! orders: 200 uniform draws see about 98 of 5! = 120, and nearly 200 of 7! or 8!.
    assert len(orders) > min(150, 0.7 * math.factorial(8 - keep))
    first = Counter(draw(tags, seed)[keep] for seed in range(2000))
    for tag in TAGS[keep:]:  # every remaining tag leads equally often (uniform permutation)
        assert abs(first[tag] / 2000 - 1 / (8 - keep)) < 0.05, (tag, first)


def test_tag_dropout_rate_and_kept_tags():
    p, keep, n = 0.3, 2, 4000
    tags = TagOptions(keep_tokens=keep, tag_dropout=p)
    dropped = 0
    for seed in range(n):
        out = draw(tags, seed)
        assert out[:keep] == TAGS[:keep]  # never dropped
        rest = out[keep:]
        assert rest == [t for t in TAGS[keep:] if t in rest]  # order kept without --shuffle_caption
        dropped += len(TAGS) - keep - len(rest)
    rate = dropped / (n * (len(TAGS) - keep))
    assert abs(rate - p) < 0.01, rate  # 24000 Bernoulli draws: the standard error is 0.003
    both = TagOptions(shuffle=True, keep_tokens=1, tag_dropout=0.5)
    for seed in range(100):
        out = draw(both, seed)
        assert out[0] == TAGS[0] and len(set(out)) == len(out) and set(out) <= set(TAGS)


def test_separator_spacing_and_unchanged_captions():
    assert split_tags(" a ,b,, c ,") == ["a", "b", "c"]
    assert join_tags(["a", "b"]) == "a, b" and join_tags(["a", "b"], "|") == "a| b"
    semicolon = TagOptions(shuffle=True, keep_tokens=1, separator=";")
    out = process_caption(
        "sks dog; red collar; on grass; smiling", semicolon, torch.Generator().manual_seed(3)
    )
    assert out.startswith("sks dog; ") and sorted(split_tags(out, ";")) == sorted(
        ["sks dog", "red collar", "on grass", "smiling"]
    )
    off = TagOptions(keep_tokens=2)  # keep_tokens alone changes nothing (kohya)
    assert process_caption("a photo,  of sks", off, torch.Generator()) == "a photo,  of sks"
    assert process_caption("", TagOptions(shuffle=True), torch.Generator()) == ""  # a dropped caption


def test_captions_are_a_function_of_seed_step_and_sample():
    """The trainer's draw for (seed, epoch, sample): the same on every call (a resume), new at each epoch."""
    records = [type("R", (), {"caption": CAPTION})() for _ in range(3)]

    def trainer(seed):
        t = SDXLTrainer.__new__(SDXLTrainer)
        t.opt = type("O", (), {"seed": seed})()
        t.records, t.tags = records, TagOptions(shuffle=True, keep_tokens=1, tag_dropout=0.2)
        return t

    a, b, other = trainer(0), trainer(0), trainer(1)
    grid = [[a.caption(i, epoch) for i in range(3)] for epoch in range(6)]
    assert grid == [[b.caption(i, epoch) for i in range(3)] for epoch in range(6)]
    assert len({c for row in grid for c in row}) > 12  # samples and epochs draw apart
    assert [other.caption(i, 0) for i in range(3)] != grid[0]
    # The draw does not touch the generator of crops, flips and caption dropout (seeded(seed, epoch, i)).
    assert not torch.equal(
        torch.rand(4, generator=seeded(0, 2, 1)), torch.rand(4, generator=seeded(0, 2, 1, 1))
    )


def test_tag_options_are_validated(tmp_path):
    base = ["--dataset", ".", "--output_dir", str(tmp_path)]
    for argv, name in [
        (["--caption_tag_dropout", "1"], "--caption_tag_dropout"),
        (["--caption_tag_dropout", "-0.1"], "--caption_tag_dropout"),
        (["--keep_tokens", "-1"], "--keep_tokens"),
        (["--caption_separator", " "], "--caption_separator"),
        (["--caption_tag_dropout_rate", "0.1"], "did you mean 'caption_tag_dropout'"),
    ]:
        with pytest.raises(OptionError, match=name):
            parse_options(SDXLOptions, base + argv)
    opts = parse_options(SDXLOptions, base + ["--shuffle_caption", "--keep_tokens", "1"])
    assert opts.tag_options() == TagOptions(True, 1, ",", 0.0)
