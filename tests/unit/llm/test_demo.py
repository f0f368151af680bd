"""The offline LLM demo (`python train_llm.py` with no arguments), the order and form of the LLM tools' input
errors (data before model, one line, exit 2, no Hub retries), and the evaluator's separate marker lists."""

import json
from pathlib import Path

import pytest

from bilora_diffusion.llm import main as train_main
from bilora_diffusion.llm.evaluate import main as evaluate_main
from bilora_diffusion.llm.evaluate import reference_answer, score
from bilora_diffusion.llm.options import LLMOptions
from bilora_diffusion.options import parse_options

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "bilora_diffusion" / "llm" / "demo"

MODEL = DEMO / "tiny-sums"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / f"{name}.jsonl").read_text().splitlines()]


def test_demo_model_and_data_are_small_and_held_out():
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size < 5_000_000, size
    assert (MODEL / "model.safetensors").is_file() and (MODEL / "tokenizer.json").is_file()
    train, test = rows("train"), rows("test")
    assert len(train) >= 32 and len(test) >= 20
    pairs = lambda rs: {tuple(r["answer"].split()[0:3:2]) for r in rs}  # noqa: E731 ("a minus b ...")
    assert not pairs(train) & pairs(test), "held-out problems must use number pairs no training problem uses"
    assert all("####" in r["answer"] for r in train + test)


def test_demo_config_is_what_no_arguments_runs():
    first = (ROOT / "configs" / "llm_demo.yaml").read_text().splitlines()[0]
    assert "train_llm.py" in first and "no arguments" in first
    opts = parse_options(LLMOptions, ["--config", str(ROOT / "configs" / "llm_demo.yaml")])
    assert Path(opts.model) == MODEL and Path(opts.dataset) == DEMO / "train.jsonl"
    assert Path(opts.eval_dataset) == DEMO / "test.jsonl" and opts.eval_accuracy
    assert "llm_demo.yaml" in (ROOT / "train_llm.py").read_text()


def test_package_data_carries_the_demo():
    """A non-editable install must carry the model, the tokenizer and the task data."""
    import fnmatch

    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data.get("*", []) + data.get("bilora_diffusion.llm", [])
    base = ROOT / "bilora_diffusion" / "llm"
    for path in DEMO.rglob("*"):
        if path.is_file():
            relative = path.relative_to(base).as_posix()
            assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


@pytest.mark.parametrize(
    "argv,expected",
    [
        # data first: both missing names the data
        (["--model", "./no-such-dir", "--dataset", "missing.jsonl"], "--dataset missing.jsonl: no such file"),
        (["--model", "./m", "--dataset", "./data-folder"], "--dataset ./data-folder: no such file or folder"),
        (
            ["--model", "./m", "--dataset", "DEMO_TRAIN", "--eval_dataset", "gone.jsonl"],
            "--eval_dataset gone.jsonl: no such file",
        ),
        (
            ["--model", "nobody/no-such-model", "--dataset", "DEMO_TRAIN"],
            "not in the local Hugging Face cache, and the Hub is unreachable",
        ),
        (
            ["--model", "MODEL", "--dataset", "nobody/no-such-data"],
            "--dataset nobody/no-such-data: not in the local Hugging Face cache, and the Hub is unreachable",
        ),
        (["--model", "DEMO_TRAIN", "--dataset", "DEMO_TRAIN"], "expected a model folder or a Hub id"),
        (["--model", "MODEL", "--dataset", "DEMO_TRAIN", "--tokenizer", "./no-tok"], "--tokenizer ./no-tok"),
    ],
)
def test_input_errors_in_order_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    names = {"DEMO_TRAIN": str(DEMO / "train.jsonl"), "MODEL": str(MODEL)}
    argv = [names.get(a, a) for a in argv] + ["--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and expected in err[-1], err
    assert not (tmp_path / "o").exists()


def test_evaluator_checks_data_before_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--model", "./no-such-dir", "--data", str(tmp_path / "missing.jsonl")])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--model", "./no-such-dir", "--data", str(DEMO / "test.jsonl")])
    assert exc.value.code == 2 and "--model ./no-such-dir: no such folder" in capsys.readouterr().err


def test_prediction_markers_leave_the_reference_markers_alone():
    """--markers "the answer is" reads predictions; the GSM8K references keep "####"."""
    result = score(
        ["so the answer is 2", "the answer is 5"], ["1 plus 1 #### 2", "#### 4"], ["the answer is"]
    )
    assert [r["correct"] for r in result.records] == [True, False] and result.unparsed == 0
    # and the prediction markers do not read references: a "the answer is" reference is not found by "####"
    with pytest.raises(Exception, match="--reference_markers"):
        score(["#### 3"], ["the answer is 3"], ["####"], ["####"])
    custom = score(["#### 7"], ["Answer: 7"], reference_markers=["Answer:"])
    assert custom.correct == 1
    assert reference_answer(" 12 ") == 12  # a bare number needs no marker


def test_evaluator_command_with_other_prediction_markers(tmp_path):
    """The command from the issue: --markers "the answer is" on GSM8K-style references no longer fails with
    "no reference number in '#### 2'"; --reference_markers reads other reference formats."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "tom has 3 apples", "answer": "3 minus 1 is 2 #### 2"}) + "\n")
    summary = evaluate_main(
        ["--model", str(MODEL), "--data", str(data), "--markers", "the answer is", "--max_new_tokens", "4"]
    )
    assert summary["total"] == 1
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"question": "tom has 3 apples", "answer": "Answer: 2"}) + "\n")
    summary = evaluate_main(
        [
            "--model",
            str(MODEL),
            "--data",
            str(other),
            "--reference_markers",
            "Answer:",
            "--max_new_tokens",
            "4",
        ]
    )
    assert summary["total"] == 1
