"""The fast path (fused forward, flat or per-tensor update) against the plain reference step of
`bilora_diffusion.core.reference`: SGD and AdamW, r1 != r2 and s1 != s2, every clip mode, gradient
accumulation over two micro-batches, an LR schedule, per-role gradient clipping that engages."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora, aux_norm, build_optimizer
from bilora_diffusion.core import reference_step
from bilora_diffusion.peft_glue import branch_pairs


def deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def twins(config: BiLoRAConfig) -> tuple[nn.Module, nn.Module]:
    """(reference: PEFT's two-adapter forward, fast: the library's default fused forward), same weights, the
    adapters random (B included) so that the clip and the gradient clip engage from the first step."""
    reference = attach_bilora(deep_mlp(), BiLoRAConfig(**{**config.to_dict(), "fused": False}))
    fast = attach_bilora(deep_mlp(), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(2)]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("clip", ["global", "layer", "none"])
@pytest.mark.parametrize("flat", [True, False])
def test_fast_path_equals_the_reference_step(optimizer_cls, clip, flat):
    config = BiLoRAConfig(
        rank=2,
        alpha=3.0,
        aux_rank=3,
        aux_alpha=5.0,
        rho=0.05,
        clip=clip,
        aux_lr=2e-2,
        target_modules=["0", "2", "4"],
    )
    assert config.scale != config.aux_scale and config.rank != config.aux_rank
    reference, fast = twins(config)
    kwargs = {"weight_decay": 0.1} if optimizer_cls is torch.optim.AdamW else {"momentum": 0.9}
    pairs = {b: [(p.A_param, p.B_param, p.scale) for p in branch_pairs(reference, b)] for b in (PRIMARY, AUX)}
    primary_opt = optimizer_cls([t for a, b, _ in pairs[PRIMARY] for t in (a, b)], lr=1e-2, **kwargs)
    aux_kwargs = {**kwargs, "weight_decay": 0.0} if "weight_decay" in kwargs else kwargs
    aux_opt = optimizer_cls([t for a, b, _ in pairs[AUX] for t in (a, b)], lr=2e-2, **aux_kwargs)
    opt = build_optimizer(
        fast, config, optimizer_cls=optimizer_cls, lr=1e-2, max_grad_norm=0.05, flat=flat, **kwargs
    )
    assert opt.flat is flat
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (primary_opt, aux_opt, opt)]
    for step in range(4):
        for model in (reference, fast):
            model.zero_grad(set_to_none=True)
            for x, y in micro_batches(step):  # gradient accumulation: two backwards, one step
                (F.mse_loss(model(x.double()), y.double()) / 2).backward()
        reference_step(pairs[PRIMARY], pairs[AUX], primary_opt, aux_opt, config.rho, clip, max_grad_norm=0.05)
        opt.step()
        if step == 0:  # the gradient clip engaged
            assert opt.last_grad_norms["primary"] > 0.05 and opt.last_grad_norms["aux"] > 0.05
        for scheduler in schedulers:
            scheduler.step()
        got, want = fast.state_dict(), reference.state_dict()
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12, msg=f"step {step}: {name}")
        c = aux_norm(fast)
        assert opt.last_aux_norm == pytest.approx(c, rel=1e-9)
        if clip == "global":
            assert c == pytest.approx(config.rho, rel=1e-9)  # engaged at every step
        elif clip == "none":
            assert c > config.rho
    assert (
        opt.last_grad_norms["primary"] > 0.05 and opt.last_grad_norms["aux"] > 0.05
    )  # the gradient clip engaged
