"""DreamBooth prior preservation (diffusers' ``--with_prior_preservation``): class images and their batches.

Before training, the base model (no adapter attached) paints the class images that ``--class_data_dir`` lacks,
``--sample_batch_size`` at a time, with a progress bar: image ``k`` is ``class_{k:05d}.png`` from seed ``k``, so a
run that stops half-way and its rerun make the same images, and a later run counts the folder's images and
generates only the missing ones (none once there are ``--num_class_images``). The first ``num_class_images``
images of the folder (sorted by name) train, every one captioned ``--class_prompt`` as in diffusers.

Class samples go through the same scan, latent and text-embedding caches and buckets as instance samples: each
class image is planned once per bucket the instance images use (`plan_class_entries`), and every instance
sample of a batch gets a class companion in the same bucket (`class_companions`), so the batch is
``[instance samples; class samples]`` and one forward/backward computes
``loss = instance loss + prior_loss_weight · class loss`` (`prior_loss`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import IMAGE_EXTENSIONS
from .geometry import SampleGeometry
from .models import vae_scale_factor

logger = logging.getLogger(__name__)

CLASS_IMAGE = "class_{:05d}.png"


def class_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (sorted by name); [] if it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def missing_class_images(folder: str | Path, num: int) -> list[int]:
    """Indices ``k`` of the class images to generate: as many as the folder lacks to hold ``num`` images, the
    smallest ``k`` whose ``class_{k:05d}.png`` does not exist yet."""
    folder = Path(folder)
    need = num - len(class_images(folder))
    todo, k = [], 0
    while len(todo) < need:
        if not (folder / CLASS_IMAGE.format(k)).exists():
            todo.append(k)
        k += 1
    return todo


@torch.no_grad()
def generate_class_images(
    pipe,
    folder: str | Path,
    prompt: str,
    num: int,
    *,
    batch_size: int,
    resolution: int,
    steps: int,
    guidance_scale: float,
    autocast=None,
    disable_bar: bool = False,
) -> list[Path]:
    """Generate the class images ``folder`` lacks with ``pipe`` (a StableDiffusionXLPipeline of the base model)
    and return the files written. Image ``k`` comes from a CPU generator seeded ``k``."""
    folder = Path(folder)
    todo = missing_class_images(folder, num)
    if not todo:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bar = tqdm(total=len(todo), desc="generating class images", disable=disable_bar)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(k) for k in chunk]
        with autocast or contextlib.nullcontext():
            images = pipe(
                prompt=[prompt] * len(chunk),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
            ).images
        for k, image in zip(chunk, images):
            path = folder / CLASS_IMAGE.format(k)
            tmp = path.with_name(f".{path.name}.tmp.png")
            image.save(tmp)
            tmp.replace(path)  # never a half-written image under the real name
            written.append(path)
        bar.update(len(chunk))
    bar.close()
    return written


def plan_class_entries(
    n_class: int, sizes: list[tuple[int, int]], buckets: list[tuple[int, int]], factor: int
) -> tuple[list[tuple[int, SampleGeometry]], dict[tuple[int, int], list[int]]]:
    """Class samples: every class image (record index, size) planned for every bucket in ``buckets`` (the
    instance images' buckets; see `SampleGeometry`). Returns the entries ``(record index, geometry)`` and, per
    bucket, the entry indices in record order."""
    entries: list[tuple[int, SampleGeometry]] = []
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for bucket in sorted(set(map(tuple, buckets))):
        for j in range(n_class):
            by_bucket.setdefault(bucket, []).append(len(entries))
            entries.append((j, SampleGeometry(tuple(sizes[j]), bucket, factor)))
    return entries, by_bucket


def class_companions(
    indices: list[int], buckets: list[tuple[int, int]], by_bucket: dict, n_instance: int, epoch: int
) -> list[int]:
    """The class entry paired with each instance sample of a batch: instance ``i`` in epoch ``e`` takes class
    image ``(e·n_instance + i) mod n_class`` of its bucket (diffusers pairs instance i with class i mod n; the
    epoch offset walks through every class image when there are more of them than instance images). A
    function of (epoch, index) only, so a resumed run draws the same pairs."""
    out = []
    for i in indices:
        entries = by_bucket[tuple(buckets[i])]
        out.append(entries[(epoch * n_instance + i) % len(entries)])
    return out


def prior_loss(
    per_sample: torch.Tensor, n_instance: int, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' DreamBooth loss from per-sample losses of ``[instance; class]`` rows: (loss, instance loss,
    prior loss) with ``loss = mean(instance rows) + weight · mean(class rows)``."""
    instance = per_sample[:n_instance].mean()
    prior = per_sample[n_instance:].mean()
    return instance + weight * prior, instance, prior


# -- the trainer's side (called by SDXLTrainer) ------------------------------------------------------------
def setup_class_data(trainer) -> None:
    """Generate the missing class images with the base model (every adapter disabled: W0 only), scan the
    class folder like any dataset, plan each class image for every instance bucket and cache its latents.
    Sets ``trainer.class_records``, ``class_entries``, ``class_by_bucket`` and ``class_latents``."""
    from ..data import DataError, load_records
    from ..peft_glue import adapters_disabled
    from .cache import LatentCache, model_identity
    from .sampling import build_pipeline

    o, acc, c = trainer.opt, trainer.accelerator, trainer.c
    with acc.main_process_first():  # the main process paints; the others then find the images there
        if missing_class_images(o.class_data_dir, o.num_class_images):
            pipe = build_pipeline(c, acc.device)
            autocast = acc.autocast() if acc.device.type == "cuda" else None
            with adapters_disabled(list(trainer.trained.values())):
                written = generate_class_images(
                    pipe,
                    o.class_data_dir,
                    o.class_prompt,
                    o.num_class_images,
                    batch_size=o.sample_batch_size,
                    resolution=o.resolution,
                    steps=o.class_inference_steps,
                    guidance_scale=o.validation_guidance_scale,
                    autocast=autocast,
                    disable_bar=not acc.is_local_main_process,
                )
            trainer.class_generated = len(written)
            if acc.is_main_process:
                logger.info("generated %d class images in %s", len(written), o.class_data_dir)
    report = load_records(
        o.class_data_dir,
        instance_prompt=o.class_prompt,
        caption_extension=o.caption_extension,
        on_bad_image=o.on_bad_image,
    )
    records = sorted(report.records, key=lambda r: r.key)[: o.num_class_images]
    # diffusers: every class image is captioned --class_prompt (caption files in the folder are ignored).
    trainer.class_records = [dataclasses.replace(r, caption=o.class_prompt) for r in records]
    if len(records) < o.num_class_images and acc.is_main_process:
        logger.warning(
            "--num_class_images %d: %s holds %d usable class images; training with those",
            o.num_class_images,
            o.class_data_dir,
            len(records),
        )
    f = vae_scale_factor(c.vae)
    entries, by_bucket = plan_class_entries(len(records), [r.size for r in records], list(trainer.buckets), f)
    vae_id = model_identity(
        o.pretrained_vae_model_name_or_path or o.pretrained_model_name_or_path, dict(c.vae.config)
    )
    cache = LatentCache(vae_id, o.cache_dir)
    with acc.main_process_first():
        cache.build(
            [trainer.class_records[j] for j, _ in entries],
            [plan for _, plan in entries],
            o.random_flip,
            c.vae,
            acc.device,
            c.vae.dtype,
            o.dataloader_num_workers,
            not acc.is_local_main_process,
            label="latent cache (class images)",
        )
    for why in cache.failed.values():
        logger.warning("skipped (unreadable since the scan): %s", why)
    for bucket, bucket_entries in by_bucket.items():
        by_bucket[bucket] = [
            e for e in bucket_entries if trainer.class_records[entries[e][0]].key not in cache.failed
        ]
    if not all(by_bucket.values()):
        raise DataError(f"--class_data_dir {o.class_data_dir}: no readable class image left")
    trainer.class_entries, trainer.class_by_bucket, trainer.class_latents = entries, by_bucket, cache


def class_samples(trainer, indices: list[int], epoch: int) -> tuple[list, list, list, list]:
    """The class companions of a batch's instance samples (`class_companions`), cropped and flipped per
    (seed, epoch, entry) like instance samples: (latents, time_ids, captions, keys)."""
    o = trainer.opt
    from ..training import seeded

    latents, time_ids, captions, keys = [], [], [], []
    companions = class_companions(
        indices, trainer.buckets, trainer.class_by_bucket, len(trainer.records), epoch
    )
    for e in companions:
        j, geometry = trainer.class_entries[e]
        record = trainer.class_records[j]
        g = seeded(o.seed, epoch, -1 - e)  # never an instance sample's generator (those are >= 0)
        flip = o.random_flip and bool(torch.rand((), generator=g) < 0.5)
        latent, ids = geometry.crop(trainer.class_latents.get(record, geometry, flip), o.center_crop, g)
        latents.append(latent)
        time_ids.append(ids)
        captions.append(trainer.class_records[j].caption)
        keys.append(trainer.class_records[j].key)
    return latents, time_ids, captions, keys
