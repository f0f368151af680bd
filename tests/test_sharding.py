"""Sharded training (FSDP2, `bilora_diffusion.sharding`): two CPU processes (gloo) against one process."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bilora_diffusion import BiLoRAConfig, attach_bilora, build_optimizer
from bilora_diffusion.config import METHODS
from bilora_diffusion.optim.state_layout import to_tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fsdp_core import Toy, randomize  # noqa: E402


def torchrun(script: str, *args: str, port: int, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(ROOT / "tests" / script),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_sharded_step_equals_one_process_for_every_method(tmp_path):
    """Every method, float64, on a layout where the shards are uneven and rank 1 holds no rows of the head's
    B: the parameters, gradient norms, loss and aux norm after each step equal one process's on the whole
    batch; the clip holds globally (every rank computes the same c <= rho); the gathered optimizer state is
    the one-process state, and a fresh sharded optimizer that loads it takes the one-process next step."""
    proc = torchrun("fsdp_core.py", str(tmp_path), *METHODS, port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads((tmp_path / "fsdp_core.json").read_text())
    assert set(reports) == set(METHODS)
    for method, ranks in reports.items():
        assert ranks[1]["local_numels"]["block.head.lora_B.default.weight"] == 0  # an empty shard
        for r in ranks:
            assert r["params"] < 1e-12, method
            assert r["grad_norms"] < 1e-12 and r["losses"] < 1e-12, method
            assert r["state"] < 1e-12 and r["state_entries"][0] == r["state_entries"][1], method
            assert r["resumed_params"] < 1e-12, method
            for sharded, reference in r["aux_norm"]:
                assert sharded == pytest.approx(reference, abs=1e-12)
                assert sharded <= 0.05 + 1e-12
        if method in ("bilora", "dual-descent"):
            assert ranks[0]["aux_norm"][-1][0] == pytest.approx(0.05)  # the clip engaged
            assert ranks[0]["aux_norm"] == ranks[1]["aux_norm"]


def test_resumed_state_keeps_the_adapters_dtype():
    """Optimizer state loaded before the first step keeps float64 (it was cast to float32 on the way in,
    losing ~1e-9 per step of exactness); the resumed step equals the uninterrupted one bitwise."""
    torch.manual_seed(0)
    config = BiLoRAConfig(
        rank=1, alpha=3.0, aux_rank=2, aux_alpha=5.0, target_modules=["conv", "proj", "head"]
    )
    model = attach_bilora(Toy().double(), config)
    randomize(model)
    kwargs = dict(method="bilora", lr=0.05, max_grad_norm=0.5, weight_decay=0.01)
    opt = build_optimizer(model, config, **kwargs)
    x, y = torch.randn(4, 3, 6, 6).double(), torch.randn(4, 1).double()

    def step(m, o):
        o.zero_grad()
        o.step(lambda: F.mse_loss(m(x), y).backward())

    for _ in range(3):
        step(model, opt)
    resumed = copy.deepcopy(model)
    opt2 = build_optimizer(resumed, config, **kwargs)
    opt2.load_state_dict(to_tensors(opt.state_dict(), opt._flat, opt._group_params))
    step(model, opt)
    step(resumed, opt2)
    assert all(
        v.dtype == torch.float64
        for st in opt2.state_dict()["state"].values()
        for k, v in st.items()
        if k != "step"
    )
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
