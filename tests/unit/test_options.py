"""The option schema (issue 15): the trainers' options take every BiLoRAConfig field under its own name, the
diffusers/PEFT spellings are aliases, validate() holds every check, every preset loads, --lr_warmup_ratio
reaches the schedule, and resume compares every identity key."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from bilora_diffusion.checkpoint import CheckpointError, check_compatible
from bilora_diffusion.config import BiLoRAConfig
from bilora_diffusion.llm.evaluate import EvalOptions
from bilora_diffusion.llm.options import LLMOptions
from bilora_diffusion.options import OptionError, TrainOptions, format_help, parse_options
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.training import make_scheduler

ROOT = Path(__file__).resolve().parents[2]
CORE = [f.name for f in dataclasses.fields(BiLoRAConfig)]

# A value other than the default for every core field, as written on the command line / in YAML, and as read.
CHANGED = {
    "rank": ("6", 6),
    "alpha": ("3", 3.0),
    "aux_rank": ("2", 2),
    "aux_alpha": ("5", 5.0),
    "target_modules": (["to_k", "to_v"], ["to_k", "to_v"]),
    "dropout": ("0.1", 0.1),
    "init": ("gaussian", "gaussian"),
    "rho": ("0.2", 0.2),
    "clip": ("layer", "layer"),
    "aux_lr": ("0.003", 0.003),
    "aux_weight_decay": ("0.01", 0.01),
    "fused": ("false", False),
    "use_dora": ("true", True),
}


def sdxl(*argv: str, cls=SDXLOptions):
    return parse_options(cls, ["--dataset", ".", *argv])


def test_every_core_field_is_an_option_of_both_trainers_with_its_help():
    assert sorted(CHANGED) == sorted(CORE)  # this test names every field of the core
    core = {f.name: f for f in dataclasses.fields(BiLoRAConfig)}
    for cls in (TrainOptions, SDXLOptions, LLMOptions):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(CORE) <= set(fields), cls
        for name in ("rank", "aux_rank", "rho", "clip", "fused", "aux_weight_decay", "use_dora"):
            assert fields[name].metadata["help"] == core[name].metadata["help"], (cls, name)
    assert "--aux_weight_decay" in format_help(SDXLOptions) and "--fused" in format_help(LLMOptions)
    assert "--alpha (also --lora_alpha)" in format_help(SDXLOptions)


@pytest.mark.parametrize("name", CORE)
def test_every_core_field_is_settable_from_the_command_line_and_yaml(name, tmp_path):
    written, expected = CHANGED[name]
    argv = [f"--{name}", *(written if isinstance(written, list) else [written])]
    yaml_file = tmp_path / "run.yaml"
    yaml_value = "[" + ", ".join(written) + "]" if isinstance(written, list) else written
    yaml_file.write_text(f"dataset: .\n{name}: {yaml_value}\n")
    default = sdxl()
    for opts in (sdxl(*argv), parse_options(SDXLOptions, ["--config", str(yaml_file)])):
        config = opts.bilora_config()
        assert getattr(config, name) == expected != getattr(default.bilora_config(), name)
        # Only that field changed: the same as the default options with it replaced in code.
        assert config == dataclasses.replace(default, **{name: expected}).bilora_config()


def test_diffusers_and_peft_spellings_are_aliases(tmp_path):
    aliased = sdxl("--lora_alpha", "6", "--lora_dropout", "0.1", "--init_lora_weights", "gaussian")
    plain = sdxl("--alpha", "6", "--dropout", "0.1", "--init", "gaussian")
    assert aliased == plain and aliased.bilora_config() == plain.bilora_config()
    assert (aliased.alpha, aliased.dropout, aliased.init) == (6.0, 0.1, "gaussian")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("dataset: .\nlora_alpha: 6\nlora_dropout: 0.1\ninit_lora_weights: gaussian\n")
    assert parse_options(SDXLOptions, ["--config", str(yaml_file)]) == plain
    yaml_file.write_text("dataset: .\nlora_alpha: 6\nalpha: 7\n")
    with pytest.raises(OptionError, match="'lora_alpha' and 'alpha' are the same option"):
        parse_options(SDXLOptions, ["--config", str(yaml_file)])
    with pytest.raises(OptionError, match="--lora_alpha: expected float, got 'six'"):
        sdxl("--lora_alpha", "six")
    with pytest.raises(OptionError, match="did you mean 'lora_alpha'"):
        sdxl("--lora_alpah", "6")
    # The LLM trainer keeps the paper's alpha 16 as its default, under either spelling.
    llm = ["--dataset", "x.jsonl", "--model", "m"]
    assert parse_options(LLMOptions, llm).bilora_config().alpha == 16.0
    assert parse_options(LLMOptions, [*llm, "--lora_alpha", "32"]).bilora_config().alpha == 32.0
    # alpha left unset is the rank, as in diffusers' scripts.
    assert sdxl("--rank", "8").bilora_config().alpha == 8.0


@pytest.mark.parametrize(
    "cls,changes,flag",
    [
        (TrainOptions, {"method": "nope"}, "--method"),
        (TrainOptions, {"clip": "sideways"}, "--clip"),
        (TrainOptions, {"init": "zeros"}, "--init/--init_lora_weights"),
        (TrainOptions, {"lr_scheduler": "step"}, "--lr_scheduler"),
        (TrainOptions, {"optimizer": "adam"}, "--optimizer"),
        (TrainOptions, {"mixed_precision": "fp8"}, "--mixed_precision"),
        (TrainOptions, {"alpha": -1.0}, "--alpha/--lora_alpha must be > 0"),
        (TrainOptions, {"dropout": 1.5}, "--dropout/--lora_dropout must be in"),
        (TrainOptions, {"rank": 0}, "--rank must be a positive integer"),
        (TrainOptions, {"aux_weight_decay": -0.1}, "--aux_weight_decay must be >= 0"),
        (TrainOptions, {"method": "bilora", "aux_rank": 0}, "--method 'bilora' needs an auxiliary branch"),
        (SDXLOptions, {"dataset": ".", "export_format": "ckpt"}, "--export_format"),
        (SDXLOptions, {"dataset": ".", "save_dtype": "int8"}, "--save_dtype"),
        (LLMOptions, {"dataset": "x", "model": "m", "attn_implementation": "fast"}, "--attn_implementation"),
        (EvalOptions, {"data": "x", "model": "m", "dtype": "float8"}, "--dtype"),
    ],
)
def test_validate_checks_choices_and_core_ranges_of_options_built_in_code(cls, changes, flag, tmp_path):
    options = cls(output_dir=str(tmp_path / "out"), **changes) if cls is not EvalOptions else cls(**changes)
    with pytest.raises(OptionError) as err:
        options.validate()
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def preset_class(path: Path) -> type:
    first = path.read_text().splitlines()[0]
    if "train_llm.py" in first:
        return LLMOptions
    assert "train_sdxl.py" in first or "bilora-compare" in first, path
    return SDXLOptions


def test_every_preset_in_configs_parses_and_validates():
    # accelerate's launch configs (accelerate_*.yaml) are checked by test_sharding
    files = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("accelerate_"))
    assert len(files) >= 10
    for path in files:
        cls = preset_class(path)
        # What each preset's first line asks the user to add (the data; the LLM demo names its own).
        extra = ["--dataset", "."] if cls is SDXLOptions else []
        options = parse_options(cls, ["--config", str(path), *extra])
        options.validate()  # nothing is left to the parser: built again in code, it is still valid
        rebuilt = cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})
        rebuilt.validate()
        assert rebuilt.bilora_config() == options.bilora_config()


def test_the_llm_paper_presets_warm_up_three_percent():
    for name in ("llm_llama2_7b_math.yaml", "llm_llama31_8b_instruct.yaml"):
        options = parse_options(LLMOptions, ["--config", str(ROOT / "configs" / name), "--dataset", "x"])
        assert options.lr_warmup_ratio == 0.03 and options.lr_warmup_steps == 0
        assert options.warmup_steps(1000) == 30 and options.warmup_steps(100) == 3
        assert options.warmup_steps(10) == 1  # ceil: a short run still warms up


def lrs(options: TrainOptions, total: int, steps: list[int], lr: float = 0.1) -> list[float]:
    """The learning rate the trainer's schedule gives at each of ``steps`` (optimizer steps taken)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(options, optimizer, total)
    out = []
    for step in range(max(steps) + 1):
        if step in steps:
            out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_lr_warmup_ratio_sets_the_warmup_of_the_schedule():
    # linear, ratio 0.2 of 10 steps = 2 warmup steps: 0, lr/2, lr, then down to 0 at step 10.
    linear = TrainOptions(lr_scheduler="linear", lr_warmup_ratio=0.2)
    assert lrs(linear, 10, [0, 1, 2, 3, 6, 10]) == pytest.approx([0.0, 0.05, 0.1, 0.1 * 7 / 8, 0.05, 0.0])
    # cosine, ratio 0.25 of 8 steps = 2 warmup steps; halfway through the decay (step 5) the lr is half.
    cosine = TrainOptions(lr_scheduler="cosine", lr_warmup_ratio=0.25)
    half = 0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 6))
    assert lrs(cosine, 8, [1, 2, 5, 8]) == pytest.approx([0.05, 0.1, half, 0.0])
    # 0.03 x 100 is 3.0000000000000004 in floating point: still 3 warmup steps, not 4.
    constant = TrainOptions(lr_scheduler="constant_with_warmup", lr_warmup_ratio=0.03)
    assert lrs(constant, 100, [1, 2, 3, 50]) == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1])
    # The same schedule through --lr_warmup_steps 3; and without warmup the ratio changes nothing.
    steps = TrainOptions(lr_scheduler="constant_with_warmup", lr_warmup_steps=3)
    assert lrs(steps, 100, [1, 2, 3, 50]) == lrs(constant, 100, [1, 2, 3, 50])
    assert lrs(TrainOptions(lr_scheduler="linear"), 10, [0, 5]) == pytest.approx([0.1, 0.05])


