"""What a new user meets in the first hour with their own model and data (issue 14): base models that are not
there fail in one line with exit 2, runs say what they train and where the files went, files get the umask's
modes, bilora-export never overwrites a training output, and the log carries no warning a user cannot act on."""

import hashlib
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from bilora_diffusion.data import DataError
from bilora_diffusion.hub import SDXL_BASE
from bilora_diffusion.options import format_help, parse_options
from bilora_diffusion.sdxl.export import main as export_main
from bilora_diffusion.sdxl.options import TOY_MODEL, SDXLOptions
from bilora_diffusion.testing import make_image_folder
from tests.unit.test_hub import not_sdxl_folder

ROOT = Path(__file__).resolve().parents[2]
# What a user's shell has: offline here, but no verbosity settings that would hide library warnings.
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
USER_ENV["HF_HUB_OFFLINE"] = "1"
PROMPT = "a large purple circle on a white background, center"


def run(cmd: list[str], umask: int | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=kw.pop("env", USER_ENV),
        timeout=600,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        **kw,
    )


# ------------------------------------------------------------------------------------------ base models


def test_any_argument_means_sdxl_base_and_the_demo_names_the_toy_model():
    opts = parse_options(SDXLOptions, ["--dataset", "."])
    assert opts.pretrained_model_name_or_path == SDXL_BASE == "stabilityai/stable-diffusion-xl-base-1.0"
    demo = parse_options(SDXLOptions, ["--config", str(ROOT / "configs" / "demo.yaml")])
    assert Path(demo.pretrained_model_name_or_path).resolve() == Path(TOY_MODEL).resolve()
    assert "pretrained_model_name_or_path" in yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def test_train_sdxl_missing_base_model_exits_2_in_one_line(tmp_path):
    """`train_sdxl.py --dataset DIR` without --pretrained_model_name_or_path means SDXL base (never the toy model
    silently); offline and not cached, that is one line and exit 2, before any model loads."""
    data = ROOT / "bilora_diffusion" / "toy" / "demo_data"
    for model, why in (
        (None, f"--pretrained_model_name_or_path {SDXL_BASE}: not in the local Hugging Face cache"),
        (str(tmp_path / "no-such-model"), "no-such-model: no such folder"),
        (str(not_sdxl_folder(tmp_path / "sd15")), "not an SDXL model"),
    ):
        extra = ["--pretrained_model_name_or_path", model] if model else []
        proc = run([sys.executable, str(ROOT / "train_sdxl.py"), "--dataset", str(data), "--resolution", "32", *extra,
                    "--output_dir", str(tmp_path / "out")])  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and why in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_generate_and_export_fuse_refuse_a_missing_base_in_one_line(tmp_path, capsys):
    from bilora_diffusion.sdxl.generate import main as generate_main

    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--pretrained_model_name_or_path", str(tmp_path / "gone"), "--prompt", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("bilora-generate: error: --pretrained_model_name_or_path") and "no such folder" in err
    )
    assert "\n" not in err


