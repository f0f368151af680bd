"""Optimizer state written by the core before its redesign (commit 431cc6a, `scripts/make_v0_checkpoint.py`)
resumes with today's core, in either update, and continues like the uninterrupted run of the old code."""

import importlib.util
from pathlib import Path

import pytest
import torch

from bilora_diffusion import attach_bilora, build_optimizer

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "optimizer_state_v0.pt"


def writer():
    """The script that wrote the fixture: its models, configs and batches are the ones to resume with."""
    spec = importlib.util.spec_from_file_location(
        "make_v0_checkpoint", ROOT / "scripts" / "make_v0_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["bilora-flat", "bilora-pertensor", "lora-flat", "dual-descent-flat"])
@pytest.mark.parametrize("flat", [True, False])
def test_a_checkpoint_of_the_previous_core_resumes(case, flat):
    script = writer()
    saved = torch.load(FIXTURE, weights_only=True)[case]
    method, _ = script.CASES[case]
    config = script.config_for(method)
    model = attach_bilora(script.deep_mlp(), config)
    model.load_state_dict(saved["model"])
    opt = build_optimizer(
        model, config, method=method, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, flat=flat
    )
    opt.load_state_dict(saved["optimizer"])
    assert opt.step_count == 2
    script.run(model, opt, script.batches(1, 2))
    state = model.state_dict()
    for name, want in saved["final"].items():
        torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-7, msg=name)
