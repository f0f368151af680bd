"""The fused fast path: both Bi-LoRA branches of a layer in one low-rank computation.

PEFT runs each active adapter on its own: ``result = result + lora_B(lora_A(x)) * s`` per adapter, i.e. two
rank-r products, two scalings and two additions over the full ``[tokens, out]`` output. With the primary and
auxiliary adapters both active, that costs 1.1-1.4x one adapter per training step. The fused forward computes,
for a layer whose active adapters are exactly ``{"default", "bilora_aux"}``::

    h = x · [A1; A2]ᵀ                     [..., r1 + r2]     (one product for both branches)
    y = W0·x + b + (h ⊙ v) · [B1, B2]ᵀ    [..., out]         v = [s1]*r1 + [s2]*r2

    = W0·x + b + s1·B1·A1·x + s2·B2·A2·x   (the two-adapter forward, up to rounding)

with the scaling on the rank axis (or, when s1 = s2, as the GEMM's alpha) and the addition fused into the
second GEMM (``torch.addmm``). A Linear layer holds ``[A1; A2]`` and ``[B1, B2]`` as two packed leaf tensors
with PEFT's weights as views of them (`bilora_diffusion.packed`), so nothing is concatenated per call; other
layers concatenate PEFT's weights per call (differentiably). Either way the branches get exactly the gradients
of the two-adapter path, and the optimizer's steps, the clip, the state dicts and the export do not change.

A Conv2d layer is fused the same way (``[A1; A2]`` as one convolution with A's kernel, ``[B1, B2]`` as one
1x1 convolution). Every other case runs PEFT's own forward, decided at each call: adapters disabled, merged
weights, another set of active adapters (e.g. inside ``aux_disabled``: only "default"), ``adapter_names``
or variant keyword arguments, a LoRA variant (DoRA), LoRA dropout > 0 (each branch draws its own mask), a
LoRA bias, grouped convolutions, and every other layer type (embeddings, bitsandbytes layers, ...).

The fast path is installed per instance (a ``forward`` attribute on each layer), so nothing global is
patched; `disable_fused` removes it.

The module also holds the optimizer-side counterparts, tested equal to `BiLoRAOptimizer`'s loops:
`pair_sq_norms_batched` and `clip_aux_` (the auxiliary clip from one batched Gram computation per shape
group, and one foreach scaling) and `grad_norm` (one foreach norm per device and dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from torch import nn

from .adapters import LoraPair, ModelOrModels, _models
from .config import AUX, PRIMARY
from .packed import can_pack, no_dropout, pack_layer, packed_factors, unpack_layer

FUSED_ATTR = "_bilora_fused_adapters"
"""Instance attribute that marks a layer as fused; it holds the adapter names the fast path serves."""


def can_fuse(layer: nn.Module, adapters: Sequence[str] = (PRIMARY, AUX)) -> bool:
    """Whether the layer's type and adapters allow the fused forward at all (the state-dependent conditions
    -- active adapters, disabled, merged -- are checked at each call)."""
    if type(layer) not in (LoraLinear, LoraConv2d):
        return False
    for name in adapters:
        if name not in layer.lora_A or name in layer.lora_variant or layer.lora_bias.get(name, False):
            return False
        a, b = layer.lora_A[name], layer.lora_B[name]
        if type(layer) is LoraLinear:
            if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None:
                return False
        else:
            plain = all(type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" for m in (a, b))
            if not plain or b.bias is not None or b.kernel_size != (1, 1) or b.stride != (1, 1):
                return False
    if type(layer) is LoraConv2d:  # one convolution for both A's: they must share geometry
        first = layer.lora_A[adapters[0]]
        geometry = (first.kernel_size, first.stride, first.padding, first.dilation)
        if any(
            (m.kernel_size, m.stride, m.padding, m.dilation) != geometry for m in _a_modules(layer, adapters)
        ):
            return False
    return True


def _a_modules(layer: LoraLayer, adapters: Sequence[str]) -> list[nn.Module]:
    return [layer.lora_A[name] for name in adapters]


def _fusable_now(layer: LoraLayer, adapters: Sequence[str], kwargs: dict) -> bool:
    """The per-call conditions: exactly ``adapters`` active, not disabled or merged, no per-call adapter
    selection, no dropout. (Runs for every adapted layer at every call, so it reads PEFT's attributes
    directly: ``_disable_adapters``, ``merged_adapters``, ``active_adapter``.)"""
    if layer._disable_adapters or layer.merged_adapters:
        return False
    if kwargs and any(kwargs.get(key) is not None for key in ("adapter_names", *VARIANT_KWARG_KEYS)):
        return False
    active = layer.active_adapter
    if isinstance(active, str):
        if len(adapters) != 1 or active != adapters[0]:
            return False
    elif len(active) != len(adapters) or set(active) != set(adapters):
        return False
    dropouts = layer.lora_dropout._modules
    return all(no_dropout(dropouts[name]) for name in adapters)


def _weights(layer: LoraLayer, adapters: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The A and B weights of ``adapters`` (straight from the ModuleDicts' and modules' dicts: this runs for
    every adapted layer at every call)."""
    a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
    return [_weight(a_mods[name]) for name in adapters], [_weight(b_mods[name]) for name in adapters]


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module._parameters.get("weight")
    return module.weight if weight is None else weight  # e.g. a parametrized weight


