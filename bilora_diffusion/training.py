"""Pieces every trainer shares: accelerator, optimizer and schedule from options, the method step with
micro-batches, non-finite handling, progress and logging. The SDXL and LLM loops only supply the loss."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (
    CONFIG_FILE,
    TRAINER_STATE,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    optimizer_shard_name,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import BiLoRAConfig
from .optim import BiLoRAOptimizer, build_optimizer
from .options import OPTIMIZER_PACKAGES, OptionError, TrainOptions, to_yaml
from .peft_glue import unwrap
from .sharding import apply_fsdp, fsdp_kwargs, no_sync, whole_adapters
from .state import STATE_FILE, save_bilora_state

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


def optimizer_choice(options: TrainOptions) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The inner optimizer class of ``--optimizer`` and its keyword arguments (the lr aside). Classes
    without ``maximize`` (bitsandbytes, Prodigy, Adafactor, Lion) ascend on negated gradients, which mirrors
    their step exactly: each is odd in the gradient sequence it is fed (`optim.optimizer._inner_step`)."""
    name = options.optimizer_name
    beta1 = 0.9 if options.adam_beta1 is None else options.adam_beta1
    beta2 = options.adam_beta2
    decay = options.adam_weight_decay
    if name in ("adamw", "adamw8bit", "prodigy"):
        kwargs = {"betas": (beta1, 0.999 if beta2 is None else beta2), "eps": options.adam_epsilon}
        kwargs["weight_decay"] = decay
    if name == "adamw":
        return torch.optim.AdamW, kwargs
    if name == "sgd":
        return torch.optim.SGD, {"momentum": options.sgd_momentum, "weight_decay": decay}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # kohya's, OneTrainer's and SimpleTuner's Adafactor: --learning_rate is the step, not a relative one.
        flags = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
        return Adafactor, {**flags, "weight_decay": decay}
    module, _, _ = OPTIMIZER_PACKAGES[name]
    try:
        package = importlib.import_module(module)
    except ImportError:  # validate() checks this before any model loads; here for direct callers
        options.validate_optimizer()
        raise
    if name == "adamw8bit":
        return package.optim.AdamW8bit, kwargs
    if name == "lion":
        return package.Lion, {"betas": (beta1, 0.99 if beta2 is None else beta2), "weight_decay": decay}
    return package.Prodigy, {
        **kwargs,
        "beta3": options.prodigy_beta3,
        "d_coef": options.prodigy_d_coef,
        "decouple": options.prodigy_decouple,
        "use_bias_correction": options.prodigy_use_bias_correction,
        "safeguard_warmup": options.prodigy_safeguard_warmup,
    }


def make_optimizer(
    options: TrainOptions,
    model_lrs: list[tuple[nn.Module, float]],
    config: BiLoRAConfig,
    total_steps: int,
    world_size: int,
    **overrides,
) -> BiLoRAOptimizer:
    """The method's optimizer over (model, lr) pairs; --scale_lr multiplies every lr by the global batch.
    ``overrides`` go to `build_optimizer` (e.g. ``flat=False``)."""
    factor = (
        options.train_batch_size * options.gradient_accumulation_steps * world_size if options.scale_lr else 1
    )
    optimizer_cls, kwargs = optimizer_choice(options)
    if options.optimizer_name == "prodigy" and options.learning_rate * factor < 0.1:
        logger.warning(
            "--optimizer prodigy with --learning_rate %g: Prodigy finds the step size itself and its "
            "learning rate is a multiplier of it; use --learning_rate 1.0",
            options.learning_rate * factor,
        )
    return build_optimizer(
        [(m, lr * factor) for m, lr in model_lrs],
        config,
        method=options.method,
        optimizer_cls=optimizer_cls,
        lr=options.learning_rate * factor,
        max_grad_norm=options.max_grad_norm or None,
        total_steps=total_steps,
        seed=options.seed,
        **{**kwargs, **overrides},
    )


