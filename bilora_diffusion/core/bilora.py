"""The Bi-LoRA algorithm (Liu et al., ICLR 2026, arXiv 2508.19564), each rule written once.

Every adapted layer computes, with a primary (r1, s1) and an auxiliary (r2, s2) LoRA branch,

    y = W0·x + s1·B1·A1·x + s2·B2·A2·x                                    (`lora_delta`)

One forward/backward at that point gives G = dL/dW and, through it, the gradients of all four factors. One
optimizer step then moves the two branches in opposite directions and bounds the auxiliary one:

    (B1, A1) <- (B1, A1) - eta1 · grad          descent: the LoRA that is exported
    (B2, A2) <- (B2, A2) + eta2 · grad          ascent: the perturbation (inner optimizer with maximize)
    c = sqrt(sum_j ||s2·B2_j·A2_j||_F²)          (`block_sq_norms`, from r×r Gram matrices)
    if c > rho: every B2_j, A2_j *= sqrt(rho / c)  (`clip_factors`: s2·B2·A2 scales by rho / c)

Before the update each branch's gradient may be clipped to a norm on its own (`clip_grad_norms_`), so the
ascent's gradient never shrinks the descent's. `bilora_diffusion.core.reference` is the same step written
as plainly as possible; the fast paths (`bilora_diffusion.fused`, `bilora_diffusion.optim`) are tested
against it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch


def lora_delta(
    x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: float | torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """``result + ((x·Aᵀ) ⊙ v)·B``ᵀ: every branch of a Linear layer in one low-rank product.

    ``a`` = [A1; A2] [r1 + r2, in], ``bt`` = [B1ᵀ; B2ᵀ] [r1 + r2, out] (B transposed: stacking the Bᵀ's by rows
    keeps every gradient piece contiguous, measured 1.01x one branch's cost vs 1.18x for [B1, B2] by columns
    on 128-wide layers), ``scale`` = one float when every branch has the same s, else the vector
    ``v = [s1]*r1 + [s2]*r2``; ``x`` [..., in] in a's dtype, ``result`` [..., out] (the base layer's output).
    The addition is fused into the second product (``addmm``) and done in the promoted dtype of result and the
    adapter output, then cast back to result's dtype, as PEFT does.
    """
    h = torch.nn.functional.linear(x, a)  # [..., r1 + r2]; under autocast in the autocast dtype
    alpha = 1.0
    if isinstance(scale, float):
        alpha = scale
    else:
        h = _to(h * scale, h.dtype)
    out_dtype = result.dtype
    dtype = torch.promote_types(out_dtype, h.dtype)
    flat = _to(result.reshape(-1, result.shape[-1]), dtype)
    out = torch.addmm(flat, _to(h.reshape(-1, h.shape[-1]), dtype), _to(bt, dtype), alpha=alpha)
    return _to(out.view(result.shape), out_dtype)


def lora_delta_conv2d(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor, result: torch.Tensor, conv
) -> torch.Tensor:
    """The same for a Conv2d layer: ``a`` [r1 + r2, in, kh, kw] is one convolution with the A's geometry
    (``conv``: a dict of stride, padding, dilation), ``b`` [out, r1 + r2, 1, 1] one 1x1 convolution; x
    [N, in, H, W], result [N, out, H', W']. Returns result's shape and dtype."""
    h = torch.nn.functional.conv2d(x, a, None, **conv)  # [N, r1 + r2, H', W']
    h = (h * (scale if isinstance(scale, float) else scale.view(1, -1, 1, 1))).to(h.dtype)
    return (result + torch.nn.functional.conv2d(h, b)).to(result.dtype)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is a no-op (it runs per layer and call)."""
    return t if t.dtype == dtype else t.to(dtype)


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the ranks that hold shards of the factors (an all-reduce); absent in one process."""


