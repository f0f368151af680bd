"""VAE latents and text embeddings, computed once and reused: in memory, or on disk under --cache_dir.

Latent entries are keyed by content: the scan's fingerprint of the image's encoded bytes (blake2b-128,
`Record.fingerprint`), the size the image is resized to, the flip, and the VAE's identity. Text entries are keyed
by the caption and the text encoders' identity. A later run (another seed, order, method, or a dataset with
records added or removed) hits the same entries, an entry can never be paired with another image's caption, and
dropping a record needs no bookkeeping: nothing refers to a record's position.

The cache holds the latent of the whole resized image (see `SampleGeometry`); crops are taken per sample per
step from it, so random crops keep working with a cache. Flips are cached as a second variant (SDXL's VAE is
not flip-equivariant, so a flipped latent is encoded, not mirrored).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import DataError, Record, open_image
from ..state import atomic_save_file
from .geometry import SampleGeometry
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


def record_digest(record: Record) -> str:
    """Content key of a sample: the scan's fingerprint of its encoded bytes (no decode needed). A record made
    without the scan gets the sha256 of its decoded pixels, computed once and kept as its fingerprint."""
    if not record.fingerprint:
        record.fingerprint = hashlib.sha256(open_image(record).tobytes()).hexdigest()
    return record.fingerprint


class _EncodeJobs(Dataset):
    """(record, geometry, flip) jobs that decode and resize images in DataLoader workers."""

    def __init__(self, jobs: list[tuple[Record, SampleGeometry, bool]]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        record, geometry, flip = self.jobs[i]
        try:
            pixels = geometry.pixels(open_image(record), flip)
        except DataError as err:  # the file went bad after the scan: reported, not fatal
            return i, torch.zeros(0), str(err)
        return i, pixels, ""


class LatentCache:
    """Scaled VAE latents of every (image, resize size, flip) variant, as [4, H/8, W/8] float32 tensors."""

    def __init__(self, vae_identity: str, cache_dir: str | None):
        self.vae_identity = vae_identity
        self.folder = Path(cache_dir) / "latents" if cache_dir else None
        self.latents: dict[str, torch.Tensor] = {}  # content key -> latent
        self.hits = 0  # entries found on disk or already in memory
        self.misses = 0  # entries encoded
        self.failed: dict[str, str] = {}  # record key -> why its image could not be read any more

    def key(self, record: Record, geometry: SampleGeometry, flip: bool) -> str:
        """The content key of one variant: fingerprint, resize size, flip and VAE identity."""
        blob = f"{record_digest(record)}|{geometry.resized}|{int(flip)}|{self.vae_identity}"
        return hashlib.sha256(blob.encode()).hexdigest()

    def _file(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def build(
        self,
        records: list[Record],
        geometry: list[SampleGeometry],
        flips: bool,
        vae,
        device,
        dtype,
        num_workers: int = 0,
        disable_bar=False,
        label: str = "latent cache",
    ):
        """Encode every variant neither in memory nor on disk, scaled by the VAE's factors; a record whose image
        cannot be read any more goes to ``failed``. Logs ``<label>: N hits, M encoded`` (nothing for an empty
        set, e.g. no held-out images)."""
        if not records:
            return
        variants = (False, True) if flips else (False,)
        jobs, keys = [], []
        for record, plan in zip(records, geometry, strict=True):  # hits first: they need no image decode
            for flip in variants:
                key = self.key(record, plan, flip)
                path = self._file(key)
                if key in self.latents:
                    self.hits += 1
                elif path is not None and path.is_file():
                    self.latents[key] = load_file(str(path))["latent"]
                    self.hits += 1
                else:
                    jobs.append((record, plan, flip))
                    keys.append(key)
        loader = DataLoader(_EncodeJobs(jobs), batch_size=1, num_workers=num_workers)
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        for job, pixels, error in tqdm(loader, desc="caching latents", disable=disable_bar or not jobs):
            job = int(job[0])
            if error[0]:
                self.failed[jobs[job][0].key] = error[0]
                continue
            # The mean of the latent distribution: deterministic, so cached and uncached runs agree.
            latent = vae.encode(pixels.to(device, dtype)).latent_dist.mean[0].float()
            latent = ((latent - shift) * scale).cpu()
            self.latents[keys[job]] = latent
            self.misses += 1
            path = self._file(keys[job])
            if path is not None:
                atomic_save_file({"latent": latent}, path)
        logger.info("%s: %d hits, %d encoded", label, self.hits, self.misses)

    def get(self, record: Record, geometry: SampleGeometry, flip: bool) -> torch.Tensor:
        return self.latents[self.key(record, geometry, flip)]


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
