"""Render prompts with the stock ``StableDiffusionXLPipeline`` and an exported LoRA (either format).

No subclass, no patched loader: what this renders is what a diffusers user gets from
``pipe.load_lora_weights(file)``. The LoRA file is checked first (`bilora_diffusion.sdxl.export.verify.check_lora_file`:
safetensors only, SDXL keys, shapes that fit this pipeline), so a wrong or hostile file stops with a one-line
error before any loader sees it. ``--compare`` renders each seed without and with the LoRA, side by side.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from ..errors import OptionError
from ..hub import resolve_base_model
from ..options import opt, run_cli
from .components import dtype_kwargs
from .export.verify import check_lora_file

PROG = "bilora-generate"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAPTER_NAME = "bilora"


@dataclass
class GenerateOptions:
    """Options of ``bilora-generate``."""

    usage = (
        f"usage: {PROG} --pretrained_model_name_or_path BASE --prompt TEXT [--prompt TEXT ...] [--lora FILE]\n"
        "       [--seed N ...] [--compare] [--output_dir DIR] [...]\n\n"
        "Render prompts x seeds to PNG with the stock StableDiffusionXLPipeline and an exported LoRA."
    )

    pretrained_model_name_or_path: str | None = opt(
        None,
        "Base SDXL pipeline (folder or Hub id), or one .safetensors file in the original (SGM) layout (required).",
    )
    single_file_config: str | None = opt(
        None,
        "With a single-file base: a diffusers SDXL folder with its configs and tokenizers (default: the shipped "
        "SDXL base 1.0 configs).",
        path=True,
    )
    lora: str | None = opt(
        None, "Exported LoRA: a .safetensors file (diffusers or kohya) or its folder.", path=True
    )
    prompt: list[str] = opt([], "Prompt (required); repeatable: --prompt A --prompt B.")
    negative_prompt: str | None = opt(None, "Negative prompt.")
    seed: list[int] | None = opt(None, "Seed; repeatable (default: 0).")
    num_inference_steps: int = opt(30, "Denoising steps.")
    guidance_scale: float = opt(5.0, "Classifier-free guidance scale.")
    height: int | None = opt(None, "Image height; default: the model's native size.")
    width: int | None = opt(None, "Image width; default: the model's native size.")
    lora_scale: float = opt(1.0, "LoRA strength (multiplies alpha / rank).")
    compare: bool = opt(False, "Also render without the LoRA; write compare.png.")
    dtype: str = opt("fp32", "fp16/bf16 on a GPU.", choices=tuple(DTYPES))
    device: str | None = opt(None, "Default: cuda if available, else cpu.")
    output_dir: str = opt("samples", "Folder of the PNG files.")

    def validate(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise OptionError("--pretrained_model_name_or_path is required")
        if not self.prompt:
            raise OptionError("--prompt is required")
        if self.compare and not self.lora:
            raise OptionError("--compare needs --lora")


def load_pipeline(base: str, dtype: torch.dtype, device: str, single_file_config: str | None = None):
    """The stock pipeline, progress bars off (they would interleave with the printed paths); a single-file base
    (SGM layout) is loaded offline with its configs from ``single_file_config`` or the shipped ones."""
    from diffusers import StableDiffusionXLPipeline

    from .single_file import check_config, is_single_file, single_file_pipeline

    resolve_base_model(base, "sdxl")  # a missing, unreachable or non-SDXL base: one line, before loading
    if is_single_file(base):
        check_config(single_file_config)
        pipe = single_file_pipeline(base, single_file_config, dtype)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(base, **dtype_kwargs(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def apply_lora(pipe, lora: str | Path, adapter_name: str = ADAPTER_NAME) -> tuple[Path, str]:
    """Check, then ``load_lora_weights`` an exported LoRA file; returns (file, "diffusers" | "kohya").

    ``use_safetensors=True`` turns off the loader's pickle fallback (``.bin`` via torch.load), and the file is
    passed by folder + ``weight_name`` so that its header (the adapter metadata that carries alpha) is read."""
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    file, fmt = check_lora_file(lora, models, pipe.unet.config)
    pipe.load_lora_weights(
        str(file.parent), weight_name=file.name, adapter_name=adapter_name, use_safetensors=True
    )
    return file, fmt


def render(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    lora_scale: float | None = None,
) -> list[list[Image.Image]]:
    """``images[prompt_index][seed_index]``. Each image has its own CPU generator seeded with its seed, so the
    same seed gives the same starting noise on any device and with or without the LoRA."""
    extra = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_scale is not None else {}
    images = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            result = pipe(
                prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=torch.Generator("cpu").manual_seed(seed),
                **extra,
            )
            row.append(result.images[0])
        images.append(row)
    return images


def grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Images pasted row by row into one picture (all cells the size of the first image)."""
    w, h = rows[0][0].size
    canvas = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            canvas.paste(image, (x * w, y * h))
    return canvas


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def _save(image: Image.Image, path: Path, info: dict) -> Path:
    png = PngImagePlugin.PngInfo()
    png.add_text("bilora", json.dumps(info))
    image.save(path, pnginfo=png)
    return path


def generate(args: GenerateOptions) -> int:
    """Writes ``<output_dir>/NN_<prompt>_seedS.png`` (and with --compare ``*_base.png`` and ``compare.png``: one
    row per prompt and seed, without | with the LoRA); prints the paths."""
    seeds = args.seed or [0]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    options = dict(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
    )
    pipe = load_pipeline(
        args.pretrained_model_name_or_path, DTYPES[args.dtype], device, args.single_file_config
    )
    base_images = render(pipe, args.prompt, seeds, **options) if args.compare or not args.lora else None
    lora_images = None
    if args.lora:
        file, fmt = apply_lora(pipe, args.lora)
        lora_images = render(pipe, args.prompt, seeds, lora_scale=args.lora_scale, **options)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = []
    for p, prompt in enumerate(args.prompt):
        for s, seed in enumerate(seeds):
            stem = f"{p:02d}_{_slug(prompt)}_seed{seed}"
            info = {"prompt": prompt, "seed": seed, **{k: v for k, v in options.items() if v is not None}}
            row = []
            if base_images is not None:
                name = f"{stem}_base.png" if lora_images is not None else f"{stem}.png"
                written.append(_save(base_images[p][s], out / name, {**info, "lora": None}))
                row.append(base_images[p][s])
            if lora_images is not None:
                lora_info = {**info, "lora": str(file), "lora_format": fmt, "lora_scale": args.lora_scale}
                written.append(_save(lora_images[p][s], out / f"{stem}.png", lora_info))
                row.append(lora_images[p][s])
            rows.append(row)
    if args.compare:
        written.append(_save(grid(rows), out / "compare.png", {"columns": ["without LoRA", "with LoRA"]}))
    for path in written:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``bilora-generate`` (and ``python pipelines/generate.py``): exit 2 with a one-line error on a bad option
    or LoRA file (a user error, an unreadable file, or a value the pipeline refuses)."""
    return run_cli(
        generate, GenerateOptions, None if argv is None else list(argv), (OSError, ValueError), prog=PROG
    )