def block_grams(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The two r×r Gram matrices of n equally shaped pairs, A [n, r, in], B [n, out, r]: ``[BᵀB, A·Aᵀ]`` as one
    [2, n, r, r] tensor, in float32 at least (float64 factors stay float64).

    Both are sums over the factors' non-rank dimension (B's rows, A's columns), so on a factor sharded along
    that dimension the Gram of the local piece is a partial sum, and the sum over the ranks (one all-reduce of
    every block's Grams) is the Gram of the full factor: exact under sharding, never a gather of the factors."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    return torch.stack([torch.bmm(b.transpose(1, 2), b), torch.bmm(a, a.transpose(1, 2))])


def block_sq_norms(a: torch.Tensor, b: torch.Tensor, sq_scales: torch.Tensor) -> torch.Tensor:
    """``s²·||B·A||_F²`` of n equally shaped pairs, A [n, r, in], B [n, out, r], without forming B·A:
    ``||B·A||_F² = trace(Aᵀ·Bᵀ·B·A) = sum((BᵀB) ⊙ (A·Aᵀ))``, from `block_grams`; returns [n]."""
    return grams_sq_norms(block_grams(a, b), sq_scales)


def grams_sq_norms(grams: torch.Tensor, sq_scales: torch.Tensor) -> torch.Tensor:
    """``s²·sum((BᵀB) ⊙ (A·Aᵀ))`` from `block_grams`' [2, n, r, r]; returns [n]."""
    return (grams[0] * grams[1]).sum(dim=(1, 2)) * sq_scales.to(grams.dtype)


def blocks_sq_norms(
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], reduce: Reduce | None = None
) -> torch.Tensor:
    """`block_sq_norms` of several blocks (A, B, s²), concatenated; with ``reduce`` (sharded factors: A split
    along its input dimension, B along its output one) every block's local Grams are summed over the ranks in
    ONE all-reduce before the products, so every rank gets the full model's norms."""
    if not blocks:
        return torch.zeros(0)
    grams = [block_grams(a, b) for a, b, _ in blocks]
    if reduce is not None:
        summed = reduce(torch.cat([g.reshape(-1) for g in grams]))
        grams = [part.view_as(g) for part, g in zip(summed.split([g.numel() for g in grams]), grams)]
    return torch.cat([grams_sq_norms(g, s) for g, (_, _, s) in zip(grams, blocks)])


def clip_factors(sq: torch.Tensor, rho: float, mode: str) -> torch.Tensor:
    """The factor each auxiliary pair's A and B are multiplied by, from the pairs' squared norms ``sq`` [n]:

        global: c = sqrt(sum_j sq_j);  f = sqrt(rho / c) for every pair if c > rho, else 1   (the paper)
        layer:  c_j = sqrt(sq_j);      f_j = sqrt(rho / c_j) if c_j > rho, else 1          (ablation)
        none:   f = 1                                                                      (ablation)

    A and B both scale by f, so s·B·A scales by f² = rho / c. Returns [n]."""
    if mode == "none":
        return torch.ones_like(sq)
    if mode == "global":
        c = sq.sum().sqrt()
        return torch.where(c > rho, (rho / c).sqrt(), torch.ones_like(c)).expand_as(sq)
    c_j = sq.sqrt()
    return torch.where(c_j > rho, (rho / c_j.clamp_min(1e-30)).sqrt(), torch.ones_like(c_j))


def clipped_norm(sq: torch.Tensor, factors: torch.Tensor) -> float:
    """c after the clip: each pair's squared norm scales by f⁴ (f on A and on B)."""
    return float((sq * factors.pow(4)).sum().sqrt()) if sq.numel() else 0.0


def total_norms(groups: list[list[torch.Tensor]], reduce: Reduce | None = None) -> torch.Tensor:
    """The 2-norm of each group of tensors (``torch.nn.utils.get_total_norm`` per group), stacked; with
    ``reduce`` (sharded tensors) the local squared norms of all groups are summed over the ranks in ONE
    all-reduce."""
    local = [torch.nn.utils.get_total_norm(tensors) for tensors in groups]
    dtype = functools.reduce(torch.promote_types, [n.dtype for n in local])
    norms = torch.stack([n.to(local[0].device, dtype) for n in local])
    if reduce is not None:
        norms = reduce(norms.double().square()).sqrt().to(dtype)
    return norms


def clip_grad_norms_(
    grads: dict[str, list[torch.Tensor]], max_norm: float | None, reduce: Reduce | None = None
) -> dict[str, float]:
    """Per role (e.g. "primary", "aux"): the total 2-norm of its gradients ``grads[role]`` and, with
    ``max_norm``, those gradients scaled in place by ``min(1, max_norm / (norm + 1e-6))`` --
    ``torch.nn.utils.clip_grad_norm_`` for each role on its own. With ``reduce`` (sharded gradients) the roles'
    local squared norms are summed over the ranks in one all-reduce. Returns the norms before clipping."""
    grads = {role: tensors for role, tensors in grads.items() if tensors}
    if not grads:
        return {}
    norms = total_norms(list(grads.values()), reduce)
    if max_norm:
        coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for tensors, coef in zip(grads.values(), coefs):
            torch._foreach_mul_(tensors, coef.to(tensors[0].device, tensors[0].dtype))
    return dict(zip(grads, norms.tolist()))


__all__ = [
    "Reduce",
    "block_grams",
    "block_sq_norms",
    "blocks_sq_norms",
    "grams_sq_norms",
    "total_norms",
    "clip_factors",
    "clip_grad_norms_",
    "clipped_norm",
    "lora_delta",
    "lora_delta_conv2d",
]
