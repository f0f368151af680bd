"""Validation samples with the stock StableDiffusionXLPipeline: same seeds every time, saved as PNG grids.

The functions take the parts they use (the SDXL components, `SampleSettings`, the output folder, the trackers),
not the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from ..peft_glue import adapters_disabled, unwrap
from .geometry import SampleGeometry
from .models import SDXLComponents


def make_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """Rows of equally sized images in one picture, with an optional label strip on the left. Images under
    128 px (the toy model's 32 px) are enlarged with nearest-neighbour so a person can see them."""
    w, h = rows[0][0].size
    zoom = max(1, -(-128 // max(w, h)))
    if zoom > 1:
        rows = [[im.resize((w * zoom, h * zoom), Image.Resampling.NEAREST) for im in row] for row in rows]
        w, h = w * zoom, h * zoom
    label_w = 0 if not labels else max(64, 7 * max(len(s) for s in labels))
    grid = Image.new("RGB", (label_w + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        if labels:
            draw.text((4, y * h + h // 2 - 6), labels[y], fill="black")
        for x, image in enumerate(row):
            grid.paste(image, (label_w + x * w, y * h))
    return grid


@dataclass(frozen=True)
class SampleSettings:
    """How validation samples are drawn: image k of every prompt from a CPU generator seeded ``seed + k``, at
    ``geometry`` (its bucket is the image size, its time ids the pipeline's micro-conditioning)."""

    prompts: list[str]
    per_prompt: int
    seed: int
    steps: int
    guidance_scale: float
    geometry: SampleGeometry


def build_pipeline(components: SDXLComponents, device) -> StableDiffusionXLPipeline:
    """A stock SDXL pipeline over the components being trained (adapters attached), VAE moved to ``device``."""
    c = components
    pipe = StableDiffusionXLPipeline(
        vae=c.vae.to(device),
        text_encoder=unwrap(c.text_encoder),
        text_encoder_2=unwrap(c.text_encoder_2),
        tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2,
        unet=unwrap(c.unet),
        scheduler=EulerDiscreteScheduler.from_config(c.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, settings: SampleSettings, autocast: Callable | None = None) -> list[list[Image.Image]]:
    """One row per prompt, ``per_prompt`` images each, seeds seed..seed+n-1 (the same at every call);
    ``autocast`` makes the context each prompt renders in (e.g. ``accelerator.autocast`` on a GPU)."""
    n, rows = settings.per_prompt, []
    for prompt in settings.prompts:
        generators = [torch.Generator(device="cpu").manual_seed(settings.seed + k) for k in range(n)]
        with autocast() if autocast else contextlib.nullcontext():
            images = pipe(
                prompt=[prompt] * n,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=generators,
                **settings.geometry.pipeline_kwargs(),
            ).images
        rows.append(images)
    return rows


def _log_image(trackers: Sequence, tag: str, image: Image.Image, step: int) -> None:
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")


def save_validation_grid(
    pipe,
    settings: SampleSettings,
    folder: str | Path,
    step: int,
    trackers: Sequence = (),
    autocast: Callable | None = None,
) -> tuple[Path, list[list[Image.Image]]]:
    """``folder``/step_XXXXXX.png: a row per prompt (call under aux_disabled); returns the path and the rows."""
    rows = render(pipe, settings, autocast)
    grid = make_grid(rows)
    path = Path(folder) / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    _log_image(trackers, "validation", grid, step)
    return path, rows


def save_before_after(
    pipe,
    settings: SampleSettings,
    folder: str | Path,
    models: Sequence[torch.nn.Module],
    step: int,
    trackers: Sequence = (),
    autocast: Callable | None = None,
) -> tuple[Path, list[list[Image.Image]], list[list[Image.Image]]]:
    """``folder``/before_after.png: for each prompt, the base model's images (``models``' adapters disabled)
    above the LoRA's, same seeds. Returns the path and the images (rows per prompt) before and after."""
    with adapters_disabled(list(models)):
        before = render(pipe, settings, autocast)
    after = render(pipe, settings, autocast)
    rows, labels = [], []
    for b, a in zip(before, after):
        rows += [b, a]
        labels += ["before", "after"]
    grid = make_grid(rows, labels)
    path = Path(folder) / "before_after.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    _log_image(trackers, "before_after", grid, step)
    return path, before, after
