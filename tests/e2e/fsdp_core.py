"""Run by tests/e2e/test_sharding.py: `torchrun --nproc_per_node 2 tests/e2e/fsdp_core.py OUT METHOD [METHOD ...]`.

One model sharded with FSDP2 over the ranks (gloo, CPU) against the same model in one process, every method:
each rank trains on its half of the batch, the reference on the whole batch. Shapes are chosen so the shards
are uneven and one rank holds no rows of some adapter factor (a Linear with one output). Rank 0 writes
OUT/fsdp_core.json with the largest differences it found per method: parameters, gradient norms, losses, the
aux norm after each step on every rank (and the reference's), the gathered optimizer state against the
reference's, and one more step after loading that state into a fresh sharded optimizer.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bilora_diffusion import BiLoRAConfig, attach_bilora, build_optimizer
from bilora_diffusion.optim.state_layout import to_tensors
from bilora_diffusion.sharding import apply_fsdp, full_tensor, local
from bilora_diffusion.testing import UnevenShards as Toy
from bilora_diffusion.testing import randomize_adapters as randomize


def run(method: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    config = BiLoRAConfig(
        rank=1, alpha=3.0, aux_rank=2, aux_alpha=5.0, target_modules=["conv", "proj", "head"], rho=0.05
    ).for_method(method)
    reference = attach_bilora(Toy().double(), config)
    randomize(reference)
    model = copy.deepcopy(reference)
    apply_fsdp(model)
    gen = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(4, 4, 6, 6, generator=gen).double(), torch.randn(4, 1, generator=gen).double())
        for _ in range(4)
    ]
    kwargs = dict(method=method, lr=0.05, max_grad_norm=0.5, total_steps=4, seed=3, weight_decay=0.01)
    opt_ref = build_optimizer(reference, config, **kwargs)
    opt = build_optimizer(model, config, **kwargs)
    report = {"params": 0.0, "aux_norm": [], "grad_norms": 0.0, "losses": 0.0}
    for x, y in batches:

        def closure_ref():
            loss = nn.functional.mse_loss(reference(x), y)
            loss.backward()
            return loss.detach()

        part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)

        def closure():
            loss = nn.functional.mse_loss(model(x[part]), y[part])
            loss.backward()
            return loss.detach()

        loss_ref = opt_ref.step(closure_ref)
        opt_ref.zero_grad()
        loss = opt.step(closure)
        opt.zero_grad()
        mean = loss.clone()
        dist.all_reduce(mean)
        report["losses"] = max(report["losses"], abs(float(mean) / world - float(loss_ref)))
        report["aux_norm"].append((opt.last_aux_norm, opt_ref.last_aux_norm))
        for role, value in opt_ref.last_grad_norms.items():
            report["grad_norms"] = max(report["grad_norms"], abs(opt.last_grad_norms[role] - value))
    report["params"] = max_param_diff(model, reference)
    report["local_numels"] = {n: local(p).numel() for n, p in model.named_parameters() if "head.lora_B" in n}
    report["a_placements"] = {n: str(p.placements[0]) for n, p in model.named_parameters() if "lora_A" in n}
    # the gathered state is the reference's per-tensor state
    full = opt.full_state_dict()
    ref_state = to_tensors(opt_ref.state_dict(), opt_ref._flat, opt_ref._group_params)["state"]
    report["state"] = max(
        float((full["state"][pid][k] - v).abs().max())
        if torch.is_tensor(v) and v.dim()
        else abs(float(full["state"][pid][k]) - float(v))
        for pid, st in ref_state.items()
        for k, v in st.items()
    )
    report["state_entries"] = (len(full["state"]), len(ref_state))
    # ... and a fresh sharded optimizer that loads it takes the reference's next step
    resumed = build_optimizer(model, config, **kwargs)
    resumed.load_state_dict(full)
    x, y = batches[0]
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    resumed.step(lambda: _backward(model, x[part], y[part]))
    opt_ref.step(lambda: _backward(reference, x, y))
    report["resumed_params"] = max_param_diff(model, reference)
    return report


def _backward(model, x, y):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def max_param_diff(model, reference) -> float:
    ref_params = dict(reference.named_parameters())
    return max(
        float((full_tensor(p.detach()) - ref_params[n].detach()).abs().max())
        for n, p in model.named_parameters()
    )


def whole_after_forward() -> dict:
    """`whole_adapters` after a no-grad forward of a model sharded with reshard_after_forward=False and bf16
    compute (FSDP then keeps the gathered bf16 parameters): the whole adapters must be the fp32 values."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from bilora_diffusion.sharding import whole_adapters

    torch.manual_seed(0)
    config = BiLoRAConfig(rank=1, aux_rank=2, target_modules=["conv", "proj", "head"])
    model = attach_bilora(Toy(), config)
    randomize(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    apply_fsdp(model, reshard_after_forward=False, mp_policy=mp)
    x = torch.randn(2, 4, 6, 6)
    model(x).float().sum().backward()
    master = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        model(x)  # the last held-out loss
    with whole_adapters(model):
        seen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return {
        "dtypes": sorted({str(v.dtype) for v in seen.values()}),
        "diff": max(float((seen[n] - master[n]).abs().max()) for n in master),
    }


def main() -> None:
    out, methods = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reports = {}
    for method in methods:
        gathered = [None] * world
        dist.all_gather_object(gathered, run(method, rank, world))
        reports[method] = gathered
    reports["_whole_after_forward"] = whole_after_forward()
    if rank == 0:
        (out / "fsdp_core.json").write_text(json.dumps(reports, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
