"""Validation samples with the stock StableDiffusionXLPipeline: same seeds every time, saved as PNG grids."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from ..peft_glue import adapters_disabled, unwrap


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


def build_pipeline(trainer) -> StableDiffusionXLPipeline:
    c, acc = trainer.c, trainer.accelerator
    pipe = StableDiffusionXLPipeline(
        vae=c.vae.to(acc.device),
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
def render(trainer, prompts: list[str], n: int) -> list[list[Image.Image]]:
    """One row per prompt, n images each, seeds seed..seed+n-1 (the same at every call)."""
    o, acc = trainer.opt, trainer.accelerator
    pipe = build_pipeline(trainer)
    rows = []
    autocast = acc.autocast() if acc.device.type == "cuda" else contextlib.nullcontext()
    for prompt in prompts:
        generators = [torch.Generator(device="cpu").manual_seed(o.seed + k) for k in range(n)]
        with autocast:
            images = pipe(
                prompt=[prompt] * n,
                num_inference_steps=o.validation_inference_steps,
                guidance_scale=o.validation_guidance_scale,
                height=o.resolution,
                width=o.resolution,
                generator=generators,
            ).images
        rows.append(images)
    return rows


def _log_image(trainer, tag: str, image: Image.Image, step: int) -> None:
    for tracker in trainer.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")


def save_validation_grid(trainer, step: int) -> Path:
    """samples/step_XXXXXX.png: a row per validation prompt (call under aux_disabled)."""
    o = trainer.opt
    rows = render(trainer, o.validation_prompt, o.num_validation_images)
    grid = make_grid(rows)
    path = Path(o.output_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    _log_image(trainer, "validation", grid, step)
    from ..scoring import score_validation

    score_validation(trainer, rows, step)  # --validation_clip_model: samples/scores.json, TensorBoard
    return path


def save_before_after(trainer) -> tuple[Path, list[list[Image.Image]], list[list[Image.Image]]]:
    """samples/before_after.png: for each prompt, the base model's images above the LoRA's, same seeds.
    Returns the path and the images (rows per prompt) before and after."""
    o = trainer.opt
    models = list(trainer.trained.values())
    with adapters_disabled(models):
        before = render(trainer, o.validation_prompt, o.num_validation_images)
    after = render(trainer, o.validation_prompt, o.num_validation_images)
    rows, labels = [], []
    for b, a in zip(before, after):
        rows += [b, a]
        labels += ["before", "after"]
    grid = make_grid(rows, labels)
    path = Path(o.output_dir) / "samples" / "before_after.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    _log_image(trainer, "before_after", grid, trainer.global_step)
    return path, before, after
