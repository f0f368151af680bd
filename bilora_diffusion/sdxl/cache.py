"""VAE latents and text embeddings, computed once and reused: in memory, or on disk under --cache_dir.

Cache keys are content keys — sha256 of the decoded RGB pixels, the resize size, the flip, and the model's
identity — so a later run (another seed, another order, another method) hits the same entries, and an entry can
never be paired with another image's caption: batches index samples, never cache positions.

Crops are taken per sample per step in latent space (offsets on the 8-pixel latent grid) from the latent of the
whole resized image, so random crops keep working with a cache; flips are cached as a second variant (SDXL's
VAE is not flip-equivariant, so a flipped latent is encoded, not mirrored).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import DataError, Record, assign_bucket, open_image, resize_size
from ..state import atomic_save_file
from .models import encode_prompt, tokenize

logger = logging.getLogger(__name__)


def model_identity(path: str, config: dict) -> str:
    """Identity of a model for cache keys: where it came from and its config."""
    blob = json.dumps(
        {"path": str(path), "config": {k: v for k, v in config.items() if not k.startswith("_")}},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SampleGeometry:
    """Where one image goes: its bucket (w, h), the size it is resized to before cropping, its stored size."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    original: tuple[int, int]

    def crop(
        self, latent: torch.Tensor, factor: int, center: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[int]]:
        """The bucket-sized crop of this sample's cached latent [C, H, W] (centred, or drawn from
        ``generator``), and SDXL's micro-conditioning for it: [orig h, orig w, crop top, crop left, bucket h,
        bucket w] in pixels."""
        bw, bh = self.bucket[0] // factor, self.bucket[1] // factor
        room_y, room_x = latent.shape[1] - bh, latent.shape[2] - bw
        if center:
            top, left = room_y // 2, room_x // 2
        else:
            top = int(torch.randint(0, room_y + 1, (), generator=generator))
            left = int(torch.randint(0, room_x + 1, (), generator=generator))
        w, h = self.original
        time_ids = [h, w, top * factor, left * factor, self.bucket[1], self.bucket[0]]
        return latent[:, top : top + bh, left : left + bw], time_ids


