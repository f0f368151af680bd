"""Samples of a training set and the pre-flight scan that finds every bad one before a model loads.

`load_records` resolves --dataset / --dataset_name / --train_data_dir to a source (sources.py), then opens
every image once (verify + full decode, in a thread pool) and keeps only its size, its caption and where to
reopen it. Bad samples are dropped with a reason (on_bad_image="skip") or stop the run (="error"), so training
never dies mid-run on something the scan could have found. `open_image` reopens a sample at training time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from PIL import Image

from bilora_diffusion.data.common import RowSource, image_value_bytes, read_file
from bilora_diffusion.data.images import BadImage, ImageInfo, decode_rgb, inspect_image, strict_truncation
from bilora_diffusion.data.sources import Candidate, SourceListing, open_source
from bilora_diffusion.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["DataError", "Record", "RowSource", "ScanReport", "load_records", "open_image"]

_SHOWN = 5  # bad samples named in messages; the report lists them all
_CHUNK = 32  # candidates inspected per thread-pool round (bounds the bytes held in memory)


@dataclass
class Record:
    """One usable sample. Holds no pixels: the scan keeps the size and reopens the image when needed."""

    key: str  # what messages name: the file path, or "<dataset id>[<row>]"
    caption: str  # "" only when instance_prompt is ""
    size: tuple[int, int]  # (width, height) as stored, after EXIF transpose
    source: str | RowSource  # absolute file path, or the HF dataset row to reopen
    fingerprint: str = ""  # blake2b-128 of the encoded image bytes: a content key for latent caches


@dataclass
class ScanReport:
    """What the pre-flight scan found: the usable samples and why every other one was dropped."""

    records: list[Record]  # usable samples, in a deterministic order
    skipped: list[tuple[str, str]]  # (key, "category: detail") for every sample dropped
    converted: list[tuple[str, str]]  # (key, "mode P -> RGB") for usable samples not stored as RGB
    ignored: list[tuple[str, str]] = field(default_factory=list)  # non-sample files (README, orphan captions)
    kind: str = ""  # "kohya folder", "imagefolder (metadata)", "save_to_disk dataset", "Hub dataset", ...
    location: str = ""  # the folder or dataset id scanned

    def summary(self) -> str:
        """One short paragraph: totals, then counts per skip category, per conversion, per ignored reason."""

        def counts(items: list[tuple[str, str]], category: bool) -> str:
            counter = Counter(reason.split(":", 1)[0] if category else reason for _, reason in items)
            return ", ".join(
                f"{n} {reason}" for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
            )

        total = len(self.records) + len(self.skipped)
        text = f"{self.location} ({self.kind}): {total} samples, {len(self.records)} usable"
        if self.skipped:
            text += f", {len(self.skipped)} skipped ({counts(self.skipped, True)})"
        if self.converted:
            text += f", {len(self.converted)} converted to RGB ({counts(self.converted, False)})"
        if self.ignored:
            text += f"; {len(self.ignored)} other files ignored ({counts(self.ignored, False)})"
        return text + "."

    def first_skipped(self, count: int = _SHOWN) -> str:
        """The first `count` skipped samples, one "key: reason" per line, and how many more there are."""
        lines = [f"  {key}: {reason}" for key, reason in self.skipped[:count]]
        if len(self.skipped) > count:
            lines.append(f"  ... and {len(self.skipped) - count} more")
        return "\n".join(lines)


def _inspect(candidate: Candidate) -> tuple[ImageInfo | None, str | None, str]:
    """(info, problem, fingerprint) for one candidate; runs in a worker thread (Pillow releases the GIL)."""
    if candidate.problem is not None:
        return None, candidate.problem, ""
    try:
        data = candidate.data if candidate.data is not None else read_file(str(candidate.source))
    except FileNotFoundError:
        return None, "file not found: it disappeared during the scan", ""
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", ""
    try:
        info = inspect_image(data)
    except BadImage as exc:
        return None, str(exc), ""
    return info, None, hashlib.blake2b(data, digest_size=16).hexdigest()


def _chunks(items: Iterable[Candidate], size: int) -> Iterator[list[Candidate]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _scan(listing: SourceListing, min_size: int, min_size_reason: str | None = None) -> ScanReport:
    """Inspect every candidate once; order follows the listing, so the report is deterministic."""
    report = ScanReport([], [], [], list(listing.ignored), listing.kind, listing.location)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, strict_truncation():
        for chunk in _chunks(listing.candidates, _CHUNK):
            for candidate, (info, problem, fingerprint) in zip(chunk, pool.map(_inspect, chunk)):
                candidate.data = None  # the bytes were only needed for the check
                if info is not None and problem is None:
                    problem = candidate.caption_problem
                if info is not None and problem is None and min(info.size) < min_size:
                    width, height = info.size
                    problem = f"too small: {width}x{height}, shorter side below min_size {min_size}"
                    if min_size_reason:
                        problem += f" ({min_size_reason})"
                if problem is not None:
                    report.skipped.append((candidate.key, problem))
                    continue
                assert info is not None and candidate.caption is not None
                report.records.append(
                    Record(candidate.key, candidate.caption, info.size, candidate.source, fingerprint)
                )
                if info.conversion is not None:
                    report.converted.append((candidate.key, info.conversion))
    return report


def load_records(
    dataset: str | Any | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    caption_extension: str = ".txt",
    instance_prompt: str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    min_size: int = 0,
    on_bad_image: str = "skip",
    min_size_reason: str | None = None,
) -> ScanReport:
    """Find the training samples and run the pre-flight scan; raise DataError if training cannot start.

    `dataset` (or `dataset_name`, same meaning) is a local folder (kohya-style captions, an imagefolder with
    metadata.jsonl/.csv, a `save_to_disk` dataset) or a Hub dataset id; `train_data_dir` is a local folder.
    `dataset` may also be a `datasets.Dataset` / `DatasetDict` object. Captions: a non-empty caption (file,
    metadata cell or column) wins; otherwise `instance_prompt` if given; otherwise the sample is bad.
    `min_size`: a sample whose shorter side (after EXIF transpose) is below it is reported as too small;
    `min_size_reason` (e.g. the options that set min_size and how to change them) is added to that report.
    `on_bad_image`: "skip" drops bad samples with one warning; "error" raises a DataError naming the first
    few and the count. A dataset with no usable sample is always a DataError.
    """
    if on_bad_image not in ("skip", "error"):
        raise DataError(f"--on_bad_image {on_bad_image!r}: must be 'skip' or 'error'")
    if min_size < 0:
        raise DataError(f"--min_size {min_size}: must be >= 0")
    if not caption_extension or caption_extension == ".":
        raise DataError(f"--caption_extension {caption_extension!r}: give an extension such as .txt")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension  # "txt" means ".txt", as kohya users write it
    settings = {
        "dataset_config_name": dataset_config_name,
        "image_column": image_column,
        "caption_column": caption_column,
        "caption_extension": caption_extension,
        "instance_prompt": instance_prompt,
        "cache_dir": cache_dir,
        "revision": revision,
    }
    listing = open_source(dataset, dataset_name, train_data_dir, settings)
    report = _scan(listing, min_size, min_size_reason)
    if report.skipped and on_bad_image == "error":
        raise DataError(
            f"{report.location}: {len(report.skipped)} bad sample(s) found by the pre-flight scan "
            f"(--on_bad_image error):\n{report.first_skipped()}\n"
            "Fix or remove them, or pass --on_bad_image skip to train without them."
        )
    if not report.records:
        detail = f"\n{report.first_skipped()}" if report.skipped else ""
        raise DataError(f"{report.location}: no usable samples. {report.summary()}{detail}")
    if report.skipped:
        logger.warning("%s\n%s", report.summary(), report.first_skipped())
    else:
        logger.info("%s", report.summary())
    return report


def _source_bytes(source: str | RowSource) -> bytes:
    if isinstance(source, RowSource):
        return image_value_bytes(source.dataset[source.row][source.column], source.base_dir)
    return read_file(source)


def open_image(record: Record) -> Image.Image:
    """Reopen a sample as the RGB image to train on (EXIF-transposed; odd modes converted as the scan said).

    Raises DataError naming record.key when the sample went bad since the scan (deleted, truncated, replaced
    by an image of another size), so the training loop can skip it instead of dying.
    """
    try:
        image = decode_rgb(_source_bytes(record.source))
    except (OSError, BadImage, TypeError, IndexError, KeyError) as exc:
        raise DataError(
            f"{record.key}: cannot be read any more ({exc}); it changed since the pre-flight scan"
        ) from exc
    if image.size != tuple(record.size):
        width, height = record.size
        raise DataError(
            f"{record.key}: changed since the pre-flight scan (was {width}x{height}, now "
            f"{image.size[0]}x{image.size[1]})"
        )
    return image