def test_lr_warmup_ratio_and_steps_together_are_refused(tmp_path):
    with pytest.raises(
        OptionError, match="--lr_warmup_ratio 0.1 and --lr_warmup_steps 5 both set the warmup"
    ):
        sdxl("--lr_warmup_ratio", "0.1", "--lr_warmup_steps", "5", "--output_dir", str(tmp_path))
    # A preset's ratio is dropped from the command line to use steps instead.
    preset = ["--config", str(ROOT / "configs" / "llm_llama2_7b_math.yaml"), "--dataset", "x"]
    options = parse_options(LLMOptions, [*preset, "--lr_warmup_ratio", "none", "--lr_warmup_steps", "5"])
    assert options.warmup_steps(1000) == 5
    # ... or simply by a flag: flags override the file (the preset sets lr_warmup_ratio 0.03)
    options = parse_options(LLMOptions, [*preset, "--lr_warmup_steps", "5"])
    assert (options.lr_warmup_ratio, options.warmup_steps(1000)) == (None, 5)
    options = parse_options(LLMOptions, [*preset, "--lr_warmup_ratio", "0.1"])
    assert options.warmup_steps(1000) == 100


def test_check_compatible_compares_every_identity_key():
    saved = {
        "method": "bilora",
        "rank": 4,
        "resolution": 64,
        "target_modules": ["to_q"],
        "seed": 0,
        "step": 2,
    }
    check_compatible(saved, {**saved, "seed": 1}, "ckpt")  # a seed change only warns
    check_compatible(saved, {**saved, "max_length": 32}, "ckpt")  # a key an older checkpoint lacks
    check_compatible(saved, {**saved, "target_modules": ("to_q",)}, "ckpt")  # as JSON gives it back
    for key, value in (("resolution", 128), ("target_modules", ["to_k"]), ("method", "lora")):
        with pytest.raises(CheckpointError, match=f"it was made with {key}=.*this run has {key}="):
            check_compatible(saved, {**saved, key: value}, "ckpt")


def test_yaml_is_read_with_safe_load(tmp_path, image_folder):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"dataset: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(OptionError, match="not valid YAML"):
        parse_options(SDXLOptions, ["--config", str(cfg)])
    assert not marker.exists()