def plan_geometry(
    records: list[Record], resolution: int, bucketing: bool, max_upscale: float, factor: int = 8
) -> list[SampleGeometry]:
    """Bucket and resize size of every record; ``factor`` is the VAE's downsampling (8 on SDXL)."""
    plans = []
    for record in records:
        bucket = assign_bucket(record.size, resolution, bucketing, max_upscale)
        if bucket is None:  # the scan's min_size normally catches this first
            raise DataError(
                f"{record.key}: image {record.size[0]}x{record.size[1]} is too small for --resolution "
                f"{resolution} with --max_upscale {max_upscale}"
            )
        w, h = resize_size(record.size, bucket)
        # Latent crops need sides on the latent grid; rounding up keeps the bucket covered.
        plans.append(
            SampleGeometry(bucket, (-(-w // factor) * factor, -(-h // factor) * factor), record.size)
        )
    return plans


def to_tensor(image: Image.Image, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """[3, h, w] in [-1, 1] after a bicubic resize (and flip)."""
    image = image.resize(size, Image.Resampling.BICUBIC)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def record_digest(record: Record) -> str:
    """Content key of a sample: the scan's fingerprint of its encoded bytes (no decode needed)."""
    return record.fingerprint or hashlib.sha256(open_image(record).tobytes()).hexdigest()


class _EncodeJobs(Dataset):
    """(record index, flip) jobs that decode and resize images in DataLoader workers."""

    def __init__(self, records: list[Record], plans: list[SampleGeometry], jobs: list[tuple[int, bool]]):
        self.records, self.plans, self.jobs = records, plans, jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        index, flip = self.jobs[i]
        try:
            pixels = to_tensor(open_image(self.records[index]), self.plans[index].resized, flip)
        except DataError as err:  # the file went bad after the scan: reported, not fatal
            return index, flip, torch.zeros(0), str(err)
        return index, flip, pixels, ""


class LatentCache:
    """Scaled VAE latents of every (sample, flip) variant, as [4, H/8, W/8] float32 tensors."""

    def __init__(self, vae_identity: str, cache_dir: str | None):
        self.vae_identity = vae_identity
        self.folder = Path(cache_dir) / "latents" if cache_dir else None
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.failed: dict[int, str] = {}  # record index -> why its image could not be read any more

    def _file(self, digest: str, size: tuple[int, int], flip: bool) -> Path | None:
        if self.folder is None:
            return None
        key = hashlib.sha256(f"{digest}|{size}|{int(flip)}|{self.vae_identity}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def build(
        self,
        records,
        plans,
        flips: bool,
        vae,
        device,
        dtype,
        num_workers: int = 0,
        disable_bar=False,
        label: str = "latent cache",
    ):
        """Encode every variant not already on disk (batched by size), scaled by the VAE's factors; logs
        ``<label>: N hits, M encoded`` (nothing for an empty set, e.g. no held-out images)."""
        if not records:
            return
        variants = (False, True) if flips else (False,)
        jobs, paths = [], {}
        for i, record in enumerate(records):  # disk hits first: they need no image decode at all
            for flip in variants:
                path = paths[(i, flip)] = self._file(record_digest(record), plans[i].resized, flip)
                if path is not None and path.is_file():
                    self.latents[(i, flip)] = load_file(str(path))["latent"]
                    self.hits += 1
                else:
                    jobs.append((i, flip))
        loader = DataLoader(_EncodeJobs(records, plans, jobs), batch_size=1, num_workers=num_workers)
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        for index, flip, pixels, error in tqdm(
            loader, desc="caching latents", disable=disable_bar or not jobs
        ):
            index, flip = int(index[0]), bool(flip[0])
            if error[0]:
                self.failed[index] = error[0]
                continue
            # The mean of the latent distribution: deterministic, so cached and uncached runs agree.
            latent = vae.encode(pixels.to(device, dtype)).latent_dist.mean[0].float()
            latent = ((latent - shift) * scale).cpu()
            self.latents[(index, flip)] = latent
            self.misses += 1
            if paths[(index, flip)] is not None:
                atomic_save_file({"latent": latent}, paths[(index, flip)])
        logger.info("%s: %d hits, %d encoded", label, self.hits, self.misses)

    def get(self, index: int, flip: bool) -> torch.Tensor:
        return self.latents[(index, flip)]


class TextEmbeddingCache:
    """SDXL prompt embeddings and pooled embeddings of every caption (when the text encoders are frozen)."""

    def __init__(self, te_identity: str, cache_dir: str | None):
        self.identity = te_identity
        self.folder = Path(cache_dir) / "text" if cache_dir else None
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def _file(self, caption: str) -> Path | None:
        if self.folder is None:
            return None
        key = hashlib.sha256(f"{caption}|{self.identity}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def build(self, captions: list[str], tokenizers, text_encoders, batch_size: int = 16) -> None:
        todo = []
        for caption in sorted(set(captions)):
            path = self._file(caption)
            if path is not None and path.is_file():
                data = load_file(str(path))
                self.entries[caption] = (data["prompt_embeds"], data["pooled"])
                self.hits += 1
            else:
                todo.append(caption)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            embeds, pooled = encode_prompt(text_encoders, tokenize(tokenizers, chunk))
            for j, caption in enumerate(chunk):
                entry = (embeds[j].float().cpu(), pooled[j].float().cpu())
                self.entries[caption] = entry
                self.misses += 1
                path = self._file(caption)
                if path is not None:
                    atomic_save_file({"prompt_embeds": entry[0], "pooled": entry[1]}, path)

    def get(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = torch.stack([self.entries[c][0] for c in captions])
        pooled = torch.stack([self.entries[c][1] for c in captions])
        return embeds, pooled


def cache_root_ok(cache_dir: str | None) -> None:
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
