"""Shared test setup: offline, deterministic, small thread count; fixtures around `bilora_diffusion.testing`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from bilora_diffusion.testing import (  # noqa: E402
    make_image_folder,
    save_tiny_clip,
    save_tiny_llama,
    save_tiny_sdxl,
    tiny_sdxl_components,
    write_single_file,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_sdxl():
    """Fresh random components of a diffusers-dummy-shaped SDXL pipeline (float32, CPU)."""
    return tiny_sdxl_components("dummy", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline folder on disk (what --pretrained_model_name_or_path points at in tests)."""
    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl") / "model"), "dummy", seed=0)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP folder (the model of the paper's CLIP metric in tests)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer folder on disk (what --model points at in tests)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def single_file(tiny_sdxl_dir, tmp_path_factory):
    """The tiny SDXL of ``tiny_sdxl_dir`` as one SGM-layout .safetensors file."""
    return write_single_file(tiny_sdxl_dir, tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors")
