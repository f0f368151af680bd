"""The paper's image metrics: CLIP image-text score (CLIP I2T), image-image similarity (CLIP I2I, DINO).

- CLIP I2T of an image and its prompt: ``100 · max(cos(E_img, E_txt), 0)`` with CLIP's projected embeddings
  (the "CLIP score" of Hessel et al. without the 2.5 weight, as the Bi-LoRA paper reports it: 32.43 → 33.14
  on SDXL DreamBooth).
- CLIP I2I of an image: the mean cosine of its CLIP image embedding to those of the training images (subject
  fidelity, DreamBooth's CLIP-I); DINO I2I the same with a DINO ViT's CLS embedding (``--validation_dino_model``).

The trainer scores every validation sample with them (``--validation_clip_model``, samples/scores.json and
TensorBoard), and ``bilora-score`` scores any folder of images::

    bilora-score --images DIR --prompts prompts.txt --clip_model openai/clip-vit-large-patch14 [--reference DIR]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import OptionError
from .hub import resolve_base_model
from .options import opt, run_cli

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_i2t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """100 · max(cos, 0) of each image embedding with the text embedding of the same row."""
    cos = (_unit(image_embeds) * _unit(text_embeds)).sum(-1)
    return [float(v) for v in 100.0 * cos.clamp_min(0.0)]


def mean_cosine(embeds: torch.Tensor, references: torch.Tensor) -> list[float]:
    """For each row of ``embeds``: its mean cosine to every row of ``references``."""
    return [float(v) for v in (_unit(embeds) @ _unit(references).T).mean(dim=1)]


def _features(out) -> torch.Tensor:
    """transformers 4.x returns the projected features, 5.x an output whose pooler_output they are."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_model(name: str, flag: str) -> str:
    """A scoring model that is missing, unreachable or not a model stops the run in one line (exit 2)."""
    return resolve_base_model(name, "clip", flag=flag)


class ClipScorer:
    """A CLIP model (Hub id or folder) that embeds images and prompts; DINO optional."""

    def __init__(
        self,
        clip_model: str,
        dino_model: str | None = None,
        device: str | torch.device = "cpu",
        flags: tuple[str, str] = ("--validation_clip_model", "--validation_dino_model"),
    ):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device = torch.device(device)
        path = check_model(clip_model, flags[0])
        self.model = CLIPModel.from_pretrained(path).eval().to(self.device)
        self.processor = CLIPImageProcessor.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.dino = self.dino_processor = None
        if dino_model:
            from transformers import AutoImageProcessor, AutoModel

            dpath = check_model(dino_model, flags[1])
            self.dino = AutoModel.from_pretrained(dpath).eval().to(self.device)
            self.dino_processor = AutoImageProcessor.from_pretrained(dpath)
        self.references: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return _features(out).float().cpu()

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        max_len = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return _features(out).float().cpu()

    @torch.no_grad()
    def dino_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.dino_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.dino(pixel_values=pixels["pixel_values"].to(self.device))
        return out.last_hidden_state[:, 0].float().cpu()  # the CLS token, as DreamBooth's DINO metric

    def set_references(self, images: Sequence[Image.Image]) -> None:
        """The training images that I2I compares against (embedded once)."""
        if not images:
            return
        self.references = {"clip_i2i": self.image_embeds(images)}
        if self.dino is not None:
            self.references["dino_i2i"] = self.dino_embeds(images)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, list[float]]:
        """Per image: clip_i2t against its prompt, and clip_i2i / dino_i2i when references are set."""
        img = self.image_embeds(images)
        out = {"clip_i2t": clip_i2t(img, self.text_embeds(prompts))}
        if "clip_i2i" in self.references:
            out["clip_i2i"] = mean_cosine(img, self.references["clip_i2i"])
        if "dino_i2i" in self.references:
            out["dino_i2i"] = mean_cosine(self.dino_embeds(images), self.references["dino_i2i"])
        return out


def summarize(per_image: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in per_image.items() if v}


