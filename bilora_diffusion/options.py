"""Options as typed dataclasses, read from a YAML file and the command line (flags override the file).

One source of truth: each trainer's options are one dataclass whose fields carry their help text
(``field(metadata={"help": ...})``), built on `TrainOptions`, whose core fields are generated from
`BiLoRAConfig`'s (same names, defaults and help; other accepted spellings in the class's ``aliases``). This module
turns it into a command-line parser and checks types and unknown keys (with a "did you mean"); the dataclass's
``validate()`` holds every value check, choices included. Errors raise
`OptionError`, which the entry points turn into exit code 2 with a one-line message — before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config import METHODS, BiLoRAConfig
from .errors import BiLoRAError, ConfigError, OptionError


def opt(
    default: Any = None, help: str = "", *, choices: tuple | None = None, path: bool = False, **kw
) -> Any:
    """A dataclass field with its help text. ``path=True`` marks an input path: relative paths written in a
    YAML file are resolved against the file's folder when they exist there."""
    metadata = {"help": help, "choices": choices, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation like ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def _convert(name: str, value: Any, tp: Any) -> Any:
    base, is_list = _base_type(tp)
    if value is None:
        return None
    if is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_convert(name, v, base) for v in items]
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"--{name}: expected true or false, got {value!r}")
    if isinstance(value, str) and value.lower() in ("none", "null") and base is not str:
        return None
    try:
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise OptionError(f"--{name}: expected {base.__name__}, got {value!r}") from None


