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