def make_scheduler(options: TrainOptions, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedules over ``total_steps`` optimizer steps, with --lr_warmup_steps or --lr_warmup_ratio
    of them warming up (`TrainOptions.warmup_steps`); stepped once per optimizer step (not through accelerate,
    which would step it once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        options.lr_scheduler,
        optimizer,
        num_warmup_steps=options.warmup_steps(total_steps),
        num_training_steps=total_steps,
    )


class MethodStep:
    """Runs one optimizer step of any method over a list of micro-batches.

    ``loss_fn(micro_batch) -> loss`` is the model's loss. All micro-batches run inside the closure (gradient
    sync only on the last one), so lora-sam repeats all of them on its second pass with the same noise and
    flat-lora's perturbation covers all of them. Under fp16 the one-pass methods run the closure themselves and
    step through the GradScaler (which refuses closures).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        optimizer: BiLoRAOptimizer,
        models: Sequence[nn.Module],
        sharded: bool = False,
    ):
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.models = list(models)
        self.scaler = accelerator.scaler if accelerator.mixed_precision == "fp16" else None
        self.no_sync = no_sync if sharded else accelerator.no_sync

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
                        stack.enter_context(self.no_sync(model))
                loss = loss_fn(mb)
                finite = bool(torch.isfinite(loss.detach()))
                if self.accelerator.num_processes > 1:  # every process skips together (else the others hang)
                    flag = torch.tensor([float(finite)], device=self.accelerator.device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                    if not finite or flag.item() == 0.0:
                        raise NonFiniteLoss(keys(mb) if not finite else ["another process's batch"])
                elif not finite:
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


def step_batches(batches: list, position: int, world: int, rank: int, accumulation: int) -> list:
    """This process's micro-batches at ``position`` within an epoch: batch
    ``position·world·accumulation + micro·world + rank``, wrapping around when the epoch's last step has fewer
    batches than processes. One process with accumulation A sees the same batches, in the same order, as A
    processes without it — the multi-process run is the single-process run with the combined batch."""
    first = position * world * accumulation
    return [batches[(first + micro * world + rank) % len(batches)] for micro in range(accumulation)]


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, epoch, step, ...): randomness that a resume reproduces
    without restoring any generator state."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@dataclass
class RunResult:
    """What a run did (tests and benchmarks read it)."""

    output_dir: Path
    losses: list[float]
    val_losses: list[tuple[int, float]]
    global_step: int
    skipped_steps: int


SHARDABLE_OPTIMIZERS = ("adamw", "sgd")
"""Optimizers whose update is elementwise: under FSDP each rank steps its own shards."""
MAIN_ONLY_FORWARD = ("validation_prompt", "eval_accuracy")
"""Options that run the model on the main process alone (sampling, generation), which FSDP cannot: every rank
takes part in every forward of a sharded model."""


def distributed_mode(options: TrainOptions, accelerator: Accelerator) -> str:
    """How the run is spread: "single", "ddp" (accelerate's DDP / MULTI_CPU) or "fsdp" (FSDP2, applied by
    `sharding.apply_fsdp`: under an accelerate FSDP config, or ``--fsdp`` with several processes, e.g.
    torchrun on CPUs where accelerate ignores FSDP settings). Refuses what it cannot run correctly."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise OptionError(
            "DeepSpeed is not supported (its ZeRO partitioning would split the adapters without the Bi-LoRA clip "
            "seeing whole norms): use FSDP (accelerate launch --config_file configs/accelerate_fsdp.yaml) or DDP"
        )
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise OptionError("FSDP: set fsdp_version: 2 in the accelerate config (FSDP1 is not supported)")
        if getattr(accelerator, "torch_device_mesh", None) is not None:
            raise OptionError(
                "FSDP: a parallelism config (HSDP, tensor or context parallel) is not supported; Bi-LoRA shards "
                "over one data-parallel dimension (remove parallelism_config from the accelerate config)"
            )
        if getattr(plugin, "activation_checkpointing", False):
            logger.warning(
                "FSDP: fsdp_activation_checkpointing is not read (the trainer shards the models itself); "
                "use --gradient_checkpointing"
            )
    elif not options.fsdp:
        return "ddp" if accelerator.num_processes > 1 else "single"
    elif accelerator.num_processes == 1:
        raise OptionError(
            "--fsdp shards over several processes: start them with torchrun or accelerate launch"
        )
    if getattr(accelerator, "mixed_precision", None) == "fp16":
        raise OptionError(
            "--mixed_precision fp16 under FSDP: its loss scaler would skip steps on one rank only; use bf16"
        )
    if options.optimizer_name not in SHARDABLE_OPTIMIZERS:
        raise OptionError(
            f"--optimizer {options.optimizer_name} under FSDP: each rank steps only its shards, which is exact "
            f"for elementwise optimizers only ({', '.join(SHARDABLE_OPTIMIZERS)})"
        )
    on = [f"--{name}" for name in MAIN_ONLY_FORWARD if getattr(options, name, None)]
    if on:
        raise OptionError(
            f"{', '.join(on)} under FSDP: sampling and generation run on one process, a sharded model needs all; "
            "sample the exported LoRA after training instead"
        )
    return "fsdp"


