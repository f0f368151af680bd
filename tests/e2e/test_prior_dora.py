"""DreamBooth prior preservation and DoRA as the primary branch (issue 16, items 2 and 3), in full training runs:
export of a trained DoRA, class images generated once, exact resume."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from bilora_diffusion import attach_bilora
from bilora_diffusion.options import OptionError
from bilora_diffusion.sdxl.prior import CLASS_IMAGE
from bilora_diffusion.sdxl.train import train
from bilora_diffusion.state import load_bilora_state, read_bilora_state
from tests.e2e.test_train_sdxl import adapters, options
from tests.unit.sdxl.test_prior_dora import PRIOR, _check_files


@pytest.mark.slow
def test_trained_dora_export_reproduces_the_trained_model(tiny_sdxl_dir, image_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    train(options(tiny_sdxl_dir, image_folder, out, "--use_dora", learning_rate=0.02))
    _, configs, _ = read_bilora_state(out / "bilora_adapters.safetensors")
    assert configs["unet"].use_dora and configs["unet"].aux_rank == 4
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    attach_bilora(unet, configs["unet"])
    load_bilora_state(out / "bilora_adapters.safetensors", {"unet": unet})
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    _check_files(out, unet, configs["unet"], pipe)


@pytest.mark.slow
def test_class_images_are_generated_once_then_reused(tiny_sdxl_dir, image_folder, tmp_path, caplog):
    classes = tmp_path / "class"
    caplog.set_level(logging.INFO)
    first = train(options(tiny_sdxl_dir, image_folder, tmp_path / "a", *PRIOR, class_data_dir=classes))
    files = sorted(classes.iterdir())
    assert [f.name for f in files] == [CLASS_IMAGE.format(k) for k in range(3)]
    assert "generated 3 class images" in caplog.text
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.clear()
    second = train(options(tiny_sdxl_dir, image_folder, tmp_path / "b", *PRIOR, class_data_dir=classes))
    assert "generated" not in caplog.text and "(3 there, 0 to generate)" in caplog.text
    assert [f.stat().st_mtime_ns for f in sorted(classes.iterdir())] == stamps
    assert first.losses == second.losses  # same class images, same batches, same run
    # one more image wanted: only it is generated, from its own seed
    caplog.clear()
    train(
        options(
            tiny_sdxl_dir, image_folder, tmp_path / "c", *PRIOR, class_data_dir=classes, num_class_images=4
        )
    )
    assert "generated 1 class images" in caplog.text
    assert [f.stat().st_mtime_ns for f in files] == stamps


@pytest.mark.slow
def test_resume_with_prior_preservation_and_dora_equals_uninterrupted_run(
    tiny_sdxl_dir, image_folder, tmp_path
):
    common = dict(max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2, random_flip=True)
    extra = [
        *PRIOR,
        "--class_data_dir",
        str(tmp_path / "class"),
        "--use_dora",
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    full = tmp_path / "full"
    train(options(tiny_sdxl_dir, image_folder, full, *extra, **common))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    result = train(
        options(tiny_sdxl_dir, image_folder, part, *extra, resume_from_checkpoint="latest", **common)
    )
    assert result.global_step == 4
    a, b = adapters(full), adapters(part)
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # a DoRA checkpoint does not resume into a plain-LoRA run
    with pytest.raises(OptionError, match="use_dora"):
        train(
            options(tiny_sdxl_dir, image_folder, part, *extra[:-3], resume_from_checkpoint="latest", **common)
        )
