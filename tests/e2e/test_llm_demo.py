"""The offline LLM demo and the README's LLM commands as a user runs them: the no-argument demo raises held-out
accuracy, and the commands fail in one line, also under accelerate launch."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bilora_diffusion.llm.evaluate import main as evaluate_main
from tests.unit.llm.test_demo import DEMO

ROOT = Path(__file__).resolve().parents[2]


def offline_env(tmp_path: Path) -> dict:
    """No Hub, an empty Hugging Face cache, the repository importable from any folder."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("HF_HUB_CACHE", None)
    return env


def run(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# -- the shipped demo ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_offline_and_raises_held_out_accuracy(tmp_path, monkeypatch):
    """`python train_llm.py` with no arguments, from another folder, offline: it trains, then logs the
    held-out accuracy without and with the LoRA; the evaluator command agrees with the trainer's 'after'."""
    env = offline_env(tmp_path)
    start = time.time()
    done = run([str(ROOT / "train_llm.py")], tmp_path, env)
    took = time.time() - start
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "llm_demo"
    accuracy = json.loads((out / "accuracy.json").read_text())
    before, after = accuracy["before"]["accuracy"], accuracy["after"]["accuracy"]
    assert after > before and after >= 0.6, accuracy
    assert "held-out accuracy" in done.stderr and "without the LoRA" in done.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert took < 240, took  # about a minute on an idle 2-core CPU; generous for a busy CI machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = evaluate_main(
        [
            "--adapter",
            str(out),
            "--data",
            str(DEMO / "test.jsonl"),
            "--max_new_tokens",
            "16",
            "--merge",
            "false",
        ]
    )
    assert summary["total"] == accuracy["after"]["total"]
    assert abs(summary["accuracy"] - after) <= 0.05, (summary, accuracy)


# -- input errors: data before model, one line, exit 2 -------------------------------------------------------
def one_line_exit_2(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith("error: "), lines
    return lines[-1]


def test_readme_command_without_data_fails_on_the_data_at_once(tmp_path):
    """The README's command on a machine with neither the data nor the model: the missing data file is named
    first, with no Hub retries (the model is a Hub id that is not cached)."""
    start = time.time()
    done = run(
        [str(ROOT / "train_llm.py"), "--model", "meta-llama/Llama-3.1-8B", "--dataset", "data/train.jsonl"],
        tmp_path,
        {**offline_env(tmp_path), "HF_HUB_OFFLINE": "0"},
    )
    line = one_line_exit_2(done)
    assert "--dataset data/train.jsonl: no such file or folder" in line, line
    assert time.time() - start < 60


def test_readme_command_under_accelerate_launch_keeps_the_line(tmp_path):
    """`accelerate launch -q` (README, *Launchers*): our line comes last, no traceback; accelerate's own
    convention makes the status 1 for any failed child."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1"]
    done = subprocess.run(
        [
            *launch,
            str(ROOT / "train_llm.py"),
            "--model",
            "meta-llama/Llama-3.1-8B",
            "--dataset",
            "data/train.jsonl",
        ],
        cwd=tmp_path,
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "error: --dataset data/train.jsonl: no such file or folder", done.stderr[-3000:]


def test_missing_model_folder_is_no_such_folder(tmp_path):
    done = run(
        [str(ROOT / "train_llm.py"), "--model", "./no-such-dir", "--dataset", str(DEMO / "train.jsonl")],
        tmp_path,
        offline_env(tmp_path),
    )
    line = one_line_exit_2(done)
    assert "--model ./no-such-dir: no such folder" in line and "Repo id" not in line, line
    assert not (tmp_path / "bilora-output").exists()


# -- the evaluator's markers ------------------------------------------------------------------------------------