def preflight_resume(options: TrainOptions, identity: dict) -> None:
    """A checkpoint whose identity (method, ranks, base model, data, ...) differs from this run's is refused
    before any model loads."""
    if not options.resume_from_checkpoint:
        return
    try:
        path = resolve_checkpoint(options.resume_from_checkpoint, options.output_dir)
        if path is not None:
            check_compatible(json.loads((path / TRAINER_STATE).read_text()), identity, path)
    except CheckpointError as err:
        raise OptionError(str(err)) from None


class Trainer:
    """The loop every trainer shares: method steps, non-finite guard, progress, checkpoints, resume, outputs.

    A subclass loads its data and models, fills ``self.trained`` ({name: attached model}) and ``self.configs``,
    calls `setup_optimization`, and provides `micro_batches`, `loss`, `batch_keys`, `validation_loss`,
    `sample` and `save_outputs`; ``identity(options)`` says what a checkpoint must match to be resumed.
    """

    project = "bilora"

    def __init__(self, options: TrainOptions):
        self.opt = options
        self.accelerator = make_accelerator(options)
        self.output_dir = Path(options.output_dir)
        set_seed(options.seed)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.mode = distributed_mode(options, self.accelerator)
        self.sharded = self.mode == "fsdp"
        self.trained: dict[str, nn.Module] = {}
        self.configs: dict[str, BiLoRAConfig] = {}
        self.global_step = 0

    @classmethod
    def identity(cls, options: TrainOptions) -> dict:
        """What a checkpoint must match to be resumed, as saved in its trainer_state.json: here the adapters
        (method and the core config's shape: ranks, alphas, DoRA, target modules) and the seed (a change only
        warns); each trainer adds its base model and what made its data. Every key is compared on resume."""
        config = options.bilora_config()
        shape = ("rank", "aux_rank", "alpha", "aux_alpha", "use_dora", "target_modules")
        return {"method": options.method, **{k: getattr(config, k) for k in shape}, "seed": options.seed}

    @classmethod
    def checkpoint_identity(cls, options: TrainOptions) -> dict:
        """`identity` plus the optimizer: another optimizer's state cannot be resumed."""
        return {**cls.identity(options), "optimizer": options.optimizer_name}

    @classmethod
    def run(cls, options: TrainOptions) -> RunResult:
        """A whole training: a resume that cannot fit is refused first (before any model loads), then the
        subclass's ``setup()`` (options and data before models) and the loop."""
        preflight_resume(options, cls.checkpoint_identity(options))
        trainer = cls(options)
        trainer.setup()
        return trainer.train()

    def setup(self) -> None:
        raise NotImplementedError

    # -- hooks ----------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        raise NotImplementedError

    def loss(self, micro_batch) -> torch.Tensor:
        raise NotImplementedError

    def batch_keys(self, micro_batch) -> list[str]:
        return []

    def validation_loss(self) -> float | None:
        return None

    def sample(self, step: int) -> None:
        """Validation samples (SDXL); nothing by default."""

    def save_outputs(self) -> None:
        """What users take away (exported LoRA / PEFT adapter); called on the main process at the end."""

    # -- setup ----------------------------------------------------------------------------------------
    def setup_optimization(self, model_lrs: list[tuple[str, float]], steps_in_epoch: int) -> None:
        """Sharding (FSDP) or accelerate's wrapping (DDP), optimizer and schedule over the trained models, then
        the resume."""
        o, acc = self.opt, self.accelerator
        self.steps_per_epoch = steps_in_epoch
        self.total_steps = o.max_train_steps or o.num_train_epochs * steps_in_epoch
        if self.sharded:  # before the optimizer, which steps the shards
            plugin = getattr(acc.state, "fsdp_plugin", None)
            for model in self.trained.values():
                # fully_shard moves each block to the device as it shards it: a model left on the CPU (the LLM
                # trainer's) never sits whole on one GPU
                apply_fsdp(unwrap(model), **fsdp_kwargs(plugin))
        first = next(iter(self.configs.values()))
        pairs = [(self.trained[name], lr) for name, lr in model_lrs]
        self.optimizer = make_optimizer(o, pairs, first, self.total_steps, self.world)
        self.scheduler = make_scheduler(o, self.optimizer, self.total_steps)
        if self.sharded:
            self.models = dict(self.trained)  # accelerate would wrap them in DDP on CPUs
        else:
            prepared = acc.prepare(*self.trained.values())
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            self.models = dict(zip(self.trained, prepared))
        if acc.is_main_process:
            logger.info("distributed: %s", self.describe_mode())
        self.step_fn = MethodStep(acc, self.optimizer, list(self.models.values()), self.sharded)
        if o.resume_from_checkpoint:
            self.resume(o.resume_from_checkpoint)
        if acc.is_main_process:
            acc.init_trackers(self.project, config={k: str(v) for k, v in vars(o).items()})

    def describe_mode(self) -> str:
        """The distributed mode the run really uses, for its start-of-run log."""
        if self.mode == "fsdp":
            return (
                f"FSDP2 (fully_shard) over {self.world} processes ({self.accelerator.distributed_type.value}), "
                f"optimizer state in checkpoints: {self.opt.fsdp_state_dict}"
            )
        if self.mode == "ddp":
            return f"DDP over {self.world} processes ({self.accelerator.distributed_type.value})"
        return f"one process ({self.accelerator.device})"

    def whole(self):
        """`sharding.whole_adapters` over the trained models under FSDP (every rank enters), else nothing."""
        return whole_adapters(list(self.trained.values())) if self.sharded else contextlib.nullcontext()

    def resume(self, spec: str) -> None:
        path = resolve_checkpoint(spec, self.output_dir)
        if path is None:
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", self.output_dir
            )
            return
        with self.whole():
            state = load_checkpoint(path, self.trained, self.optimizer, self.scheduler, self.rank, self.world)
        check_compatible(state, self.checkpoint_identity(self.opt), path)
        self.global_step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.global_step)

    # -- loop -----------------------------------------------------------------------------------------
    def train(self) -> RunResult:
        o, acc = self.opt, self.accelerator
        guard = NonFiniteGuard(o.max_nonfinite_steps)
        progress = Progress(acc, self.total_steps, self.global_step)
        losses, val_losses, skipped = [], [], 0
        if self.global_step == 0:
            self.sample(0)
        while self.global_step < self.total_steps:
            step = self.global_step
            try:
                loss = self.step_fn(self.loss, self.micro_batches(step), self.batch_keys)
                guard.ok()
            except NonFiniteLoss as err:
                skipped += 1
                guard.failed(err, step)
                loss = torch.tensor(float("nan"))
            else:
                self.scheduler.step()
            self.global_step += 1
            losses.append(float(acc.reduce(loss.to(acc.device), "mean")) if self.world > 1 else float(loss))
            progress.update(self.global_step, losses[-1], self.optimizer, self.scheduler)
            if self.global_step % o.checkpointing_steps == 0 and self.global_step < self.total_steps:
                self.checkpoint()
            if self.global_step % o.validation_steps == 0 or self.global_step == self.total_steps:
                val = self.validation_loss()
                if val is not None:
                    val_losses.append((self.global_step, val))
                    acc.log({"val_loss": val}, step=self.global_step)
                if self.global_step < self.total_steps:
                    self.sample(self.global_step)
        progress.close()
        self.finish()
        return RunResult(self.output_dir, losses, val_losses, self.global_step, skipped)

    # -- saving ---------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        acc = self.accelerator
        optimizer_state, rank_files = None, []
        if self.sharded and self.opt.fsdp_state_dict == "sharded":  # each rank writes its shard first
            shards = self.output_dir / f".optimizer-shards-{self.global_step}"
            shards.mkdir(parents=True, exist_ok=True)
            torch.save(self.optimizer.state_dict(), shards / optimizer_shard_name(self.rank, self.world))
            rank_files = [shards / optimizer_shard_name(r, self.world) for r in range(self.world)]
            acc.wait_for_everyone()
        elif self.sharded:
            optimizer_state = self.optimizer.full_state_dict()  # gathered on every rank
        with self.whole():
            if acc.is_main_process:
                trainer_state = {
                    **self.checkpoint_identity(self.opt),
                    "epoch": self.global_step // self.steps_per_epoch,
                    "world_size": self.world,
                }
                try:
                    save_checkpoint(
                        self.output_dir,
                        self.global_step,
                        self.trained,
                        self.configs,
                        self.optimizer,
                        self.scheduler,
                        trainer_state,
                        to_yaml(self.opt),
                        self.opt.checkpoints_total_limit,
                        optimizer_state,
                        rank_files,
                    )
                except CheckpointError as err:
                    logger.error("%s", err)
                finally:
                    if rank_files:
                        shutil.rmtree(rank_files[0].parent, ignore_errors=True)
            acc.wait_for_everyone()

    def finish(self) -> None:
        """The full Bi-LoRA state, the resolved options, then the subclass's outputs (main process only)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        with self.whole():  # under FSDP: the adapters whole on every rank while the main process writes
            if acc.is_main_process:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                components = {name: unwrap(m) for name, m in self.trained.items()}
                save_bilora_state(
                    self.output_dir / STATE_FILE, components, self.configs, {"step": str(self.global_step)}
                )
                (self.output_dir / CONFIG_FILE).write_text(to_yaml(self.opt))
                self.save_outputs()
            acc.wait_for_everyone()
        acc.end_training()
