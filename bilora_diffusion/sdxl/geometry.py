"""Where one image goes on the SDXL path: resize, flip, crop (random or centred) and SDXL's micro-conditioning.

Every user of an image's geometry goes through `SampleGeometry`: the latent cache (resize and flip before the
VAE), the trainer's batches and held-out loss (the crop and its time ids), prior preservation's class samples,
the landscape tool's fixed batches and the validation pipeline (`pipeline_kwargs`).

The bucket comes from `bilora_diffusion.data.assign_bucket`, decided once per record by the trainer's data setup;
the geometry only adds what needs the VAE's downsampling factor ``factor`` (8 on SDXL): the resize size rounded
up onto the latent grid, and crop offsets on that grid. Flipping happens before cropping, as in diffusers' SDXL
scripts, so crop offsets and time ids are in the flipped image's frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import resize_size


@dataclass(frozen=True)
class SampleGeometry:
    """One image's plan: its stored size ``original``, its ``bucket`` and the latent grid ``factor``; sizes are
    (w, h) in pixels."""

    original: tuple[int, int]
    bucket: tuple[int, int]
    factor: int = 8

    @property
    def resized(self) -> tuple[int, int]:
        """(w, h) the image is resized to before cropping: the smallest size covering the bucket with the aspect
        kept, each side rounded up to a multiple of ``factor`` (latent crops need sides on the grid)."""
        w, h = resize_size(self.original, self.bucket)
        f = self.factor
        return -(-w // f) * f, -(-h // f) * f

    def pixels(self, image: Image.Image, flip: bool) -> torch.Tensor:
        """The image resized (bicubic) to `resized`, mirrored left-right if ``flip``: [3, h, w] in [-1, 1]."""
        image = image.resize(self.resized, Image.Resampling.BICUBIC)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def crop_box(self, center: bool, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(top, left) in pixels of the bucket-sized crop of the resized image, multiples of ``factor``:
        centred (rounded down on the grid) or drawn uniformly on the grid from ``generator`` (top first)."""
        f = self.factor
        room_y = self.resized[1] // f - self.bucket[1] // f
        room_x = self.resized[0] // f - self.bucket[0] // f
        if center:
            return room_y // 2 * f, room_x // 2 * f
        top = int(torch.randint(0, room_y + 1, (), generator=generator))
        left = int(torch.randint(0, room_x + 1, (), generator=generator))
        return top * f, left * f

    def time_ids(self, top: int, left: int) -> list[int]:
        """SDXL's micro-conditioning (the pipeline's ``add_time_ids``): [original h, original w, crop top, crop
        left, target h, target w] in pixels; the target is the bucket."""
        w, h = self.original
        return [h, w, top, left, self.bucket[1], self.bucket[0]]

    def crop(
        self, latent: torch.Tensor, center: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """The bucket-sized crop of this image's latent [C, H, W] (encoded from `pixels`) and its time ids."""
        f = self.factor
        if tuple(latent.shape[1:]) != (self.resized[1] // f, self.resized[0] // f):
            raise ValueError(
                f"SampleGeometry.crop: latent {tuple(latent.shape)} is not of the resized image {self.resized}"
            )
        top, left = self.crop_box(center, generator)
        bw, bh = self.bucket[0] // f, self.bucket[1] // f
        return latent[:, top // f : top // f + bh, left // f : left // f + bw], self.time_ids(top, left)

    @classmethod
    def full_frame(cls, width: int, height: int, factor: int = 8) -> SampleGeometry:
        """An image generated at (width, height): nothing resized or cropped (what a pipeline samples)."""
        return cls((width, height), (width, height), factor)

    def pipeline_kwargs(self) -> dict:
        """The StableDiffusionXLPipeline arguments that condition on this geometry's centre crop: the bucket
        as height/width and the micro-conditioning as original_size / crops_coords_top_left / target_size."""
        h, w, top, left, th, tw = self.time_ids(*self.crop_box(center=True))
        return {
            "height": th,
            "width": tw,
            "original_size": (h, w),
            "crops_coords_top_left": (top, left),
            "target_size": (th, tw),
        }


def plan_geometry(
    sizes: list[tuple[int, int]], buckets: list[tuple[int, int]], factor: int
) -> list[SampleGeometry]:
    """The geometry of every image of ``sizes`` (w, h) in its assigned bucket."""
    return [
        SampleGeometry(tuple(size), tuple(bucket), factor)
        for size, bucket in zip(sizes, buckets, strict=True)
    ]
