"""train_llm.py under torchrun (two CPU processes) against one process with the same global batch."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_diffusion.llm.options import LLMOptions
from bilora_diffusion.llm.train import train
from bilora_diffusion.options import parse_options
from bilora_diffusion.testing import torchrun
from tests.unit.llm.test_train import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(llm_dir, tmp_path):
    """train_llm.py under torchrun (2 CPU processes over gloo), batch 1 each == 1 process, batch 1 x 2
    accumulation: each rank takes its own batches of the same (seed, epoch) order, gradients are averaged,
    the held-out loss is reduced across ranks."""
    rows = [{"prompt": f"what is {a} plus {a} ?", "response": f"{2 * a}"} for a in range(5)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = [
        "--model",
        str(llm_dir),
        "--dataset",
        str(data),
        "--eval_dataset",
        str(data),
        "--max_train_steps",
        "4",
    ]
    common += [
        "--train_batch_size",
        "1",
        "--learning_rate",
        "5e-3",
        "--report_to",
        "none",
        "--validation_steps",
        "2",
    ]
    proc = torchrun(ROOT / "train_llm.py", *common, "--output_dir", str(tmp_path / "mp"), port=29547)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(
        parse_options(
            LLMOptions, [*common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one")]
        )
    )
    assert single.global_step == 4
    a = load_file(str(tmp_path / "mp" / "bilora_adapters.safetensors"))
    b = load_file(str(tmp_path / "one" / "bilora_adapters.safetensors"))
    assert a.keys() == b.keys() and any("bilora_aux" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
