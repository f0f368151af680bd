"""Faults injected into real runs (issue 6): kills, NaN losses, bad files, bad options, full disks, pickles."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_diffusion.checkpoint import CheckpointError, list_checkpoints
from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.sdxl.train import SDXLTrainer, train
from bilora_diffusion.testing import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def argv(model_dir, data, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
        "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
        "--save_dtype", "fp32", "--max_train_steps", "5", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", *extra,
    ]  # fmt: skip


def adapters(out) -> dict:
    return load_file(str(Path(out) / "bilora_adapters.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tiny_sdxl_dir, tmp_path_factory):
    """An uninterrupted run: what every interrupted-and-resumed run must end at, bitwise."""
    root = tmp_path_factory.mktemp("ref")
    data = make_image_folder(root / "data")
    train(parse_options(SDXLOptions, argv(tiny_sdxl_dir, data, root / "out")))
    return data, adapters(root / "out")


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", [("step", 3), ("checkpoint", 4)])
def test_kill_9_then_resume_latest_equals_uninterrupted_run(tiny_sdxl_dir, reference, tmp_path, kind, n):
    data, expected = reference
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "e2e" / "fault_run.py"),
        kind,
        str(n),
        *argv(tiny_sdxl_dir, data, out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    complete = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    # Killed after step 3 (before its checkpoint): latest is checkpoint-2. Killed mid-write of checkpoint-4:
    # the half folder is hidden and "latest" is still checkpoint-3,
    # and rotation (limit 2) never removed a good one for it.
    assert complete == ([1, 2] if kind == "step" else [2, 3])
    if kind == "checkpoint":
        assert list(out.glob(".checkpoint-4.*.tmp")) and not (out / "checkpoint-4").exists()
    train(parse_options(SDXLOptions, [*argv(tiny_sdxl_dir, data, out), "--resume_from_checkpoint", "latest"]))
    assert_same(adapters(out), expected)
    assert not list(out.glob(".checkpoint-*.tmp"))  # the next save cleaned up the half-written one


@pytest.mark.slow
def test_same_seed_gives_bitwise_identical_adapters(tiny_sdxl_dir, reference, tmp_path):
    data, expected = reference
    train(parse_options(SDXLOptions, argv(tiny_sdxl_dir, data, tmp_path / "again")))
    assert_same(adapters(tmp_path / "again"), expected)


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_naming_files_then_stops(
    tiny_sdxl_dir, image_folder, tmp_path, caplog, monkeypatch
):
    real_loss = SDXLTrainer.loss

    def poisoned(self, mb):
        loss = real_loss(self, mb)
        if any("img_003" in k for k in mb.keys):
            return loss * float("nan")
        return loss

    monkeypatch.setattr(SDXLTrainer, "loss", poisoned)
    with caplog.at_level(logging.WARNING):
        result = train(parse_options(SDXLOptions, argv(tiny_sdxl_dir, image_folder, tmp_path / "a")))
    assert result.skipped_steps >= 1 and result.global_step == 5
    assert any("img_003" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(v).all() for v in adapters(tmp_path / "a").values())

    monkeypatch.setattr(SDXLTrainer, "loss", lambda self, mb: real_loss(self, mb) * float("nan"))
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="3 consecutive steps with a non-finite loss"):
        train(
            parse_options(
                SDXLOptions, [*argv(tiny_sdxl_dir, image_folder, out), "--max_nonfinite_steps", "3"]
            )
        )


def _bad_folder(root: Path) -> Path:
    data = make_image_folder(root)
    (data / "zero.png").write_bytes(b"")
    (data / "zero.txt").write_text("a zero byte file")
    (data / "notes.png").write_text("this is not an image")
    (data / "notes.txt").write_text("a fake image")
    return data


@pytest.mark.slow
def test_bad_files_are_skipped_with_a_count_or_stop_the_run_before_models_load(
    tiny_sdxl_dir, tmp_path, caplog
):
    data = _bad_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        trainer = SDXLTrainer(parse_options(SDXLOptions, argv(tiny_sdxl_dir, data, tmp_path / "out")))
        trainer.setup_data()
    assert len(trainer.records) == 8
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "zero.png" in text and "notes.png" in text
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_sdxl.py"), *argv(tiny_sdxl_dir, data, tmp_path / "o2"), "--on_bad_image", "error"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "zero.png" in proc.stderr
    assert "Loading" not in proc.stderr  # stopped before any model loaded


@pytest.mark.slow
def test_a_file_that_goes_bad_after_the_scan_is_skipped(tiny_sdxl_dir, image_folder, tmp_path, caplog):
    trainer = SDXLTrainer(parse_options(SDXLOptions, argv(tiny_sdxl_dir, image_folder, tmp_path / "out")))
    trainer.setup_data()
    (image_folder / "img_002.png").write_bytes(b"\x89PNG broken")  # corrupted after the scan, before caching
    trainer.setup_models()
    with caplog.at_level(logging.WARNING):
        trainer.setup_caches()
    assert len(trainer.records) == 7 and not any("img_002" in r.key for r in trainer.records)
    assert any("img_002" in r.getMessage() for r in caplog.records)
    trainer.setup_training()
    assert trainer.train().global_step == 5


def test_bad_options_exit_2_before_loading(tiny_sdxl_dir, image_folder, tmp_path):
    def run(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "train_sdxl.py"), *args], capture_output=True, text=True,
                              env=ENV, timeout=300)  # fmt: skip
        return proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, line = run("--dataset", str(image_folder), "--output_dir", str(blocker / "out"))
    assert code == 2 and "--output_dir" in line and "not writable" in line
    code, line = run("--dataset", str(image_folder), "--train_batch_size", "2.5")
    assert code == 2 and "--train_batch_size" in line
    code, line = run("--dataset", str(image_folder), "--method", "sam")
    assert code == 2 and "--method" in line and "bilora" in line


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_method_or_rank_is_refused(tiny_sdxl_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    train(parse_options(SDXLOptions, [*argv(tiny_sdxl_dir, image_folder, out), "--max_train_steps", "2"]))
    for flag, value, word in (("--method", "lora", "method"), ("--rank", "8", "rank")):
        args = [*argv(tiny_sdxl_dir, image_folder, out), "--resume_from_checkpoint", "latest", flag, value]
        proc = subprocess.run([sys.executable, str(ROOT / "train_sdxl.py"), *args], capture_output=True, text=True,
                              env=ENV, timeout=300)  # fmt: skip
        assert proc.returncode == 2 and word in proc.stderr.splitlines()[-1], proc.stderr[-500:]
        assert "Loading" not in proc.stderr


@pytest.mark.slow
def test_resuming_a_checkpoint_of_other_data_geometry_or_adapters_is_refused(
    tiny_sdxl_dir, image_folder, tmp_path
):
    """Every field trainer_state.json saves is compared on resume; a mismatch is one line naming it."""
    out = tmp_path / "out"
    train(parse_options(SDXLOptions, [*argv(tiny_sdxl_dir, image_folder, out), "--max_train_steps", "2"]))
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["dataset"] == str(image_folder) and state["resolution"] == 64 and state["bucketing"] is False
    other_data = make_image_folder(tmp_path / "other", n=4, seed=1)
    changes = [
        (["--dataset", str(other_data)], "dataset"),
        (["--resolution", "32"], "resolution"),
        (["--bucketing"], "bucketing"),
        (["--validation_split", "0.25"], "validation_split"),
        (["--lora_alpha", "8"], "alpha"),
        (["--aux_rank", "2"], "aux_rank"),
        (["--target_modules", "to_q", "to_v"], "target_modules"),
        (["--train_text_encoder"], "train_text_encoder"),
        (["--use_dora"], "use_dora"),
        (["--optimizer", "sgd"], "optimizer"),
    ]
    for extra, key in changes:
        args = [*argv(tiny_sdxl_dir, image_folder, out), "--resume_from_checkpoint", "latest", *extra]
        with pytest.raises(OptionError, match=f"it was made with {key}=.*this run has {key}=") as err:
            train(parse_options(SDXLOptions, args))
        assert "\n" not in str(err.value), key
    # The same options resume: the run goes on to its last step.
    args = [
        *argv(tiny_sdxl_dir, image_folder, out),
        "--resume_from_checkpoint",
        "latest",
        "--max_train_steps",
        "2",
    ]
    assert train(parse_options(SDXLOptions, args)).global_step == 2


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(tiny_sdxl_dir, image_folder, tmp_path, monkeypatch, caplog):
    import bilora_diffusion.state as state

    real = state.save_file
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if ".checkpoint-3." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(state, "save_file", failing)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        train(parse_options(SDXLOptions, [*argv(tiny_sdxl_dir, image_folder, out), "--max_train_steps", "4"]))
    # checkpoint-3 failed: 1 and 2 are still there (limit 2), nothing was rotated away for the failed write.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert any(
        "No space left" in r.getMessage() and "previous checkpoint is kept" in r.getMessage()
        for r in caplog.records
    )
    assert not list(out.glob(".checkpoint-*.tmp"))
    # The free-space check refuses before writing anything.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    from bilora_diffusion.checkpoint import check_free_space

    with pytest.raises(CheckpointError, match="not enough free disk space"):
        check_free_space(out, 10)


@pytest.mark.slow
def test_pickled_checkpoint_is_refused_and_never_run(tiny_sdxl_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    train(parse_options(SDXLOptions, [*argv(tiny_sdxl_dir, image_folder, out), "--max_train_steps", "2"]))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = list_checkpoints(out)[-1]
    torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_sdxl.py"), *argv(tiny_sdxl_dir, image_folder, out), "--resume_from_checkpoint", str(ckpt)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "optimizer.pt" in proc.stderr and "refused" in proc.stderr
    assert not marker.exists()
