"""Write tests/fixtures/optimizer_state_v0.pt with the optimizer of commit 431cc6a (before the core redesign).

Run once with that commit checked out; the file is the "checkpoint written by today's code" that
tests/unit/optim/test_state_layout.py resumes with the current core (issue 13: old checkpoints must still resume).
For each case it stores the model's state_dict and the optimizer's after two steps, and the model's
state_dict after two more steps of the uninterrupted run on fixed data.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bilora_diffusion import BiLoRAConfig, attach_bilora, build_optimizer


def deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3)
    )


CASES = {
    # name: (method, flat)
    "bilora-flat": ("bilora", True),
    "bilora-pertensor": ("bilora", False),
    "lora-flat": ("lora", True),
    "dual-descent-flat": ("dual-descent", True),
}


def config_for(method: str) -> BiLoRAConfig:
    config = BiLoRAConfig(
        rank=2, alpha=3.0, aux_rank=3, aux_alpha=5.0, rho=0.05, target_modules=["0", "2", "4", "5"]
    )
    return config.for_method(method)


def batches(seed: int, n: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(n)]


def run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def main(out: str) -> None:
    fixture = {}
    for name, (method, flat) in CASES.items():
        config = config_for(method)
        model = attach_bilora(deep_mlp(), config)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        opt = build_optimizer(
            model, config, method=method, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, flat=flat
        )
        run(model, opt, batches(0, 2))
        saved = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()),
        }
        run(model, opt, batches(1, 2))
        saved["final"] = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
        fixture[name] = saved
    torch.save(fixture, out)


if __name__ == "__main__":
    main(
        sys.argv[1]
        if len(sys.argv) > 1
        else str(Path(__file__).resolve().parents[1] / "tests/fixtures/optimizer_state_v0.pt")
    )
