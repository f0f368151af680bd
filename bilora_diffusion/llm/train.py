"""The causal-LM trainer: setup, loop, save — the shared `Trainer` with a language-model loss.

Everything but the data and the loss comes from `bilora_diffusion.training` (method step, non-finite guard,
progress, checkpoints, exact resume, the full Bi-LoRA state): the SDXL and LLM paths run the same loop. The
auxiliary branch is disabled for the held-out loss and the export.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields
from pathlib import Path

import torch

from ..adapters import attach_bilora
from ..checkpoint import CONFIG_FILE
from ..options import OptionError
from ..peft_glue import aux_disabled, unwrap
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
from .accuracy import ACCURACY_FILE, PREDICTIONS_FILE, before_after
from .data import DataReport, Example, LMBatch, collate, pack, pad_id, read_rows, tokenize_rows
from .export import MERGED_DIR, save_merged, save_peft_adapter
from .options import FormatOptions, LLMOptions
from .sources import check_data, check_model, check_tokenizer

logger = logging.getLogger(__name__)


def load_tokenizer(
    name: str, revision: str | None = None, trust_remote_code: bool = False, flag: str = "--model"
):
    """The tokenizer; a name that is neither a folder nor a reachable Hub repo is a bad option (exit 2)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            name, revision=revision or "main", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise OptionError(
            f"{flag} {name}: no tokenizer could be loaded ({str(err).splitlines()[0]})"
        ) from err


