"""Prompt a toy pipeline and score what it draws with the analyzer.

The single place that fixes the toy model's inference settings, so the pretraining report, the tests and
the benchmarks measure the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline

from bilora_diffusion.toy.analyzer import Score, score
from bilora_diffusion.toy.world import NEW_COLOR, ShapeSpec, eval_prompts, new_concept_combos

DEFAULT_STEPS = 25
"""Euler steps at inference (the shipped scheduler is SDXL's EulerDiscreteScheduler config)."""
DEFAULT_GUIDANCE = 5.0
"""Classifier-free guidance scale; the unconditional branch is zero embeddings, as pretrained."""


@torch.no_grad()
def generate(
    pipe: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Images (H, W, 3) float in [0, 255] for ``prompts``, batch by batch, reproducible from ``seed``."""
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generator = torch.Generator("cpu").manual_seed(seed + start)
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
        ).images
        images.extend(np.asarray(im, dtype=np.float64) * 255.0 for im in out)
    return images


def evaluate_prompts(
    pipe: StableDiffusionXLPipeline,
    prompt_specs: Sequence[tuple[str, ShapeSpec]],
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
) -> Score:
    """Analyzer agreement between generated images and the specs their prompts describe."""
    images = generate(pipe, [p for p, _ in prompt_specs], seed=seed, steps=steps, guidance=guidance)
    return score(images, [s for _, s in prompt_specs])


def held_in_score(pipe: StableDiffusionXLPipeline, n: int = 180, seed: int = 0, **kwargs) -> Score:
    """Score on ``n`` prompts balanced over the held-in (shape, color) combinations."""
    return evaluate_prompts(pipe, eval_prompts(n, seed=seed + 7), seed=seed, **kwargs)


def new_concept_score(
    pipe: StableDiffusionXLPipeline,
    n: int = 60,
    seed: int = 0,
    shapes: Sequence[str] | None = None,
    **kwargs,
) -> Score:
    """Score on prompts that ask for the new color (``NEW_COLOR``) on ``shapes`` (default: all shapes).

    Before fine-tuning its color score is how often the base model draws the new color unprompted by
    training; after fine-tuning it is the demo's effect.
    """
    combos = new_concept_combos(shapes) if shapes is not None else new_concept_combos()
    assert all(c == NEW_COLOR for _, c in combos)
    return evaluate_prompts(pipe, eval_prompts(n, seed=seed + 11, combos=combos), seed=seed, **kwargs)
