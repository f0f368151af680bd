"""Tests of the toy shapes world, its analyzer, the tiny SDXL builder and the shipped pretrained model."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the shipped model must load with no network


import numpy as np
import pytest
import torch
from PIL import Image

from bilora_diffusion.toy import world
from bilora_diffusion.toy.analyzer import analyze, score


def test_generator_is_deterministic() -> None:
    a_image, a_caption, a_spec = world.make_sample(123)
    b_image, b_caption, b_spec = world.make_sample(123)
    assert np.array_equal(a_image, b_image) and a_caption == b_caption and a_spec == b_spec
    assert a_image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a_image.dtype == np.uint8
    others = world.make_samples(20, seed=5)
    assert len({s[1] for s in others}) > 10, "different seeds should give different captions"


def test_caption_names_every_attribute() -> None:
    _, caption, spec = world.make_sample(7)
    assert caption == (
        f"a {spec.size} {spec.color} {spec.shape} on a {spec.background} background, {spec.position}"
    )
    words = caption.replace(",", " , ").split()
    assert set(words) <= set(world.VOCABULARY)


def test_pretraining_data_never_shows_the_new_concept() -> None:
    assert world.NEW_COLOR not in world.HELD_IN_COLORS
    assert all(c != world.NEW_COLOR for _, c in world.held_in_combos())
    assert all(s[2].color != world.NEW_COLOR for s in world.make_samples(500, seed=1))


def test_analyzer_reads_generator_images() -> None:
    samples = world.make_samples(600, seed=11, colors=world.COLORS)
    result = score([s[0] for s in samples], [s[2] for s in samples])
    assert result.color >= 0.95 and result.shape >= 0.95, result


def test_analyzer_reads_the_new_concept() -> None:
    samples = world.make_demo_samples(300, seed=99)
    result = score([s[0] for s in samples], [s[2] for s in samples])
    assert result.color >= 0.95 and result.shape >= 0.95, result


def test_analyzer_reports_none_on_a_blank_image() -> None:
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert analyze(blank).color == "none"


def test_demo_dataset_is_a_subset_of_combos() -> None:
    combos = [("circle", world.NEW_COLOR), ("square", world.NEW_COLOR)]
    samples = world.make_demo_samples(10, combos=combos)
    assert [(s[2].shape, s[2].color) for s in samples] == [combos[i % 2] for i in range(10)]


def test_concept_split_partitions_the_shapes() -> None:
    taught, unseen = world.concept_split(["circle"])
    assert taught == [("circle", world.NEW_COLOR)]
    assert unseen == [("square", world.NEW_COLOR), ("triangle", world.NEW_COLOR)]
    with pytest.raises(ValueError):
        world.concept_split(["hexagon"])


def test_shipped_demo_data_matches_its_generator() -> None:
    folder = world.DEMO_DATA_DIR
    pngs = sorted(folder.glob("*.png"))
    assert 16 <= len(pngs) <= 32
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 2_000_000
    expected = world.make_demo_samples()
    assert len(pngs) == len(expected)
    for png, (image, caption, spec) in zip(pngs, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), image)
        assert png.with_suffix(".txt").read_text().strip() == caption
        assert spec.color == world.NEW_COLOR


@pytest.fixture(scope="module")
def shipped_pipe():
    from bilora_diffusion.toy.model import TOY_MODEL_DIR, load_toy_pipeline

    assert (TOY_MODEL_DIR / "model_index.json").exists(), "the pretrained toy model is not shipped"
    pipe = load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_small_and_documented() -> None:
    from bilora_diffusion.toy.model import TOY_MODEL_DIR

    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20_000_000
    assert "pretrain_toy.py" in (TOY_MODEL_DIR / "README.md").read_text()


def test_shipped_model_loads_offline_as_diffusers_sdxl(shipped_pipe) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from bilora_diffusion.toy.model import TOY_MODEL_DIR

    path = str(TOY_MODEL_DIR)
    # The trainer loads the parts one by one, as diffusers' SDXL LoRA scripts do.
    assert UNet2DConditionModel.from_pretrained(path, subfolder="unet").dtype == torch.float32
    assert AutoencoderKL.from_pretrained(path, subfolder="vae").config.scaling_factor != 1.0
    assert DDPMScheduler.from_pretrained(path, subfolder="scheduler").config.prediction_type == "epsilon"
    generator = torch.Generator().manual_seed(0)
    out = shipped_pipe(
        "a large red square on a white background, center", generator=generator, output_type="np"
    )
    assert out.images[0].shape == (32, 32, 3)


def test_shipped_model_draws_held_in_prompts(shipped_pipe) -> None:
    from bilora_diffusion.toy.evaluate import held_in_score

    # 15 steps instead of 25 keeps this test fast; the model card measures 99.4 % there (n=180).
    result = held_in_score(shipped_pipe, n=24, seed=3, steps=15)
    assert result.color >= 0.8 and result.shape >= 0.8, result


def test_shipped_model_does_not_know_the_new_concept(shipped_pipe) -> None:
    from bilora_diffusion.toy.evaluate import new_concept_score

    result = new_concept_score(shipped_pipe, n=12, seed=3, steps=15)
    assert result.color <= 0.25, result