class LLMTrainer(Trainer):
    project = "bilora-llm"

    @classmethod
    def identity(cls, options: LLMOptions) -> dict:
        """The adapters (`Trainer.identity`), the base model, and what made the training sequences: the data,
        how rows become text (the prompt format) and tokens (max_length, packing)."""
        data = (
            "dataset",
            "dataset_config_name",
            "dataset_split",
            "max_train_samples",
            "max_length",
            "packing",
        )
        text = [f.name for f in fields(FormatOptions)]
        return {
            **super().identity(options),
            "base_model": options.model,
            "tokenizer": options.tokenizer,
            **{k: getattr(options, k) for k in (*data, *text)},
        }

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.setup_data()
        self.log_run()
        self.setup_models()
        self.setup_training()

    def log_run(self) -> None:
        """One block at the start of every run: what trains on what, how, for how long, and where it goes."""
        if not self.accelerator.is_main_process:
            return
        o = self.opt
        config = o.bilora_config()
        per_epoch = steps_per_epoch(
            math.ceil(len(self.samples) / o.train_batch_size), self.world, o.gradient_accumulation_steps
        )
        total = o.max_train_steps or o.num_train_epochs * per_epoch
        method = f"{o.method}: rank {config.rank}, alpha {config.alpha:g}"
        if config.aux_rank:
            method += f", aux rank {config.aux_rank}, aux alpha {config.aux_alpha:g}, rho {config.rho:g}"
            method += f", clip {config.clip}, aux lr {o.aux_lr or o.learning_rate:g}"
        elif o.method in ("lora-sam", "flat-lora"):
            method += f", rho {o.rho:g}"
        data = f"{o.dataset}: {len(self.examples)} examples"
        if o.eval_dataset:
            data += f"; held out {o.eval_dataset}: {len(self.eval_examples)}"
            data += " (accuracy without and with the LoRA at the end)" if o.eval_accuracy else ""
        lines = [
            f"base model  {o.model}" + (f" (tokenizer {o.tokenizer})" if o.tokenizer else ""),
            f"dataset     {data}; max length {o.max_length}" + (", packed" if o.packing else ""),
            f"method      {method} ({', '.join(o.target_modules)})",
            f"optimizer   lr {o.learning_rate:g} ({o.lr_scheduler}, {o.warmup_steps(total)} warmup steps), "
            f"batch {o.train_batch_size} x "
            f"{o.gradient_accumulation_steps} accumulation x {self.world} process(es), "
            f"mixed precision {self.accelerator.mixed_precision}",
            f"steps       {total} ({per_epoch} per epoch), checkpoint every {o.checkpointing_steps}",
            f"output      {self.output_dir.resolve()}",
        ]
        logger.info("run:\n  %s", "\n  ".join(lines))

    def setup_data(self) -> None:
        """Rows to examples for training (and held-out evaluation), before any model weight loads. The data
        is read first, then the model and tokenizer are found (one-line errors, no Hub retries), then the
        tokenizer loads."""
        o = self.opt
        check_data(o.dataset, "--dataset")
        if o.eval_dataset:
            check_data(o.eval_dataset, "--eval_dataset")
        rows = read_rows(o.dataset, o.dataset_config_name, o.dataset_split, o.max_train_samples)
        self.eval_rows = []
        if o.eval_dataset:
            self.eval_rows = read_rows(
                o.eval_dataset, o.dataset_config_name, o.eval_split, o.max_eval_samples
            )
        check_model(o.model, "--model", o.revision)
        if o.tokenizer:
            check_tokenizer(o.tokenizer, "--tokenizer")
        # --revision is the model's: a separate --tokenizer is loaded at its default revision.
        self.tokenizer = load_tokenizer(
            o.tokenizer or o.model,
            None if o.tokenizer else o.revision,
            o.trust_remote_code,
            "--tokenizer" if o.tokenizer else "--model",
        )
        self.pad_id = pad_id(self.tokenizer)
        self.examples, self.report = self.tokenize(rows, "train")
        self.eval_examples: list[Example] = []
        if o.eval_dataset:
            self.eval_examples, self.eval_report = self.tokenize(self.eval_rows, "eval")
        self.samples = pack(self.examples, o.max_length) if o.packing else self.examples
        if o.packing and self.accelerator.is_main_process:
            logger.info("packed %d examples into %d sequences", len(self.examples), len(self.samples))

    def tokenize(self, rows: list[dict], name: str) -> tuple[list[Example], DataReport]:
        o = self.opt
        examples, report = tokenize_rows(rows, self.tokenizer, o.prompt_format(), o.max_length, name)
        if self.accelerator.is_main_process:
            log = logger.warning if report.truncated or report.dropped or report.bad_rows else logger.info
            log("%s", report.summary(o.max_length))
        return examples, report

    def setup_models(self) -> None:
        from transformers import AutoModelForCausalLM

        o, acc = self.opt, self.accelerator
        self.dtype = weight_dtype(acc)
        extra = {"attn_implementation": o.attn_implementation} if o.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(
            o.model,
            revision=o.revision or "main",
            dtype=self.dtype,
            trust_remote_code=o.trust_remote_code,
            **extra,
        )
        model.requires_grad_(False)
        if not self.sharded:  # sharded, fully_shard moves one block at a time: no GPU holds the whole model
            model.to(acc.device)
        self.configs = {"model": o.bilora_config()}
        attach_bilora(model, self.configs["model"])
        cast_trainable_to_fp32(model)
        if o.gradient_checkpointing:
            # Non-reentrant checkpointing: gradients reach the adapters although the inputs need none.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if o.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        model.train()  # from_pretrained returns eval mode: LoRA dropout would be off
        self.trained = {"model": model}

    def setup_training(self) -> None:
        o = self.opt
        steps = steps_per_epoch(
            math.ceil(len(self.samples) / o.train_batch_size), self.world, o.gradient_accumulation_steps
        )
        self.setup_optimization([("model", o.learning_rate)], steps)

    # -- batches --------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (sample indices): a permutation drawn from (seed, epoch) only, so every
        process and every resume sees the same order without restoring any generator."""
        if getattr(self, "_order_epoch", None) != epoch:
            order = torch.randperm(len(self.samples), generator=seeded(self.opt.seed, epoch)).tolist()
            size = self.opt.train_batch_size
            self._order = [order[i : i + size] for i in range(0, len(order), size)]
            self._order_epoch = epoch
        return self._order

    def micro_batches(self, step: int) -> list[LMBatch]:
        """This process's micro-batches of optimizer step ``step``: batch ``(step·world + micro·world + rank)``
        of the epoch, wrapping around when the last step of an epoch has fewer batches than processes."""
        o = self.opt
        epoch, position = divmod(step, self.steps_per_epoch)
        batches = self.epoch_order(epoch)
        picks = step_batches(batches, position, self.world, self.rank, o.gradient_accumulation_steps)
        return [collate([self.samples[i] for i in pick], self.pad_id) for pick in picks]

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, mb: LMBatch) -> torch.Tensor:
        """Mean cross-entropy over the micro-batch's response tokens (transformers shifts the labels and
        computes it in float32). No KV cache: a cache would also disable the packed-sequence masks."""
        with self.accelerator.autocast():
            return self.models["model"](**mb.model_inputs(self.accelerator.device), use_cache=False).loss

    def batch_keys(self, mb: LMBatch) -> list[str]:
        return mb.keys

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Held-out loss per response token (and its perplexity, logged) with the auxiliary branch disabled:
        the model users get. Each process takes every world-th batch; the sums are reduced."""
        if not self.eval_examples:
            return None
        model, acc = self.trained["model"], self.accelerator
        size = self.opt.train_batch_size
        batches = [self.eval_examples[i : i + size] for i in range(0, len(self.eval_examples), size)]
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        model.eval()
        try:
            with aux_disabled(model):
                # every rank runs every forward of a sharded model; otherwise each takes every world-th batch
                mine = batches if self.sharded else batches[self.rank :: self.world]
                for batch in mine:
                    mb = collate(batch, self.pad_id)
                    with acc.autocast():
                        loss = model(**mb.model_inputs(acc.device), use_cache=False).loss
                    totals += torch.stack(
                        [loss.double() * mb.trained_tokens, totals.new_tensor(mb.trained_tokens)]
                    )
        finally:
            model.train()
        if self.world > 1 and not self.sharded:
            totals = acc.reduce(totals, "sum")
        value = float(totals[0] / totals[1])
        acc.log({"eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}, step=self.global_step)
        return value

    # -- outputs --------------------------------------------------------------------------------------
    def save_outputs(self) -> None:
        """The PEFT adapter (primary branch) and the tokenizer in output_dir; with --merge, the merged model."""
        o = self.opt
        model = unwrap(self.trained["model"])
        save_peft_adapter(model, self.configs["model"], self.output_dir, o.model)
        self.tokenizer.save_pretrained(str(self.output_dir))
        if o.merge:
            save_merged(
                o.model,
                self.output_dir,
                self.output_dir / MERGED_DIR,
                self.tokenizer,
                o.revision,
                o.trust_remote_code,
            )
        if o.eval_accuracy:
            before_after(
                model,
                self.tokenizer,
                self.eval_rows,
                o.prompt_format(),
                self.output_dir,
                o.eval_max_new_tokens,
                o.train_batch_size,
            )
        written = [("PEFT adapter", self.output_dir / "adapter_model.safetensors")]
        written += [
            ("both branches", self.output_dir / STATE_FILE),
            ("options", self.output_dir / CONFIG_FILE),
        ]
        if o.merge:
            written.append(("merged model", self.output_dir / MERGED_DIR))
        if o.eval_accuracy:
            written += [("accuracy", self.output_dir / ACCURACY_FILE)]
            written += [("predictions", self.output_dir / PREDICTIONS_FILE)]
        steps = {int(p.name[11:]): p for p in self.output_dir.glob("checkpoint-*") if p.name[11:].isdigit()}
        checkpoints = [steps[k] for k in sorted(steps)]
        if checkpoints:
            written.append(("checkpoint", checkpoints[-1]))
        logger.info(
            "wrote:\n  %s", "\n  ".join(f"{what:<14}{Path(path).resolve()}" for what, path in written)
        )


def train(options: LLMOptions) -> RunResult:
    """Run a whole training: options and data first (nothing loads if they are bad), then the model."""
    return LLMTrainer.run(options)