# ------------------------------------------------------------------- a demo-like run through the CLI


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """configs/demo.yaml, shortened, as a user runs it (python train_sdxl.py, umask 022, library warnings on),
    with a checkpoint and a disk cache."""
    root = tmp_path_factory.mktemp("first-hour")
    out, cache = root / "demo", root / "cache"
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
           "--output_dir", str(out), "--cache_dir", str(cache), "--max_train_steps", "2",
           "--checkpointing_steps", "1", "--validation_prompt", PROMPT, "--num_validation_images", "1",
           "--validation_inference_steps", "2"]  # fmt: skip
    proc = run(cmd, umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc.stderr


@pytest.mark.slow
def test_run_logs_what_it_trains_and_the_files_it_wrote(demo_run):
    out, _, log = demo_run
    start = log[log.index("run:") :]
    for line in (
        f"base model  {(ROOT / 'bilora_diffusion' / 'toy' / 'sdxl-tiny').resolve()}",
        "(kohya folder): 24 images",
        "resolution  32x32, center crop",
        "method      bilora: rank 4, alpha 8, aux rank 4, aux alpha 8, rho 0.05, clip global",
        "lr 0.002",
        "steps       2 (",
        f"output      {out.resolve()}",
    ):
        assert line in start, line
    done = log[log.index("done: 2 steps; wrote") :]
    for what, name in (
        ("LoRA (diffusers)", "pytorch_lora_weights.safetensors"),
        ("LoRA (kohya)", "bilora_sdxl.safetensors"),
        ("before/after", "samples/before_after.png"),
        ("checkpoint", "checkpoint-1"),
    ):
        assert re.search(rf"{re.escape(what)} +{re.escape(str(out.resolve() / name))}\n", done + "\n"), what
        assert (out / name).exists(), name


@pytest.mark.slow
def test_log_has_no_warning_a_user_cannot_act_on(demo_run):
    _, _, log = demo_run
    assert "should be kept in float32" not in log
    assert "were not passed to `accelerate launch`" not in log
    assert len(re.findall(r"latent cache.*: \d+ hits, \d+ encoded", log)) == 1, log
    assert "0 hits, 0 encoded" not in log
    warning_lines = [line for line in log.splitlines() if re.search(r"\w+Warning\b", line)]
    assert not warning_lines, warning_lines
    assert not [line for line in log.splitlines() if line.startswith("WARNING")], log


@pytest.mark.slow
def test_every_written_file_has_the_umask_modes(demo_run):
    out, cache, _ = demo_run
    paths = [p for root in (out, cache) for p in root.rglob("*")]
    assert any(p.name == "bilora_sdxl.safetensors" for p in paths)
    assert any(p.parent.name == "checkpoint-1" for p in paths)
    assert any(p.suffix == ".safetensors" and cache in p.parents for p in paths), "no cache entry written"
    for path in [out, cache, *paths]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_export_never_overwrites_a_training_output(demo_run, tmp_path, capsys):
    out, _, _ = demo_run
    trained = {p.name: _digest(p) for p in out.glob("*.safetensors")}
    old = os.umask(0o022)
    try:
        assert export_main(["--input", str(out), "--save_dtype", "fp16"]) == 0
        captured = capsys.readouterr()
        target = out / "export-fp16"
        assert captured.out.split() == [str(target / "pytorch_lora_weights.safetensors"),
                                        str(target / "bilora_sdxl.safetensors")]  # fmt: skip
        assert f"wrote 2 file(s) to {target}" in captured.err
        for path in [target, *target.iterdir()]:
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
        # Again: the files exist now, so the same command refuses; --overwrite replaces them.
        for argv in (
            ["--input", str(out), "--save_dtype", "fp16"],
            ["--input", str(out), "--output", str(out)],
        ):
            with pytest.raises(SystemExit) as exit_info:
                export_main(argv)
            err = capsys.readouterr().err.strip()
            assert exit_info.value.code == 2 and "\n" not in err, err
            assert "exists" in err and "--overwrite" in err and "--output" in err, err
        assert export_main(["--input", str(out), "--save_dtype", "fp16", "--overwrite"]) == 0
        assert {
            p.name: _digest(p) for p in out.glob("*.safetensors")
        } == trained  # fp32 training files intact
        # A checkpoint exports next to the checkpoints, not inside one (rotation deletes checkpoint folders).
        assert export_main(["--input", str(out / "checkpoint-1"), "--format", "kohya"]) == 0
        assert (out / "export-checkpoint-1-fp32" / "bilora_sdxl.safetensors").is_file()
    finally:
        os.umask(old)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--input", str(out), "--output", str(tmp_path / "x"), "--fuse",
                     "--pretrained_model_name_or_path", str(tmp_path / "gone")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith(
        "bilora-export: error: --pretrained_model_name_or_path"
    )
    assert "no such folder" in err and "\n" not in err


@pytest.mark.slow
def test_fused_export_has_umask_modes_and_no_warnings(demo_run, tmp_path):
    out, _, _ = demo_run
    proc = run([sys.executable, str(ROOT / "pipelines" / "export_lora.py"), "--input", str(out), "--output",
                str(tmp_path / "fused-export"), "--fuse", "--format", "diffusers"], umask=0o022)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "should be kept in float32" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[
        -3000:
    ]
    fused = tmp_path / "fused-export" / "fused"
    assert (fused / "model_index.json").is_file()
    for path in [fused, *fused.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_loading_a_pipeline_raises_no_deprecation_warning():
    from bilora_diffusion.sdxl.generate import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(TOY_MODEL, __import__("torch").float32, "cpu")
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [str(w.message) for w in deprecations if "dtype" in str(w.message)]


# ------------------------------------------------------------------------------------ smaller things


def test_too_small_images_name_the_options_that_change_it(tmp_path):
    from bilora_diffusion.sdxl.train import SDXLTrainer

    data = make_image_folder(tmp_path / "data", n=2, size=(40, 40))
    argv = ["--pretrained_model_name_or_path", TOY_MODEL, "--dataset", str(data), "--resolution", "128",
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--on_bad_image", "error"]  # fmt: skip
    trainer = SDXLTrainer(parse_options(SDXLOptions, argv))
    with pytest.raises(DataError) as err:
        trainer.setup_data()
    message = str(err.value)
    assert "too small: 40x40" in message and "--resolution 128" in message and "--max_upscale" in message
    bucketed = SDXLTrainer(parse_options(SDXLOptions, [*argv, "--bucketing"]))
    with pytest.raises(DataError, match="--resolution 128 with --max_upscale 2.*lower --resolution or raise"):
        bucketed.setup_data()


def test_help_has_a_usage_line_and_names_the_demo():
    text = format_help(SDXLOptions)
    assert text.splitlines()[0].startswith("usage: python train_sdxl.py")
    assert "With no arguments, train_sdxl.py runs the embedded demo (configs/demo.yaml)" in " ".join(
        text.split()
    )
    assert "--pretrained_model_name_or_path" in text


def test_readme_checkpoint_example_is_what_the_demo_leaves():
    """The demo checkpoints every checkpointing_steps before its last step and keeps checkpoints_total_limit of
    them (the last step writes the outputs, not a checkpoint): the README's example names that folder."""
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    steps, every, keep = demo["max_train_steps"], demo["checkpointing_steps"], demo["checkpoints_total_limit"]
    left = [s for s in range(every, steps, every)][-keep:]
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(rf"{re.escape(demo['output_dir'])}/checkpoint-(\d+)", readme))
    assert named and named <= {str(s) for s in left}, (named, left)
    assert "output/my_run/checkpoint-300" not in readme


@pytest.mark.slow
def test_one_line_error_under_accelerate_launch(tmp_path):
    """What the README says about launchers: under `accelerate launch` our one line is printed as it is, then
    accelerate ends with status 1 for any failed child (its convention) after a CalledProcessError traceback;
    `accelerate launch -q` leaves just our line, last; `python train_sdxl.py` exits 2 (tested above)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    data = str(ROOT / "bilora_diffusion" / "toy" / "demo_data")
    script = str(ROOT / "train_sdxl.py")
    proc = run([*launch, script, "--dataset", data, "--rnak", "4"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = "error: unknown option 'rnak' on the command line (did you mean 'rank'?)"
    assert line in proc.stderr.splitlines() and "returned non-zero exit status 2" in proc.stderr
    missing = tmp_path / "no-such-model"
    proc = run([*launch[:4], "-q", *launch[4:], script, "--dataset", data, "--resolution", "32",
                "--pretrained_model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: --pretrained_model_name_or_path {missing}: no such folder", proc.stderr[-2000:]


def test_a_resolution_far_from_the_base_model_is_warned_about(tmp_path, caplog):
    """The issue's silent case: a 32-px model trained at 1024 px runs at 33 s/step without a word."""
    import logging

    from bilora_diffusion.sdxl.train import SDXLTrainer

    argv = ["--pretrained_model_name_or_path", TOY_MODEL, "--dataset", ".", "--output_dir", str(tmp_path),
            "--report_to", "none"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="bilora_diffusion.sdxl.train"):
        SDXLTrainer(parse_options(SDXLOptions, [*argv, "--resolution", "32"])).setup_models()
        assert not caplog.records
        SDXLTrainer(parse_options(SDXLOptions, [*argv, "--resolution", "1024"])).setup_models()
    assert "--resolution 1024: the base model makes 32 px images" in caplog.text