def _scales(layer: LoraLayer, adapters: Sequence[str], like: torch.Tensor) -> float | torch.Tensor:
    """The scaling of the rank axis: one float when every branch has the same s, else the vector
    ``v = [s1]*r1 + [s2]*r2`` (cached on the layer per device and dtype; rebuilt when PEFT's scaling
    changes)."""
    scaling = layer.scaling
    values = [float(scaling[name]) for name in adapters]
    if len(values) == 1 or all(v == values[0] for v in values):
        return values[0]
    ranks = [layer.lora_A[name].weight.shape[0] for name in adapters]
    key = (tuple(values), tuple(ranks), like.device, like.dtype)
    cache = layer.__dict__.setdefault("_bilora_scale_cache", {})
    vec = cache.get(key)
    if vec is None:
        # Half-precision activations are scaled by a float32 vector (PEFT multiplies them by a Python float,
        # i.e. in float32 too) and rounded once.
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        parts = [torch.full((r,), v, dtype=dtype, device=like.device) for v, r in zip(values, ranks)]
        cache.clear()
        vec = cache[key] = torch.cat(parts)
    return vec


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it would be a no-op (a few microseconds per layer and call)."""
    return t if t.dtype == dtype else t.to(dtype)


def fused_delta_linear(
    layer: LoraLinear, x: torch.Tensor, result: torch.Tensor, adapters: Sequence[str]
) -> torch.Tensor:
    """``result + sum_k s_k·B_k·A_k·x`` for a Linear layer, as one rank-(sum r_k) product.

    x: [..., in]; result: [..., out] (the base layer's output). Returns [..., out] in result's dtype.
    """
    packed = packed_factors(layer)
    if packed is not None:  # `bilora_diffusion.packed`: [A1; A2] and [B1, B2] are the leaves themselves
        a, b = packed
    else:
        a_weights, b_weights = _weights(layer, adapters)
        a = _cat(a_weights, 0)  # [r1 + r2, in]
        b = _cat(b_weights, 1)  # [out, r1 + r2]
    x = layer._cast_input_dtype(x, a.dtype)
    h = F.linear(x, a)  # [..., r1 + r2]; under autocast in the autocast dtype
    scale = _scales(layer, adapters, h)
    alpha = 1.0
    if isinstance(scale, float):
        alpha = scale
    else:
        h = _to(h * scale, h.dtype)
    out_dtype = result.dtype
    # PEFT adds in the promoted dtype of result and the adapter output, then casts back: same here.
    dtype = torch.promote_types(out_dtype, h.dtype)
    flat = _to(result.reshape(-1, result.shape[-1]), dtype)
    out = torch.addmm(flat, _to(h.reshape(-1, h.shape[-1]), dtype), _to(b, dtype).t(), alpha=alpha)
    return _to(out.view(result.shape), out_dtype)


def fused_delta_conv2d(
    layer: LoraConv2d, x: torch.Tensor, result: torch.Tensor, adapters: Sequence[str]
) -> torch.Tensor:
    """``result + sum_k s_k·B_k * (A_k * x)`` for a Conv2d layer (``*`` = convolution), with the A kernels
    stacked into one convolution [r1 + r2, in, kh, kw] and the B's into one 1x1 convolution [out, r1 + r2].

    x: [N, in, H, W]; result: [N, out, H', W']. Returns result's shape and dtype.
    """
    first = layer.lora_A[adapters[0]]
    a_weights, b_weights = _weights(layer, adapters)
    a, b = _cat(a_weights, 0), _cat(b_weights, 1)
    x = layer._cast_input_dtype(x, a.dtype)
    h = F.conv2d(x, a, None, first.stride, first.padding, first.dilation)  # [N, r1 + r2, H', W']
    scale = _scales(layer, adapters, h)
    h = (h * (scale if isinstance(scale, float) else scale.view(1, -1, 1, 1))).to(h.dtype)
    return (result + F.conv2d(h, b)).to(result.dtype)


def _fused_forward(self: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``layer.forward`` once `enable_fused` ran: the fused computation when the per-call conditions hold,
    PEFT's own forward otherwise."""
    adapters = self.__dict__[FUSED_ATTR]
    if not _fusable_now(self, adapters, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    if kwargs:  # what PEFT's forward keeps from the base layer
        kwargs.pop("adapter_names", None)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    if type(self) is LoraLinear:
        return fused_delta_linear(self, x, result, adapters)
    return fused_delta_conv2d(self, x, result, adapters)


class _FusedForward:
    """The layer's ``forward`` while fused: a module-level callable holding its layer, so that a fused model
    still pickles (``torch.save(model)``) and deep-copies (the copy calls its own layer)."""

    def __init__(self, layer: LoraLayer) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return _fused_forward(self.layer, x, *args, **kwargs)


def enable_fused(model: ModelOrModels, adapters: Sequence[str] = (PRIMARY, AUX), pack: bool = True) -> int:
    """Install the fused forward on every LoRA layer of ``model`` that carries ``adapters`` and whose type
    allows it (see `can_fuse`); returns how many layers got it. Idempotent.

    ``adapters`` is the exact set of active adapters the fast path serves; with any other set active the layer
    runs PEFT's forward. The default is the Bi-LoRA pair; ``(PRIMARY,)`` gives a single LoRA the same
    single-GEMM-plus-addmm forward (the benchmark's like-for-like reference). ``pack``: Linear layers with two
    or more branches also get packed storage (`bilora_diffusion.packed`), so the forward concatenates nothing.
    """
    adapters = tuple(adapters)
    count = 0
    for root in _models(model):
        for layer in root.modules():
            if isinstance(layer, LoraLayer) and can_fuse(layer, adapters):
                layer.__dict__[FUSED_ATTR] = adapters
                layer.forward = _FusedForward(layer)
                if pack and can_pack(layer, adapters):
                    pack_layer(layer, adapters)
                else:
                    unpack_layer(layer)
                count += 1
    return count


def disable_fused(model: ModelOrModels) -> int:
    """Remove the fused forward (and packed storage) from every layer of ``model`` (PEFT's forward and
    parameters again); returns how many."""
    count = 0
    for root in _models(model):
        for layer in root.modules():
            if FUSED_ATTR in layer.__dict__:
                unpack_layer(layer)
                del layer.__dict__[FUSED_ATTR]
                layer.__dict__.pop("forward", None)
                layer.__dict__.pop("_bilora_scale_cache", None)
                count += 1
    return count


# -- the optimizer side: batched clip norms, one-call scaling and gradient norms --------------------------------
def block_sq_norms(a: torch.Tensor, b: torch.Tensor, sq_scales: torch.Tensor) -> torch.Tensor:
    """``s²·||B·A||_F²`` of a block of n equally shaped pairs, A: [n, r, in], B: [n, out, r], from the r×r Gram
    matrices without forming B·A: ``||B·A||_F² = sum((BᵀB) ⊙ (A·Aᵀ))``. Float32; returns [n]."""
    a, b = a.float(), b.float()
    return (torch.bmm(b.transpose(1, 2), b) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2)) * sq_scales


def clip_factors(sq: torch.Tensor, rho: float, mode: str) -> torch.Tensor:
    """The auxiliary clip's factor for every pair from its squared norm ``sq`` [n]:

        global: c = sqrt(sum_j sq_j); f = sqrt(rho / c) for every pair if c > rho, else 1
        layer:  c_j = sqrt(sq_j);     f_j = sqrt(rho / c_j) if c_j > rho, else 1

    (A and B are both scaled by f, so s·B·A is scaled by rho / c.) Returns [n]."""
    if mode == "global":
        c = sq.sum().sqrt()
        return torch.where(c > rho, (rho / c).sqrt(), torch.ones_like(c)).expand_as(sq)
    c_j = sq.sqrt()
    return torch.where(c_j > rho, (rho / c_j.clamp_min(1e-30)).sqrt(), torch.ones_like(c_j))


def pair_sq_norms_batched(pairs: list[LoraPair]) -> torch.Tensor:
    """``||s·B·A||_F²`` of every pair, as `adapters.pair_sq_norms` computes it one pair at a time, with one
    `block_sq_norms` per group of equally shaped pairs (a handful of groups on SDXL instead of one small
    computation per adapted layer). Float32, on the pairs' device; returns a 1-D tensor in the order of
    ``pairs``."""
    if not pairs:
        return torch.zeros(0)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault((p.A.shape, p.B.shape, p.A.device), []).append(i)
    device = pairs[0].A.device
    out = torch.empty(len(pairs), dtype=torch.float32, device=device)
    for indices in groups.values():
        a = torch.stack([pairs[i].A.detach() for i in indices])  # [n, r, in]
        b = torch.stack([pairs[i].B.detach() for i in indices])  # [n, out, r]
        scales = torch.tensor([pairs[i].scale ** 2 for i in indices], dtype=torch.float32, device=a.device)
        idx = torch.tensor(indices, device=device)
        out.index_copy_(0, idx, block_sq_norms(a, b, scales).to(device))
    return out


def clip_aux_(pairs: list[LoraPair], rho: float, mode: str = "global") -> float:
    """The auxiliary clip (`clip_factors`) with batched norms and one foreach scaling, in place; returns c
    after the clip (``last_aux_norm``)."""
    sq = pair_sq_norms_batched(pairs)
    factors = clip_factors(sq, rho, mode)
    tensors, scalars = [], []
    for pair, f in zip(pairs, factors.tolist()):
        if f != 1.0:
            tensors += [pair.A_param, pair.B_param]
            scalars += [f, f]
    if tensors:
        with torch.no_grad():
            torch._foreach_mul_(tensors, scalars)
    return float((sq * factors.pow(4)).sum().sqrt())


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_p ||grad_p||²)`` over the parameters that have a gradient, in float32, with one foreach
    norm per device and dtype (what ``clip_grad_norm_`` computes, without clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    device = grads[0].device
    norms = [n.float().to(device) for group in by_kind.values() for n in torch._foreach_norm(group)]
    return torch.linalg.vector_norm(torch.stack(norms))


def is_fused(layer: nn.Module) -> bool:
    """Whether `enable_fused` installed the fast path on this layer (it may still fall back per call)."""
    return FUSED_ATTR in layer.__dict__


__all__ = [
    "block_sq_norms",
    "can_fuse",
    "clip_factors",
    "clip_aux_",
    "disable_fused",
    "enable_fused",
    "fused_delta_conv2d",
    "fused_delta_linear",
    "grad_norm",
    "is_fused",
    "pair_sq_norms_batched",
]