def _unknown(name: str, known: list[str], where: str) -> OptionError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return OptionError(f"unknown option '{name}' {where}{hint}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def aliases(cls: type) -> dict[str, str]:
    """Other accepted spellings of ``cls``'s options ({alias: field name}), in YAML and on the command line:
    the class attribute ``aliases`` (not a field), when it has one."""
    return dict(getattr(cls, "aliases", {}))


def option_flag(options: Any, name: str) -> str:
    """How a message names option ``name`` of an options class or object: ``--alpha/--lora_alpha`` when it
    has aliases, else ``--name``."""
    cls = options if isinstance(options, type) else type(options)
    spellings = [name] + [alias for alias, target in aliases(cls).items() if target == name]
    return "/".join(f"--{spelling}" for spelling in spellings)


def check_choices(options: Any) -> None:
    """Every option that has ``choices`` holds one of them (or None): part of each options class's
    ``validate()``, so options built in code are checked as the parser's are."""
    for f in fields(options):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(options, f.name)
        bad = [
            v for v in (value if isinstance(value, list) else [value]) if v is not None and v not in choices
        ]
        if bad:
            value = bad[0]
            raise OptionError(
                f"{option_flag(options, f.name)}: must be one of {', '.join(map(str, choices))}, got {value!r}"
            )


def read_yaml(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    """Options from a YAML file (safe_load): unknown keys are errors, the class's ``aliases`` are accepted
    keys (one option written twice under two spellings is an error); relative input paths are resolved
    against the file's folder when they exist there (so presets work from any working directory)."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise OptionError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise OptionError(f"--config {path}: expected a mapping of option: value")
    types_ = _field_types(cls)
    by_name = {f.name: f for f in fields(cls)}
    spellings = aliases(cls)
    out, written = {}, {}
    for key, value in data.items():
        written_key = key = str(key).replace("-", "_")
        key = spellings.get(key, key)
        if key not in types_:
            raise _unknown(key, list(types_) + list(spellings), f"in {path}")
        if key in written:
            raise OptionError(f"{path}: '{written[key]}' and '{written_key}' are the same option; keep one")
        written[key] = written_key
        if by_name[key].metadata.get("path") and isinstance(value, str) and not os.path.isabs(value):
            candidate = (path.parent / value).resolve()
            if candidate.exists() and not Path(value).exists():
                value = str(candidate)
        out[key] = _convert(written_key, value, types_[key])
    return out


def parse_cli(argv: list[str], cls: type) -> tuple[str | None, dict[str, Any]]:
    """``--name value`` / ``--name=value`` / bare ``--flag`` or ``--no-flag`` (booleans) / ``--name v1 v2`` or
    ``--name v1 --name v2`` (lists)."""
    types_ = _field_types(cls)
    config_path, values, i = None, {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise OptionError(f"unexpected argument {token!r} (options are written --name value)")
        name, eq, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        i += 1
        args = [inline] if eq else []
        while not eq and i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
            args.append(argv[i])
            i += 1
        if name == "config":
            if len(args) != 1:
                raise OptionError("--config takes one YAML file")
            config_path = args[0]
            continue
        negated = (
            name not in types_
            and name not in aliases(cls)
            and name.startswith("no_")
            and _base_type(types_.get(aliases(cls).get(name[3:], name[3:])))[0] is bool
        )
        if negated and not args:
            name, args = name[3:], ["false"]  # --no-flag: argparse's BooleanOptionalAction spelling
        key = aliases(cls).get(name, name)  # --lora_alpha sets alpha; messages keep the spelling used
        if key not in types_:
            raise _unknown(name, list(types_) + list(aliases(cls)) + ["config"], "on the command line")
        base, is_list = _base_type(types_[key])
        if base is bool and not args:
            args = ["true"]
        if not args:
            raise OptionError(f"--{name}: missing value")
        if not is_list and len(args) > 1:
            raise OptionError(f"--{name}: expected one value, got {len(args)}: {args}")
        value = _convert(name, args if is_list else args[0], types_[key])
        # A list option given twice collects both (--prompt a --prompt b), as argparse's action="append" does.
        values[key] = values[key] + value if is_list and values.get(key) is not None else value
    return config_path, values


def parse_options(cls: type, argv: list[str] | None = None) -> Any:
    """Build ``cls`` from ``--config FILE.yaml`` and the flags (flags win), then ``validate()`` it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(cls))
        raise SystemExit(0)
    config_path, cli_values = parse_cli(argv, cls)
    values = read_yaml(config_path, cls) if config_path else {}
    for flag, others in getattr(cls, "overrides", {}).items():
        if flag in cli_values:  # e.g. --lr_warmup_steps on the command line drops the config file's ratio
            for other in others:
                if other not in cli_values:
                    values.pop(other, None)
    values.update(cli_values)
    for f in fields(cls):
        choices = f.metadata.get("choices")
        value = values.get(f.name)
        if choices and isinstance(value, str) and value not in choices and value.lower() in choices:
            values[f.name] = value.lower()  # --optimizer AdamW (diffusers' spelling)
    options = cls(**values)
    try:
        check_choices(options)  # for every options class; the trainers' validate() checks them too
        options.validate()
    except ConfigError as err:
        raise OptionError(str(err)) from None
    return options


def format_help(cls: type) -> str:
    """The ``--help`` text: the class's ``usage`` (a plain class attribute, not a field) when it has one,
    then every option with its default and help."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "SCRIPT"
    usage = getattr(cls, "usage", None) or f"usage: python {script} [--config FILE.yaml] [--name value ...]"
    lines = [usage, ""]
    lines.append(f"options ({cls.__name__}); also --config FILE.yaml with the same keys (flags override it):")
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        extra = f" {{{','.join(map(str, choices))}}}" if choices else ""
        extra += "".join(f" (also --{a})" for a, target in aliases(cls).items() if target == f.name)
        lines.append(f"  --{f.name}{extra} (default: {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_yaml(options: Any) -> str:
    """The resolved options as YAML (saved with every checkpoint and output)."""
    return yaml.safe_dump(asdict(options), sort_keys=False)


def run_cli(
    main,
    cls: type,
    argv: list[str] | None = None,
    user_errors: tuple[type, ...] = (),
    prog: str | None = None,
) -> Any:
    """Parse options and run ``main(options)``. A bad option or any other `BiLoRAError` (bad data, an
    incompatible checkpoint, a refused export; and ``user_errors``, e.g. ``OSError``) exits with code 2 and one
    line naming the problem: ``error: ...``, or ``PROG: error: ...`` with ``prog`` (argparse's convention)."""
    try:
        return main(parse_options(cls, argv))
    except (BiLoRAError, *user_errors) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


# -- options shared by the SDXL and LLM trainers ------------------------------------------------------------
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion", "sgd")
"""Names of --optimizer."""

OPTIMIZER_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes", "bnb"),
    "prodigy": ("prodigyopt", "prodigyopt", "prodigy"),
    "lion": ("lion_pytorch", "lion-pytorch", "lion"),
}
"""--optimizer name -> (module, PyPI package, extra of bilora-diffusion that installs it)."""


# -- the core's options: every field of BiLoRAConfig, under its name, default and help -----------------------
_CORE_TYPES = {"target_modules": list[str]}
"""Where the command line and YAML give a core field another type (a list of module names; BiLoRAConfig
also takes one regular expression, which the command line passes as a list of one)."""


def _core_field(f: dataclasses.Field) -> tuple[str, Any, Any]:
    """(name, type, field) of an option copied from a `BiLoRAConfig` field."""
    tp = _CORE_TYPES.get(f.name) or typing.get_type_hints(BiLoRAConfig)[f.name]
    default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    return f.name, tp, opt(default, f.metadata["help"], choices=f.metadata.get("choices"))


def core_opt(name: str, default: Any, help: str = "") -> Any:
    """A core field redeclared with another default by one trainer (the LLM trainer's rank 8): the core's
    help text unless ``help`` says what the new default means."""
    core = {f.name: f for f in fields(BiLoRAConfig)}[name]
    return opt(default, help or core.metadata["help"], choices=core.metadata.get("choices"))


CoreOptions = dataclasses.make_dataclass("CoreOptions", [_core_field(f) for f in fields(BiLoRAConfig)])
CoreOptions.__doc__ = "The fields of `BiLoRAConfig` as options: the base of `TrainOptions`."
CoreOptions.__module__ = __name__


@dataclass
class TrainOptions(CoreOptions):
    """Training options common to every trainer: the core's (`BiLoRAConfig`'s fields, same names) and
    diffusers' flag names where diffusers has them. PEFT's and diffusers' spellings of the core's fields are
    accepted too (``aliases``)."""

    aliases = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
    """{accepted spelling: field}: what diffusers' and PEFT's users write (not a field)."""

    # A core field whose trainer default differs from BiLoRAConfig's (alpha = rank, as diffusers' scripts).
    alpha: float | None = core_opt(
        "alpha",
        None,
        "LoRA alpha of the primary branch; its scale is s1 = alpha / rank. None = rank (diffusers').",
    )
    output_dir: str = opt("bilora-output", "Where checkpoints, the exported LoRA, samples and logs go.")
    seed: int = opt(
        0, "Seed of everything random (data order, noise, timesteps, init); same seed = same run."
    )
    method: str = opt("bilora", "Training method.", choices=METHODS)
    learning_rate: float = opt(1e-4, "Initial learning rate (after warmup) of the primary branch.")
    scale_lr: bool = opt(False, "Scale the learning rate by batch size x accumulation x processes.")
    lr_scheduler: str = opt(
        "constant",
        "Learning-rate schedule (diffusers.optimization.get_scheduler).",
        choices=(
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ),
    )
    lr_warmup_steps: int = opt(0, "Warmup steps of the schedule.")
    overrides = {"lr_warmup_steps": ("lr_warmup_ratio",), "lr_warmup_ratio": ("lr_warmup_steps",)}
    """Options given on the command line that drop these others when they come from the config file (flags
    override the file: a preset's warmup ratio and --lr_warmup_steps do not conflict)."""
    lr_warmup_ratio: float | None = opt(
        None,
        "Warmup as a fraction of the run's optimizer steps (e.g. 0.03): ceil(ratio x steps) warmup steps, "
        "as transformers' warmup_ratio. Give it or --lr_warmup_steps, not both.",
    )
    train_batch_size: int = opt(1, "Batch size per process.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_train_steps: int | None = opt(None, "Optimizer steps; overrides num_train_epochs.")
    num_train_epochs: int = opt(1, "Epochs, when max_train_steps is not set.")
    mixed_precision: str | None = opt(
        None, "Mixed precision; None = accelerate's setting.", choices=("no", "fp16", "bf16")
    )
    allow_tf32: bool = opt(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    optimizer: str = opt(
        "adamw",
        "Inner optimizer of both branches (the auxiliary one ascends with it): torch's AdamW; bitsandbytes' "
        "8-bit AdamW (extra [bnb]); Prodigy (extra [prodigy]; set --learning_rate 1.0); Adafactor "
        "(transformers', lr as an absolute step); Lion (extra [lion]); torch's SGD. Case-insensitive.",
        choices=OPTIMIZERS,
    )
    use_8bit_adam: bool = opt(False, "Same as --optimizer adamw8bit (diffusers' flag).")
    adam_beta1: float | None = opt(
        None, "beta1 of AdamW, AdamW8bit, Prodigy and Lion; None = the optimizer's default (0.9)."
    )
    adam_beta2: float | None = opt(
        None,
        "beta2 of AdamW, AdamW8bit, Prodigy and Lion; None = the optimizer's default (0.999; Lion 0.99).",
    )
    adam_weight_decay: float = opt(
        1e-2, "Weight decay of the primary branch, with every optimizer (the auxiliary one: 0)."
    )
    adam_epsilon: float = opt(1e-8, "Epsilon of AdamW, AdamW8bit and Prodigy.")
    prodigy_d_coef: float = opt(1.0, "Prodigy: multiplier of its step-size estimate d.")
    prodigy_safeguard_warmup: bool = opt(
        True, "Prodigy: leave the lr out of the d estimate's denominator (diffusers' default: on)."
    )
    prodigy_use_bias_correction: bool = opt(
        True, "Prodigy: Adam's bias correction on its step (diffusers' default: on)."
    )
    prodigy_beta3: float | None = opt(
        None, "Prodigy: decay of the d estimate's running sums; None = sqrt(beta2)."
    )
    prodigy_decouple: bool = opt(True, "Prodigy: AdamW-style decoupled weight decay.")
    sgd_momentum: float = opt(0.0, "SGD momentum.")
    max_grad_norm: float = opt(
        1.0, "Gradient-norm clip, applied to the primary and auxiliary groups separately."
    )
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = opt(None, "Keep at most this many checkpoints (oldest deleted).")
    resume_from_checkpoint: str | None = opt(
        None, "'latest' or a checkpoint folder to continue from.", path=True
    )
    fsdp: bool = opt(
        False,
        "Shard the trained models over the processes with FSDP2 (fully_shard), e.g. under torchrun on CPUs; "
        "on by itself under an accelerate FSDP config (configs/accelerate_fsdp.yaml).",
    )
    fsdp_state_dict: str = opt(
        "full",
        "Optimizer state in checkpoints under FSDP: 'full' (whole tensors, one file: resumes on any number "
        "of processes) or 'sharded' (one file per process: resumes on the same number).",
        choices=("full", "sharded"),
    )
    report_to: str = opt("tensorboard", "Tracker for scalars and images ('tensorboard' or 'none').")
    logging_dir: str = opt("logs", "TensorBoard folder, relative to output_dir.")
    dataloader_num_workers: int = opt(0, "Worker processes that decode images while caching.")
    validation_steps: int = opt(100, "Validate (held-out loss, samples) every N optimizer steps.")
    max_nonfinite_steps: int = opt(5, "Stop after this many consecutive steps with a non-finite loss.")

    def bilora_config(self, target_modules: list[str] | None = None) -> BiLoRAConfig:
        """The core config of this run (its own ``target_modules`` unless others are given: the SDXL text
        encoders have theirs), with the auxiliary branch dropped when the method trains none."""
        values = {f.name: getattr(self, f.name) for f in fields(BiLoRAConfig)}
        values["alpha"] = float(self.rank) if self.alpha is None else self.alpha
        if target_modules is not None:
            values["target_modules"] = list(target_modules)
        return BiLoRAConfig(**values).for_method(self.method)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps`` optimizer steps: ``ceil(lr_warmup_ratio · total_steps)``
        with --lr_warmup_ratio (as transformers' ``warmup_ratio``), else --lr_warmup_steps."""
        if self.lr_warmup_ratio is None:
            return self.lr_warmup_steps
        return math.ceil(self.lr_warmup_ratio * total_steps - 1e-9)  # 0.03 x 100 is 3.0000000000000004

    def validate(self) -> None:
        check_choices(self)
        positive = ("learning_rate", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise OptionError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise OptionError(f"--{name} must be > 0, got {value!r}")
        if self.num_train_epochs <= 0:
            raise OptionError(f"--num_train_epochs must be > 0, got {self.num_train_epochs!r}")
        if self.lr_warmup_steps < 0 or self.max_grad_norm < 0 or self.dataloader_num_workers < 0:
            raise OptionError("--lr_warmup_steps, --max_grad_norm and --dataloader_num_workers must be >= 0")
        self.validate_optimizer()
        if self.lr_warmup_ratio is not None:
            if not 0.0 <= self.lr_warmup_ratio < 1.0:
                raise OptionError(f"--lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
            if self.lr_warmup_steps:
                raise OptionError(
                    f"--lr_warmup_ratio {self.lr_warmup_ratio:g} and --lr_warmup_steps {self.lr_warmup_steps} "
                    "both set the warmup: give one"
                )
        if self.validation_steps < 1:
            raise OptionError(f"--validation_steps must be >= 1, got {self.validation_steps}")
        if self.init in ("pissa", "olora"):
            raise OptionError(
                f"{option_flag(self, 'init')} {self.init} rewrites the base weights at attach time: the exported LoRA "
                "would not apply to the stock base model; use default, gaussian or orthogonal"
            )
        if self.max_nonfinite_steps < 1:
            raise OptionError("--max_nonfinite_steps must be >= 1")
        if self.method in ("lora-sam", "flat-lora") and self.mixed_precision == "fp16":
            raise OptionError(
                f"--method {self.method} runs its passes inside optimizer.step(closure), which torch's fp16 "
                "GradScaler refuses: use --mixed_precision bf16 or no"
            )
        if self.report_to not in ("tensorboard", "none", "all", "wandb"):
            raise OptionError(f"--report_to must be tensorboard, wandb, all or none, got {self.report_to!r}")
        try:
            self.bilora_config()
        except ConfigError as err:  # its message starts with the field's name: name the flag instead
            name, _, rest = str(err).partition(" ")
            raise OptionError(
                f"{option_flag(self, name)} {rest}" if name in self.__dataclass_fields__ else str(err)
            ) from None
        check_output_dir(self.output_dir)

    @property
    def optimizer_name(self) -> str:
        """The --optimizer this run uses (--use_8bit_adam is a spelling of adamw8bit)."""
        return "adamw8bit" if self.use_8bit_adam else self.optimizer

    def validate_optimizer(self) -> None:
        """--optimizer and its options; a missing package stops here, before any model loads."""
        name = self.optimizer_name
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise OptionError(
                f"--use_8bit_adam means --optimizer adamw8bit; it cannot go with --optimizer {self.optimizer}"
            )
        for flag in ("adam_beta1", "adam_beta2", "sgd_momentum", "prodigy_beta3"):
            value = getattr(self, flag)
            if value is not None and not 0.0 <= value < 1.0:
                raise OptionError(f"--{flag} must be in [0, 1), got {value}")
        if not self.adam_weight_decay >= 0.0:
            raise OptionError(f"--adam_weight_decay must be >= 0, got {self.adam_weight_decay}")
        if not self.adam_epsilon > 0.0:
            raise OptionError(f"--adam_epsilon must be > 0, got {self.adam_epsilon}")
        if not self.prodigy_d_coef > 0.0:
            raise OptionError(f"--prodigy_d_coef must be > 0, got {self.prodigy_d_coef}")
        if name == "prodigy":
            # Prodigy shares one step-size estimate between its param groups and refuses unequal lrs.
            for flag in ("aux_lr", "text_encoder_lr"):
                value = getattr(self, flag, None)
                if value is not None and value != self.learning_rate:
                    raise OptionError(
                        f"--{flag} {value:g}: --optimizer prodigy steps every branch and model with one "
                        f"learning rate (its d estimate is shared); leave --{flag} unset"
                    )
        if name in OPTIMIZER_PACKAGES:
            module, package, extra = OPTIMIZER_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                flag = "--use_8bit_adam" if self.use_8bit_adam else f"--optimizer {name}"
                raise OptionError(
                    f"{flag} needs {package}, which is not installed: pip install 'bilora-diffusion[{extra}]'"
                )


def check_output_dir(path: str) -> None:
    """The output folder must be creatable and writable (checked before any model loads)."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OptionError(f"--output_dir: {path} is not writable")
