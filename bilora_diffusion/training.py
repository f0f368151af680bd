"""Pieces every trainer shares: accelerator, optimizer and schedule from options, the method step with
micro-batches, non-finite handling, progress and logging. The SDXL and LLM loops only supply the loss."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import nn
from tqdm.auto import tqdm

from .config import BiLoRAConfig
from .methods import BiLoRAOptimizer, build_optimizer
from .options import OptionError, TrainOptions

logger = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
    """A micro-batch gave a NaN/inf loss; the step is skipped."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        super().__init__(f"non-finite loss on a batch of {', '.join(self.keys[:8])}")


def make_accelerator(options: TrainOptions) -> Accelerator:
    output = Path(options.output_dir)
    log_with = None if options.report_to == "none" else options.report_to
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log_with = None
    return Accelerator(
        mixed_precision=options.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output), logging_dir=str(output / options.logging_dir)
        ),
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """dtype of the frozen weights: half under mixed precision (trainable adapters stay float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_trainable_to_fp32(*models: nn.Module) -> None:
    """Adapter weights train in float32 even when the base is half: fp16 updates of small LoRA steps vanish."""
    for model in models:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def optimizer_class(options: TrainOptions) -> type[torch.optim.Optimizer]:
    if not options.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise OptionError("--use_8bit_adam needs bitsandbytes: pip install 'bilora-diffusion[bnb]'") from None
    return bnb.optim.AdamW8bit


def make_optimizer(
    options: TrainOptions,
    model_lrs: list[tuple[nn.Module, float]],
    config: BiLoRAConfig,
    total_steps: int,
    world_size: int,
) -> BiLoRAOptimizer:
    """The method's optimizer over (model, lr) pairs; --scale_lr multiplies every lr by the global batch."""
    factor = (
        options.train_batch_size * options.gradient_accumulation_steps * world_size if options.scale_lr else 1
    )
    return build_optimizer(
        [(m, lr * factor) for m, lr in model_lrs],
        config,
        method=options.method,
        optimizer_cls=optimizer_class(options),
        lr=options.learning_rate * factor,
        max_grad_norm=options.max_grad_norm or None,
        total_steps=total_steps,
        seed=options.seed,
        betas=(options.adam_beta1, options.adam_beta2),
        weight_decay=options.adam_weight_decay,
        eps=options.adam_epsilon,
    )


def make_scheduler(options: TrainOptions, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedules, stepped once per optimizer step (not through accelerate, which would step it
    once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        options.lr_scheduler,
        optimizer,
        num_warmup_steps=options.lr_warmup_steps,
        num_training_steps=total_steps,
    )


class MethodStep:
    """Runs one optimizer step of any method over a list of micro-batches.

    ``loss_fn(micro_batch) -> loss`` is the model's loss. All micro-batches run inside the closure (gradient
    sync only on the last one), so lora-sam repeats all of them on its second pass with the same noise and
    flat-lora's perturbation covers all of them. Under fp16 the one-pass methods run the closure themselves and
    step through the GradScaler (which refuses closures).
    """

    def __init__(self, accelerator: Accelerator, optimizer: BiLoRAOptimizer, models: Sequence[nn.Module]):
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.models = list(models)
        self.scaler = accelerator.scaler if accelerator.mixed_precision == "fp16" else None

    def _passes(
        self, loss_fn: Callable[[Any], torch.Tensor], micro_batches: list, keys: Callable
    ) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.ExitStack() as stack:
                if not last:
                    for model in self.models:
                        stack.enter_context(self.accelerator.no_sync(model))
                loss = loss_fn(mb)
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteLoss(keys(mb))
                self.accelerator.backward(loss / len(micro_batches))
            total += loss.detach().float().cpu() / len(micro_batches)
        return total

    def __call__(
        self, loss_fn: Callable[[Any], torch.Tensor], micro_batches: list, keys: Callable
    ) -> torch.Tensor:
        """Returns the mean loss of the step; raises NonFiniteLoss (nothing updated) on a NaN/inf loss."""

        def closure() -> torch.Tensor:
            return self._passes(loss_fn, micro_batches, keys)

        try:
            if self.scaler is not None:
                loss = closure()
                self.scaler.unscale_(self.optimizer)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss = self.optimizer.step(closure)
        except NonFiniteLoss:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class NonFiniteGuard:
    """Counts consecutive non-finite steps; after ``limit`` of them the run stops."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def ok(self) -> None:
        self.count = 0

    def failed(self, err: NonFiniteLoss, step: int) -> None:
        self.count += 1
        logger.warning("step %d skipped: %s (%d consecutive)", step, err, self.count)
        if self.count >= self.limit:
            raise RuntimeError(
                f"stopping: {self.count} consecutive steps with a non-finite loss (last on {', '.join(err.keys[:4])}); "
                "the last good checkpoint is kept — lower the learning rate or check those files"
            ) from err


class Progress:
    """A tqdm bar (loss, lr, aux norm, it/s, ETA) on the main process, plus tracker scalars."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int):
        self.accelerator = accelerator
        self.bar = tqdm(
            total=total, initial=initial, desc="steps", disable=not accelerator.is_local_main_process
        )

    def update(self, step: int, loss: float, optimizer: BiLoRAOptimizer, scheduler) -> None:
        lr = scheduler.get_last_lr()[0]
        scalars = {"loss": loss, "lr": lr, "aux_norm": optimizer.last_aux_norm}
        scalars.update({f"grad_norm/{role}": v for role, v in optimizer.last_grad_norms.items()})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", aux=f"{optimizer.last_aux_norm:.3g}")
        self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        self.bar.close()


def steps_per_epoch(num_batches: int, world_size: int, accumulation: int) -> int:
    return max(1, math.ceil(num_batches / (world_size * accumulation)))
