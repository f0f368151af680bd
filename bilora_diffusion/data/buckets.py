"""Aspect-ratio buckets: train each image near its own shape instead of center-cropping it square.

A bucket is a (width, height) with sides multiple of 64 (the VAE downsamples by 8 and the SDXL UNet by 8
more) and about resolution² pixels, so every batch costs about the same. Each image goes to the bucket
closest to its aspect ratio among those it can cover without upscaling more than allowed; batches are drawn
within one bucket, since a batch needs one tensor shape.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import numpy as np

_EPSILON = 1e-9


@lru_cache(maxsize=32)
def _bucket_tuple(resolution: int, step: int, max_ratio: float) -> tuple[tuple[int, int], ...]:
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step  # the tallest height on the grid keeping area <= resolution²
        if height < step:
            break
        if max(width / height, height / width) <= max_ratio + _EPSILON:
            buckets.add((width, height))
            buckets.add((height, width))  # the grid is not symmetric under floor; add the transposes too
    return tuple(sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0])))


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """All (w, h) buckets: sides multiple of `step`, w·h <= resolution², aspect ratio within 1:max_ratio.

    For every width on the grid, the tallest height that keeps the area within resolution² (and the
    transpose); sorted from tallest to widest. At 1024: (512, 2048) ... (1024, 1024) ... (2048, 512).
    """
    if resolution < step or step <= 0 or max_ratio < 1:
        raise ValueError(
            f"make_buckets: need resolution >= step > 0 and max_ratio >= 1 (got {resolution}, {step}, {max_ratio})"
        )
    return list(_bucket_tuple(resolution, step, float(max_ratio)))


def _upscale_needed(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The scale that makes an image of `size` cover `bucket` (both sides at least the bucket's)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def assign_bucket(
    size: tuple[int, int], resolution: int, bucketing: bool, max_upscale: float = 1.0
) -> tuple[int, int] | None:
    """The training size of an image of `size` (w, h); None when it is too small for any allowed size.

    Without bucketing: (resolution, resolution) if the image covers it after at most `max_upscale`.
    With bucketing: among the buckets of `make_buckets(resolution)` reachable within `max_upscale`, the one
    closest to the image's aspect ratio (compared in log space, so 2:1 and 1:2 are equally far from 1:1);
    ties go to the larger area, then to the wider bucket.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"assign_bucket: image size must be positive (got {size})")
    if not bucketing:
        square = (resolution, resolution)
        return square if _upscale_needed(size, square) <= max_upscale + _EPSILON else None
    log_ratio = math.log(width / height)
    best: tuple[float, int, int] | None = None
    chosen: tuple[int, int] | None = None
    for bucket in make_buckets(resolution):
        if _upscale_needed(size, bucket) > max_upscale + _EPSILON:
            continue
        distance = round(abs(math.log(bucket[0] / bucket[1]) - log_ratio), 12)
        score = (distance, -bucket[0] * bucket[1], -bucket[0])
        if best is None or score < best:
            best, chosen = score, bucket
    return chosen


def resize_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The (w, h) to resize an image to before cropping: the smallest that covers `bucket`, aspect kept.

    The side that is relatively shorter matches the bucket exactly; the other is at least the bucket's
    (rounding never leaves it one pixel short, so the crop always fits).
    """
    if bucket[0] / size[0] >= bucket[1] / size[1]:  # width is the relatively shorter side
        return bucket[0], max(bucket[1], round(size[1] * bucket[0] / size[0]))
    return max(bucket[0], round(size[0] * bucket[1] / size[1])), bucket[1]


def epoch_batches(
    buckets: list[tuple[int, int] | None], batch_size: int, seed: int, epoch: int, drop_last: bool = False
) -> list[list[int]]:
    """The batches of one epoch, as lists of sample indices; a function of (seed, epoch) only.

    `buckets[i]` is sample i's bucket (None: the sample is left out). Indices are grouped by bucket,
    shuffled within each bucket, cut into batches of `batch_size` (the last one of a bucket shorter unless
    `drop_last`), and the batch order is shuffled, so every batch holds one bucket and every index appears
    once. Every process computes the same list, which is what resuming mid-epoch and sharding rely on.
    """
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1 (got {batch_size})")
    # SeedSequence wants non-negative entries: a negative seed is mapped into uint64.
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch])
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, bucket in enumerate(buckets):
        if bucket is not None:
            groups[tuple(bucket)].append(index)
    batches: list[list[int]] = []
    for bucket in sorted(groups):  # a fixed group order, so the shuffles below are reproducible
        indices = [groups[bucket][i] for i in rng.permutation(len(groups[bucket]))]
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]