# -- the trainer's validation scores --------------------------------------------------------------------------------
def score_validation(trainer, rows: list[list[Image.Image]], step: int) -> dict | None:
    """Scores the validation samples (one row per prompt) of ``trainer`` with its scorer, appends them to
    samples/scores.json and logs the means to the trackers. Nothing without --validation_clip_model."""
    scorer = getattr(trainer, "scorer", None)
    if scorer is None:
        return None
    prompts = trainer.opt.validation_prompt
    images = [im for row in rows for im in row]
    texts = [p for p, row in zip(prompts, rows) for _ in row]
    per_image = scorer.score(images, texts)
    entry = {"step": step, **summarize(per_image), "per_prompt": {}}
    for i, prompt in enumerate(prompts):
        lo, hi = i * len(rows[0]), (i + 1) * len(rows[0])
        entry["per_prompt"][prompt] = {k: v[lo:hi] for k, v in per_image.items()}
    path = Path(trainer.opt.output_dir) / "samples" / "scores.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.is_file() else []
    history = [h for h in history if h["step"] != step] + [entry]
    path.write_text(json.dumps(history, indent=1))
    trainer.accelerator.log({f"val/{k}": v for k, v in summarize(per_image).items()}, step=step)
    logger.info(
        "validation scores at step %d: %s",
        step,
        ", ".join(f"{k} {v:.4g}" for k, v in summarize(per_image).items()),
    )
    return entry


# -- bilora-score ---------------------------------------------------------------------------------------------------
def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise OptionError(f"--images {folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OptionError(f"--images {folder}: no image ({', '.join(IMAGE_SUFFIXES)})")
    return files


def prompts_for(files: list[Path], prompts_file: str | None, prompt: str | None) -> list[str]:
    """One prompt for all images (--prompt or a one-line file), one line per image (sorted file order), or
    else each image's kohya caption file (IMAGE.txt)."""
    if prompt is not None:
        return [prompt] * len(files)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise OptionError(f"--prompts {path}: no such file")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) == 1:
            return lines * len(files)
        if len(lines) != len(files):
            raise OptionError(
                f"--prompts {path}: {len(lines)} prompts for {len(files)} images; give one line, or one line per "
                "image in sorted file-name order"
            )
        return lines
    captions = [p.with_suffix(".txt") for p in files]
    missing = [p.name for p in captions if not p.is_file()]
    if missing:
        raise OptionError(f"no --prompts / --prompt and no caption file for {', '.join(missing[:3])}")
    return [p.read_text().strip() for p in captions]


@dataclass
class ScoreOptions:
    """Options of ``bilora-score``."""

    usage = (
        "usage: bilora-score --images DIR --clip_model MODEL [--prompts FILE | --prompt TEXT] [--dino_model MODEL]\n"
        "       [--reference DIR] [--output FILE.json] [--device DEVICE]\n\n"
        "Score images with the paper's CLIP metrics (CLIP I2T; CLIP/DINO I2I with --reference)."
    )

    images: str | None = opt(
        None, "Folder of images (searched recursively, sorted by name); required.", path=True
    )
    prompts: str | None = opt(None, "Text file: one prompt, or one line per image.", path=True)
    prompt: str | None = opt(None, "One prompt for every image.")
    clip_model: str | None = opt(None, "CLIP model: Hub id or local folder; required.")
    dino_model: str | None = opt(None, "Optional DINO ViT (Hub id or folder) for DINO I2I.")
    reference: str | None = opt(None, "Folder of reference (training) images for I2I.", path=True)
    output: str | None = opt(None, "Write the per-image scores and means as JSON here.")
    device: str | None = opt(None, "Default: cuda if available, else cpu.")

    def validate(self) -> None:
        for flag in ("images", "clip_model"):
            if not getattr(self, flag):
                raise OptionError(f"--{flag} is required")


def score_folder(args: ScoreOptions) -> dict:
    files = image_files(args.images)
    prompts = prompts_for(files, args.prompts, args.prompt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = ClipScorer(args.clip_model, args.dino_model, device, ("--clip_model", "--dino_model"))
    if args.reference:
        scorer.set_references([Image.open(p) for p in image_files(args.reference)])
    per_image: dict[str, list[float]] = {}
    for start in range(0, len(files), 32):
        batch = [Image.open(p) for p in files[start : start + 32]]
        for k, v in scorer.score(batch, prompts[start : start + 32]).items():
            per_image.setdefault(k, []).extend(v)
    return {
        "images": [str(p) for p in files],
        "prompts": prompts,
        "scores": per_image,
        "mean": summarize(per_image),
    }


def score(args: ScoreOptions) -> dict:
    """Score the folder; print the means, write ``--output``."""
    result = score_folder(args)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    n = len(result["images"])
    print(f"{n} images: " + ", ".join(f"{k} {v:.2f}" for k, v in result["mean"].items()))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """``bilora-score``: exit 2 with a one-line error on a bad option, model or image folder."""
    return run_cli(score, ScoreOptions, None if argv is None else list(argv), prog="bilora-score")


if __name__ == "__main__":
    main()
