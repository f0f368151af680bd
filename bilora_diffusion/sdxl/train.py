"""The SDXL trainer: setup, loop, save — one recipe class, read top to bottom.

Every method runs through the same ``MethodStep`` (bilora: one forward/backward per step); the auxiliary
branch is disabled for validation, samples and export.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapters import attach_bilora
from ..checkpoint import CONFIG_FILE, check_free_space, list_checkpoints
from ..data import DataError, assign_bucket, epoch_batches, load_records
from ..data.captions import process_caption
from ..hub import resolve_base_model
from ..options import OptionError
from ..peft_glue import aux_disabled, unwrap
from ..scoring import check_model, score_validation
from ..state import STATE_FILE
from ..training import (
    RunResult,
    Trainer,
    cast_trainable_to_fp32,
    seeded,
    step_batches,
    steps_per_epoch,
    weight_dtype,
)
from . import prior
from .cache import LatentCache, TextEmbeddingCache, model_identity
from .components import cast
from .export import export_lora, training_metadata
from .geometry import SampleGeometry, plan_geometry
from .loss import MicroBatch, draw_noise, micro_batch_loss
from .models import load_components, vae_scale_factor
from .options import TOY_MODEL, SDXLOptions
from .sampling import SampleSettings, build_pipeline, save_before_after, save_validation_grid
from .single_file import check_config, is_single_file

logger = logging.getLogger(__name__)


class SDXLTrainer(Trainer):
    project = "bilora-sdxl"

    @classmethod
    def identity(cls, options: SDXLOptions) -> dict:
        """The adapters (`Trainer.identity`), the models they sit on, and what makes the training samples:
        the data source, its held-out split, the geometry (resolution, buckets) and the prior-preservation
        class images."""
        o = options
        return {
            **super().identity(o),
            "base_model": o.pretrained_model_name_or_path,
            "vae": o.pretrained_vae_model_name_or_path,
            "train_text_encoder": o.train_text_encoder,
            "text_encoder_target_modules": o.text_encoder_target_modules if o.train_text_encoder else None,
            "dataset": o.dataset or o.dataset_name or o.train_data_dir,
            "dataset_config_name": o.dataset_config_name,
            "validation_split": o.validation_split,
            "resolution": o.resolution,
            "bucketing": o.bucketing,
            "with_prior_preservation": o.with_prior_preservation,
        }

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.setup_data()
        self.check_base_model()
        self.log_run()
        self.setup_models()
        if self.opt.with_prior_preservation:
            prior.setup_class_data(self)
        self.setup_caches()
        self.setup_scorer()
        self.setup_training()

    def setup_scorer(self) -> None:
        """--validation_clip_model: the scorer of the validation samples, with the training images as the I2I
        references (main process only; it samples)."""
        o = self.opt
        self.scorer = None
        if o.validation_clip_model and self.accelerator.is_main_process:
            from ..data import open_image
            from ..scoring import ClipScorer

            self.scorer = ClipScorer(
                o.validation_clip_model, o.validation_dino_model, self.accelerator.device
            )
            self.scorer.set_references([open_image(record) for record in self.records[:64]])

    def check_base_model(self) -> None:
        """A base model (or VAE) that is missing, unreachable, gated or not SDXL stops the run here, after the
        data scan and before anything loads: one line, exit 2."""
        o = self.opt
        resolve_base_model(o.pretrained_model_name_or_path, "sdxl", revision=o.revision)
        if is_single_file(o.pretrained_model_name_or_path):
            check_config(o.single_file_config)  # its configs and tokenizers: there, and nothing to download
        if o.pretrained_vae_model_name_or_path:
            resolve_base_model(
                o.pretrained_vae_model_name_or_path,
                "vae",
                revision=o.revision,
                flag="--pretrained_vae_model_name_or_path",
            )
        if o.validation_clip_model:
            check_model(o.validation_clip_model, "--validation_clip_model")
        if o.validation_dino_model:
            check_model(o.validation_dino_model, "--validation_dino_model")

    def planned_steps(self) -> tuple[int, int]:
        """(optimizer steps of the run, steps per epoch), as `setup_training` will compute them."""
        o = self.opt
        batches = epoch_batches(self.buckets, o.train_batch_size, o.seed, 0)
        per_epoch = steps_per_epoch(len(batches), self.world, o.gradient_accumulation_steps)
        return o.max_train_steps or o.num_train_epochs * per_epoch, per_epoch

    def log_run(self) -> None:
        """One block at the start of every run: what trains on what, how, for how long, and where it goes."""
        if not self.accelerator.is_main_process:
            return
        o, report = self.opt, self.data_report
        config = o.bilora_config()
        total, per_epoch = self.planned_steps()
        skipped = len(report.skipped) + self.too_small
        data = (
            f"{o.dataset or o.dataset_name or o.train_data_dir} ({report.kind}): {len(self.records)} images"
        )
        data += f" for training, {len(self.val_records)} held out" if self.val_records else ""
        data += f", {skipped} skipped (see the warning above)" if skipped else ""
        sizes = Counter(f"{w}x{h}" for w, h in self.buckets)
        if o.bucketing:
            geometry = (
                f"{o.resolution} px buckets ({', '.join(f'{k}: {n}' for k, n in sizes.most_common(6))})"
            )
        else:
            geometry = f"{o.resolution}x{o.resolution}"
        geometry += ", center crop" if o.center_crop else ", random crop"
        geometry += ", random flip" if o.random_flip else ""
        method = f"{o.method}: rank {config.rank}, alpha {config.alpha:g}" + (", DoRA" if o.use_dora else "")
        if config.aux_rank:
            method += f", aux rank {config.aux_rank}, aux alpha {config.aux_alpha:g}, rho {config.rho:g}"
            method += f", clip {config.clip}, aux lr {o.aux_lr or o.learning_rate:g}"
        elif o.method in ("lora-sam", "flat-lora"):
            method += f", rho {o.rho:g}"
        trained = "UNet" + (" + both text encoders" if o.train_text_encoder else "")
        lines = [
            f"base model  {o.pretrained_model_name_or_path}"
            + (
                f" (VAE {o.pretrained_vae_model_name_or_path})" if o.pretrained_vae_model_name_or_path else ""
            ),
            f"dataset     {data}",
            f"resolution  {geometry}",
            f"method      {method}; {trained} ({', '.join(o.target_modules)})",
            f"optimizer   {o.optimizer_name}, lr {o.learning_rate:g} ({o.lr_scheduler}, "
            f"{o.warmup_steps(total)} warmup steps), batch "
            f"{o.train_batch_size} x {o.gradient_accumulation_steps} accumulation x {self.world} process(es), "
            f"mixed precision {self.accelerator.mixed_precision}",
            f"steps       {total} ({per_epoch} per epoch), checkpoint every {o.checkpointing_steps}"
            + (f", samples every {o.validation_steps}" if o.validation_prompt else ""),
            f"output      {self.output_dir.resolve()}",
        ]
        tags = o.tag_options()
        if tags.varies:
            how = (["shuffled"] if tags.shuffle else []) + (
                [f"each dropped with p {tags.tag_dropout:g}"] if tags.tag_dropout else []
            )
            lines.insert(2, f"captions    tags split on {tags.separator!r}, {' and '.join(how)}")
            lines[2] += f", the first {tags.keep_tokens} kept in place" if tags.keep_tokens else ""
        if o.with_prior_preservation:
            have = min(len(prior.class_images(o.class_data_dir)), o.num_class_images)
            lines.insert(
                2,
                f"prior       {o.num_class_images} class images of {o.class_prompt!r} in {o.class_data_dir} "
                f"({have} there, {o.num_class_images - have} to generate), prior loss weight "
                f"{o.prior_loss_weight:g}",
            )
        logger.info("run:\n  %s", "\n  ".join(lines))

    def setup_data(self) -> None:
        o = self.opt
        report = load_records(
            o.dataset,
            dataset_name=o.dataset_name,
            dataset_config_name=o.dataset_config_name,
            train_data_dir=o.train_data_dir,
            image_column=o.image_column,
            caption_column=o.caption_column,
            caption_extension=o.caption_extension,
            instance_prompt=o.instance_prompt,
            cache_dir=o.cache_dir,
            min_size=math.ceil(o.resolution / o.max_upscale) if not o.bucketing else 0,
            min_size_reason=(
                f"--resolution {o.resolution} with --max_upscale {o.max_upscale:g}: lower --resolution, "
                "raise --max_upscale, or use --bucketing"
            ),
            on_bad_image=o.on_bad_image,
        )
        self.data_report = report
        self.class_records: list = []  # prior preservation: set by prior.setup_class_data
        records, buckets = self.drop_unbucketable(report.records)
        order = list(range(len(records)))
        random.Random(o.seed).shuffle(order)
        n_val = math.ceil(len(records) * o.validation_split) if o.validation_split else 0
        if n_val >= len(records):
            raise OptionError(f"--validation_split {o.validation_split} leaves no training image")
        val_ids = sorted(order[:n_val])
        train_ids = [i for i in range(len(records)) if i not in set(val_ids)]
        self.records = [records[i] for i in train_ids]
        self.val_records = [records[i] for i in val_ids]
        # Decided here once; the geometry (which needs the VAE's factor) reads them in setup_caches.
        self.buckets = [buckets[i] for i in train_ids]
        self.val_buckets = [buckets[i] for i in val_ids]

    def assign_buckets(self, records: list) -> list[tuple[int, int] | None]:
        """The bucket of every record from its size and --resolution / --bucketing / --max_upscale (None: too
        small for any): the one place a record gets its bucket."""
        o = self.opt
        return [assign_bucket(r.size, o.resolution, o.bucketing, o.max_upscale) for r in records]

    def drop_unbucketable(self, records: list) -> tuple[list, list[tuple[int, int]]]:
        """The records that reach a bucket within --max_upscale, and their buckets. The others are bad input
        like any other: skipped with a warning (or the run stops under --on_bad_image error) before any model
        loads."""
        o = self.opt
        kept, buckets, small = [], [], []
        self.too_small = 0
        for record, bucket in zip(records, self.assign_buckets(records)):
            if bucket is None:
                small.append(record)
            else:
                kept.append(record)
                buckets.append(bucket)
        if small:
            names = ", ".join(f"{r.key} ({r.size[0]}x{r.size[1]})" for r in small[:5])
            message = (
                f"{len(small)} image(s) too small for --resolution {o.resolution} with --max_upscale "
                f"{o.max_upscale}: {names}; lower --resolution or raise --max_upscale"
            )
            if o.on_bad_image == "error":
                raise DataError(message)
            self.too_small = len(small)
            if self.accelerator.is_main_process:
                logger.warning("skipped %s", message)
        if not kept:
            raise DataError(f"no usable image left in the dataset: {message}")
        return kept, buckets

    def setup_models(self) -> None:
        o, acc = self.opt, self.accelerator
        c = load_components(
            o.pretrained_model_name_or_path,
            o.pretrained_vae_model_name_or_path,
            o.revision,
            o.variant,
            o.single_file_config,
        )
        self.c = c
        self.dtype = weight_dtype(acc)
        self.prediction_type = o.prediction_type or c.noise_scheduler.config.prediction_type
        c.noise_scheduler.register_to_config(prediction_type=self.prediction_type)
        for model in (c.unet, c.vae, *c.text_encoders):
            model.requires_grad_(False)
        # The VAE stays in float32 unless a fixed VAE is given: SDXL's fp16 VAE overflows to NaN.
        vae_dtype = self.dtype if o.pretrained_vae_model_name_or_path else torch.float32
        cast(c.vae, acc.device, vae_dtype)
        cast(c.unet, acc.device, self.dtype)
        for te in c.text_encoders:
            cast(te, acc.device, self.dtype)
        native = c.unet.config.sample_size * vae_scale_factor(c.vae)
        if acc.is_main_process and not native / 2 <= o.resolution <= native * 2:
            logger.warning(
                "--resolution %d: the base model makes %d px images; training far from its size is slow "
                "(above) or loses detail (below) — set --resolution near %d",
                o.resolution,
                native,
                native,
            )
        self.configs = {"unet": o.bilora_config()}
        attach_bilora(c.unet, self.configs["unet"])
        self.trained = {"unet": c.unet}
        if o.train_text_encoder:
            for name, te in (("text_encoder", c.text_encoder), ("text_encoder_2", c.text_encoder_2)):
                self.configs[name] = o.bilora_config(o.text_encoder_target_modules)
                attach_bilora(te, self.configs[name])
                self.trained[name] = te
        cast_trainable_to_fp32(*self.trained.values())
        if o.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
            if o.train_text_encoder:
                for te in c.text_encoders:
                    te.gradient_checkpointing_enable()
        if o.enable_xformers_memory_efficient_attention:
            from diffusers.utils.import_utils import is_xformers_available

            if not is_xformers_available():
                raise OptionError(
                    "--enable_xformers_memory_efficient_attention: xformers is not installed "
                    "(pip install 'bilora-diffusion[xformers]'); PyTorch SDPA is used by default"
                )
            c.unet.enable_xformers_memory_efficient_attention()
        if o.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

    def setup_caches(self) -> None:
        o, acc, c = self.opt, self.accelerator, self.c
        self.tags = o.tag_options()
        self.f = f = vae_scale_factor(c.vae)
        self.geometry = plan_geometry([r.size for r in self.records], self.buckets, f)
        self.val_geometry = plan_geometry([r.size for r in self.val_records], self.val_buckets, f)
        vae_id = model_identity(
            o.pretrained_vae_model_name_or_path or o.pretrained_model_name_or_path, dict(c.vae.config)
        )
        self.latents = LatentCache(vae_id, o.cache_dir)
        self.val_latents = LatentCache(vae_id, o.cache_dir)
        with acc.main_process_first():  # with --cache_dir, the main process writes and the others read
            bar_off = not acc.is_local_main_process
            self.latents.build(
                self.records,
                self.geometry,
                o.random_flip,
                c.vae,
                acc.device,
                c.vae.dtype,
                o.dataloader_num_workers,
                bar_off,
            )
            self.val_latents.build(
                self.val_records,
                self.val_geometry,
                False,
                c.vae,
                acc.device,
                c.vae.dtype,
                0,
                True,
                label="latent cache (held-out images)",
            )
            self.text_cache = None
            if not o.train_text_encoder and self.tags.varies and acc.is_main_process:
                logger.info(
                    "text-embedding cache off: --shuffle_caption / --caption_tag_dropout change the captions "
                    "every step, so the frozen text encoders encode them each step"
                )
            if not o.train_text_encoder and not self.tags.varies:
                te_id = model_identity(
                    o.pretrained_model_name_or_path, {"revision": o.revision, "variant": o.variant}
                )
                self.text_cache = TextEmbeddingCache(te_id, o.cache_dir)
                captions = [r.caption for r in self.records + self.val_records + self.class_records]
                self.text_cache.build(captions, c.tokenizers, c.text_encoders)
        self.drop_failed()
        # Latents live in the cache from now on; the VAE is only needed for samples.
        if acc.device.type == "cuda":
            c.vae.to("cpu")
            torch.cuda.empty_cache()

    def drop_failed(self) -> None:
        """Samples whose file went bad between the scan and caching are skipped with a warning, not fatal (the
        cache is keyed by content, so the remaining samples' entries stay as they are)."""
        for cache, names in (
            (self.latents, ("records", "geometry", "buckets")),
            (self.val_latents, ("val_records", "val_geometry", "val_buckets")),
        ):
            if not cache.failed:
                continue
            for why in cache.failed.values():
                logger.warning("skipped (unreadable since the scan): %s", why)
            records = getattr(self, names[0])
            keep = [i for i, record in enumerate(records) if record.key not in cache.failed]
            if names[0] == "records" and not keep:
                raise DataError("every training image became unreadable after the scan")
            for name in names:
                values = getattr(self, name)
                setattr(self, name, [values[i] for i in keep])

    def setup_training(self) -> None:
        o = self.opt
        first = epoch_batches(self.buckets, o.train_batch_size, o.seed, 0)
        te_lr = o.text_encoder_lr or o.learning_rate
        model_lrs = [(n, o.learning_rate if n == "unet" else te_lr) for n in self.trained]
        self.setup_optimization(
            model_lrs, steps_per_epoch(len(first), self.world, o.gradient_accumulation_steps)
        )

    # -- batches --------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This process's micro-batches for optimizer step ``step`` (deterministic from seed and step)."""
        o = self.opt
        epoch, position = divmod(step, self.steps_per_epoch)
        batches = epoch_batches(self.buckets, o.train_batch_size, o.seed, epoch)
        picks = step_batches(batches, position, self.world, self.rank, o.gradient_accumulation_steps)
        return [self.make_batch(indices, epoch, step, micro) for micro, indices in enumerate(picks)]

    def caption(self, i: int, epoch: int) -> str:
        """Sample ``i``'s caption at this epoch: as written, or as tags shuffled and dropped (--shuffle_caption,
        --caption_tag_dropout) by a generator of (seed, epoch, sample) — the same draw on a resume."""
        return process_caption(self.records[i].caption, self.tags, seeded(self.opt.seed, epoch, i, 1))

    def make_batch(self, indices: list[int], epoch: int, step: int, micro: int) -> MicroBatch:
        o = self.opt
        latents, time_ids, captions = [], [], []
        for i in indices:
            g = seeded(o.seed, epoch, i)  # crop, flip and caption dropout: per sample, per step
            flip = o.random_flip and bool(torch.rand((), generator=g) < 0.5)
            drop = o.caption_dropout > 0 and bool(torch.rand((), generator=g) < o.caption_dropout)
            geometry = self.geometry[i]
            latent, ids = geometry.crop(self.latents.get(self.records[i], geometry, flip), o.center_crop, g)
            latents.append(latent)
            time_ids.append(ids)
            captions.append("" if drop else self.caption(i, epoch))
        keys = [self.records[i].key for i in indices]
        if self.class_records:  # prior preservation: [instance samples; their class companions]
            extra = prior.class_samples(self, indices, epoch)
            latents, time_ids, captions, keys = (
                a + b for a, b in zip((latents, time_ids, captions, keys), extra)
            )
        stacked = torch.stack(latents)
        noise, timesteps = draw_noise(
            stacked,
            self.c.noise_scheduler.config.num_train_timesteps,
            o.noise_offset,
            seeded(o.seed, 7, step, micro * self.world + self.rank),
        )
        mb = MicroBatch(
            stacked,
            torch.tensor(time_ids),
            captions,
            keys,
            noise,
            timesteps,
            n_instance=len(indices) if self.class_records else None,
        )
        if self.text_cache is not None:
            full = [self.records[i].caption for i in indices] + captions[len(indices) :]
            embeds, pooled = self.text_cache.get(full)
            keep = torch.tensor([bool(c) for c in captions], dtype=embeds.dtype)
            # Dropped captions become zero embeddings: what the SDXL pipeline feeds as the unconditional
            # input (force_zeros_for_empty_prompt), so classifier-free guidance matches training.
            mb.prompt_embeds = embeds * keep[:, None, None]
            mb.pooled = pooled * keep[:, None]
        return mb

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, mb: MicroBatch) -> torch.Tensor:
        c = self.c
        encoders = [self.models.get(n, getattr(c, n)) for n in ("text_encoder", "text_encoder_2")]
        return micro_batch_loss(
            mb,
            self.models["unet"],
            c.noise_scheduler,
            encoders,
            c.tokenizers,
            self.accelerator,
            self.dtype,
            self.prediction_type,
            self.opt.snr_gamma,
            self.opt.prior_loss_weight,
        )

    def batch_keys(self, mb: MicroBatch) -> list[str]:
        return mb.keys

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Held-out loss at fixed noise and timesteps, center crops, full captions; auxiliary branch off."""
        if not self.val_records:
            return None
        total = 0.0
        with aux_disabled(list(self.trained.values())):
            for i, (record, geometry) in enumerate(zip(self.val_records, self.val_geometry)):
                latent, ids = geometry.crop(self.val_latents.get(record, geometry, False), center=True)
                lat = latent[None]
                noise, t = draw_noise(
                    lat, self.c.noise_scheduler.config.num_train_timesteps, 0.0, seeded(1234, i)
                )
                mb = MicroBatch(lat, torch.tensor([ids]), [record.caption], [record.key], noise, t)
                if self.text_cache is not None:
                    mb.prompt_embeds, mb.pooled = self.text_cache.get([record.caption])
                total += float(self.loss(mb))
        return total / len(self.val_records)

    def evaluation_samples(self, records: list | None = None) -> list[tuple]:
        """``(record, geometry, latent)`` of every training record, or of ``records`` (bucketed and cached like
        training images, their captions added to the text-embedding cache when there is one): what
        `bilora_diffusion.sdxl.landscape.fixed_batches` evaluates."""
        if records is None:
            return [(r, g, self.latents.get(r, g, False)) for r, g in zip(self.records, self.geometry)]
        o, c = self.opt, self.c
        records = list(records)
        buckets = self.assign_buckets(records)
        for record, bucket in zip(records, buckets):
            if bucket is None:
                raise DataError(
                    f"{record.key}: image {record.size[0]}x{record.size[1]} is too small for --resolution "
                    f"{o.resolution} with --max_upscale {o.max_upscale}"
                )
        geometry = plan_geometry([r.size for r in records], buckets, self.f)
        cache = LatentCache(self.latents.vae_identity, o.cache_dir)  # on disk when the run caches there
        cache.build(records, geometry, False, c.vae, c.vae.device, c.vae.dtype, 0, True, label="evaluation")
        if cache.failed:
            raise DataError(f"unreadable since the scan: {next(iter(cache.failed.values()))}")
        if self.text_cache is not None:
            self.text_cache.build([r.caption for r in records], c.tokenizers, c.text_encoders)
        return [(r, g, cache.get(r, g, False)) for r, g in zip(records, geometry)]

    def sample_settings(self) -> SampleSettings:
        """What validation samples are drawn with: prompts, seeds, steps, guidance, a square of --resolution."""
        o = self.opt
        return SampleSettings(
            prompts=list(o.validation_prompt),
            per_prompt=o.num_validation_images,
            seed=o.seed,
            steps=o.validation_inference_steps,
            guidance_scale=o.validation_guidance_scale,
            geometry=SampleGeometry.full_frame(o.resolution, o.resolution, self.f),
        )

    def save_samples(self, step: int) -> Path:
        """samples/step_XXXXXX.png, scored with --validation_clip_model (call under aux_disabled)."""
        acc = self.accelerator
        path, rows = save_validation_grid(
            build_pipeline(self.c, acc.device),
            self.sample_settings(),
            Path(self.opt.output_dir) / "samples",
            step,
            acc.trackers,
            acc.autocast if acc.device.type == "cuda" else None,
        )
        score_validation(self, rows, step)  # samples/scores.json, TensorBoard
        return path

    def sample(self, step: int) -> None:
        o, acc = self.opt, self.accelerator
        if o.validation_prompt and acc.is_main_process:
            with aux_disabled(list(self.trained.values())):
                self.save_samples(step)
        acc.wait_for_everyone()

    def save_outputs(self) -> None:
        written = [(f"LoRA ({fmt})", path) for fmt, path in zip(self.export_formats(), self.export())]
        written += [
            ("both branches", self.output_dir / STATE_FILE),
            ("options", self.output_dir / CONFIG_FILE),
        ]
        if self.opt.validation_prompt:
            with aux_disabled(list(self.trained.values())):
                written.append(("samples", self.save_samples(self.global_step)))
                if self.opt.compare_grid:
                    acc = self.accelerator
                    path, before, after = save_before_after(
                        build_pipeline(self.c, acc.device),
                        self.sample_settings(),
                        Path(self.opt.output_dir) / "samples",
                        list(self.trained.values()),
                        self.global_step,
                        acc.trackers,
                        acc.autocast if acc.device.type == "cuda" else None,
                    )
                    written.append(("before/after", path))
                    if Path(self.opt.pretrained_model_name_or_path).resolve() == Path(TOY_MODEL).resolve():
                        report_toy_concept(self.opt.validation_prompt, before, after)
        checkpoints = list_checkpoints(self.output_dir)
        if checkpoints:
            written.append(("checkpoint", checkpoints[-1]))
        width = max(len(what) for what, _ in written)
        logger.info(
            "done: %d steps; wrote\n  %s",
            self.global_step,
            "\n  ".join(f"{what:<{width}}  {Path(path).resolve()}" for what, path in written),
        )

    def export_formats(self) -> list[str]:
        """The formats `export` writes, in the order of the paths it returns."""
        fmt = self.opt.export_format
        return ["diffusers", "kohya"] if fmt == "both" else [fmt]

    def export(self) -> list[Path]:
        """The primary branch as the LoRA files users take away (diffusers and/or kohya format); returns
        their paths."""
        o = self.opt
        unet_config = self.configs["unet"]
        resolved = {**asdict(o), "aux_rank": unet_config.aux_rank, "aux_alpha": unet_config.aux_alpha}
        metadata = {**training_metadata(resolved), "ss_steps": str(self.global_step)}
        components = {name: unwrap(m) for name, m in self.trained.items()}
        check_free_space(
            self.output_dir,
            4 * sum(p.numel() * 4 for m in components.values() for p in m.parameters() if p.requires_grad),
        )
        return export_lora(
            self.output_dir,
            components,
            self.configs,
            format=o.export_format,
            save_dtype=o.save_dtype,
            metadata=metadata,
            output_name=o.output_name,
        )


def report_toy_concept(prompts: list[str], before: list, after: list) -> dict[str, float]:
    """On the embedded toy model, the toy analyzer says whether the samples show the prompted color and shape,
    without and with the LoRA (the demo's "did it learn the concept" check)."""
    import numpy as np

    from ..toy.analyzer import analyze

    scores = {}
    for name, rows in (("before", before), ("after", after)):
        hits = total = 0
        for prompt, images in zip(prompts, rows):
            for image in images:
                found = analyze(np.asarray(image))
                hits += found.color in prompt.split() and found.shape in prompt.split()
                total += 1
        scores[name] = hits / max(total, 1)
    logger.info(
        "toy analyzer: %.0f%% of the samples show the prompted color and shape without the LoRA, %.0f%% with it",
        100 * scores["before"],
        100 * scores["after"],
    )
    return scores


def train(options: SDXLOptions) -> RunResult:
    """Run a whole training: options and the data scan first (nothing loads if they are bad), then models."""
    return SDXLTrainer.run(options)
