"""Shared test setup: offline, deterministic, small thread count; tiny SDXL components from configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_sdxl():
    """Fresh random components of a diffusers-dummy-shaped SDXL pipeline (float32, CPU)."""
    from bilora_diffusion.sdxl.tiny import tiny_sdxl_components

    return tiny_sdxl_components("dummy", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline folder on disk (what --pretrained_model_name_or_path points at in tests)."""
    from bilora_diffusion.sdxl.tiny import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl") / "model"), "dummy", seed=0)


def make_image_folder(root, n: int = 8, size=(64, 64), captions: bool = True, seed: int = 0):
    """A kohya-style folder: n images of colored rectangles on a background, with .txt captions."""
    import random as _random
    from pathlib import Path

    from PIL import Image, ImageDraw

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = _random.Random(seed)
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


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")
