"""One Bi-LoRA step written as plainly as the paper states it (Liu et al., ICLR 2026, Algorithm 1).

This is the specification the fast paths are tested against (tests/unit/test_reference.py): it forms every
``s2·B2·A2`` explicitly, steps every tensor on its own and knows nothing of flat vectors or fused forwards.
Each pair is ``(A, B, s)`` with A [r, in...] and B [out, r...]; their ``.grad`` come from ONE backward at
``W0 + s1·B1·A1 + s2·B2·A2``. ``primary_opt`` and ``aux_opt`` are two ordinary torch optimizers over the
primary and auxiliary tensors.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def reference_step(primary, aux, primary_opt, aux_opt, rho: float, clip: str = "global", max_grad_norm=None):
    for pairs in (primary, aux):  # each branch's gradient clipped on its own
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([t for a, b, _ in pairs for t in (a, b)], max_grad_norm)
    for a, b, _ in aux:  # ascent: the auxiliary branch steps along +gradient
        a.grad.neg_(), b.grad.neg_()
    primary_opt.step()  # descent
    aux_opt.step()
    norms = [(s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).norm() for a, b, s in aux]
    total = math.sqrt(sum(float(n) ** 2 for n in norms))
    for (a, b, _), norm in zip(aux, norms):  # s2·B2·A2 scaled by rho / c, half on A and half on B
        c = {"global": total, "layer": float(norm), "none": 0.0}[clip]
        if c > rho:
            a.mul_(math.sqrt(rho / c)), b.mul_(math.sqrt(rho / c))
