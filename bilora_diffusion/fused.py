"""The fused forward: every LoRA branch of a layer in one low-rank product (`core.lora_delta`).

PEFT runs each active adapter on its own (``result = result + lora_B(lora_A(x)) * s`` per adapter: two
rank-r products, two scalings and two additions over the full ``[tokens, out]`` output under Bi-LoRA). The
fused forward computes ``W0·x + b + ((x·[A1; A2]ᵀ) ⊙ v)·[B1ᵀ; B2ᵀ]`` with ``v = [s1]*r1 + [s2]*r2`` and the
addition fused into the second product; the factors are concatenated per call (differentiably), so the
branches get exactly the gradients of PEFT's forward and PEFT's tensors stay the only storage. With one
branch (``--method lora``) it is the same single product and ``addmm``, so plain LoRA gets the speed too.

A Conv2d layer is fused the same way (`core.lora_delta_conv2d`). PEFT's own forward runs, decided at each
call, wherever the fused one would not be exact: adapters disabled or merged, another set of active adapters
(e.g. inside ``aux_disabled``), keyword arguments, DoRA, LoRA dropout > 0 (each branch draws its own mask), a
LoRA bias, grouped convolutions, and every other layer type. The fast path is a ``forward`` attribute on each
layer instance (nothing global is patched; it deep-copies and pickles with its layer); `disable_fused` removes
it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import AUX, PRIMARY
from .core import lora_delta, lora_delta_conv2d
from .peft_glue import ModelOrModels, models_of

FUSED_ATTR = "_bilora_fused_adapters"
"""Instance attribute that marks a layer as fused; it holds the adapter names the fast path serves."""


def can_fuse(layer: nn.Module, adapters: Sequence[str] = (PRIMARY, AUX)) -> bool:
    """Whether the layer's type and adapters allow the fused forward (the state-dependent conditions --
    active adapters, disabled, merged, dropout -- are checked at each call)."""
    if type(layer) not in (LoraLinear, LoraConv2d):
        return False
    for name in adapters:
        if name not in layer.lora_A or layer.use_dora.get(name) or layer.lora_bias.get(name, False):
            return False
        a, b = layer.lora_A[name], layer.lora_B[name]
        if type(layer) is LoraLinear:
            if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None:
                return False
        else:
            plain = all(type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" for m in (a, b))
            if not plain or b.bias is not None or b.kernel_size != (1, 1) or b.stride != (1, 1):
                return False
    if type(layer) is LoraConv2d:  # one convolution for every A: they must share geometry
        geometries = {_geometry(layer.lora_A[name]) for name in adapters}
        if len(geometries) != 1:
            return False
    return True


def _geometry(conv: nn.Conv2d) -> tuple:
    return conv.kernel_size, conv.stride, conv.padding, conv.dilation


def _fusable_now(layer: LoraLayer, adapters: tuple[str, ...], kwargs: dict) -> bool:
    """The per-call conditions: exactly ``adapters`` active, not disabled or merged, no keyword arguments
    (PEFT's per-call adapter selection and variants), no dropout."""
    if kwargs or layer.disable_adapters or layer.merged:
        return False
    active = layer.active_adapters
    if len(active) != len(adapters) or set(active) != set(adapters):
        return False
    return all(_no_dropout(layer.lora_dropout[name]) for name in adapters)


def _no_dropout(module: nn.Module) -> bool:
    return type(module) is nn.Identity or (
        isinstance(module, nn.Dropout) and (module.p == 0 or not module.training)
    )


def _scales(layer: LoraLayer, adapters: tuple[str, ...], ranks: list[int], like: torch.Tensor, cache: dict):
    """The scaling of the rank axis: one float when every branch has the same s, else the vector
    ``v = [s1]*r1 + [s2]*r2`` in like's dtype (float32 for half-precision activations, as PEFT multiplies
    them by a Python float; under autocast the product is in half precision), kept in ``cache`` per scaling,
    device and dtype. ``like``: the factors after the input cast."""
    values = tuple(float(layer.scaling[name]) for name in adapters)
    if all(v == values[0] for v in values):
        return values[0]
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    if torch.is_autocast_enabled(like.device.type):
        dtype = torch.float32
    key = (values, tuple(ranks), like.device, dtype)
    if key not in cache:
        cache.clear()
        parts = [torch.full((r,), v, dtype=dtype, device=like.device) for v, r in zip(values, ranks)]
        cache[key] = torch.cat(parts)
    return cache[key]


def _fused_forward(
    layer: LoraLayer, adapters: tuple[str, ...], cache: dict, x: torch.Tensor, *args, **kwargs
):
    if not _fusable_now(layer, adapters, kwargs):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args)
    a_mods = [layer.lora_A[name] for name in adapters]
    a_list = [m.weight for m in a_mods]
    b_list = [layer.lora_B[name].weight for name in adapters]
    a = a_list[0] if len(a_list) == 1 else torch.cat(a_list, 0)  # [r1 + r2, in(, kh, kw)]
    if layer.cast_input_dtype_enabled and x.dtype != a.dtype:
        x = x.to(a.dtype)
    scale = _scales(layer, adapters, [t.shape[0] for t in a_list], a, cache)
    if type(layer) is LoraLinear:
        bt = b_list[0].t() if len(b_list) == 1 else torch.cat([b.t() for b in b_list], 0)  # [r1 + r2, out]
        return lora_delta(x, a, bt, scale, result)
    b = b_list[0] if len(b_list) == 1 else torch.cat(b_list, 1)  # [out, r1 + r2, 1, 1]
    first = a_mods[0]
    conv = {"stride": first.stride, "padding": first.padding, "dilation": first.dilation}
    return lora_delta_conv2d(x, a, b, scale, result, conv)


class _FusedForward:
    """A fused layer's ``forward``: a module-level callable holding its layer, so that a fused model pickles
    (``torch.save(model)``) and deep-copies (the copy calls its own layer)."""

    def __init__(self, layer: LoraLayer, adapters: tuple[str, ...]) -> None:
        self.layer = layer
        self.adapters = adapters
        self.scales: dict = {}

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return _fused_forward(self.layer, self.adapters, self.scales, x, *args, **kwargs)


def enable_fused(model: ModelOrModels, adapters: Sequence[str] = (PRIMARY, AUX)) -> int:
    """Install the fused forward on every LoRA layer of ``model`` that carries ``adapters`` and whose type
    allows it (`can_fuse`); returns how many layers got it. Idempotent. ``adapters`` is the exact set of
    active adapters the fast path serves: the Bi-LoRA pair, or ``(PRIMARY,)`` for a single LoRA."""
    adapters = tuple(adapters)
    count = 0
    for root in models_of(model):
        for layer in root.modules():
            if isinstance(layer, LoraLayer) and can_fuse(layer, adapters):
                layer.__dict__[FUSED_ATTR] = adapters
                layer.forward = _FusedForward(layer, adapters)
                count += 1
    return count


def disable_fused(model: ModelOrModels) -> int:
    """Remove the fused forward from every layer of ``model`` (PEFT's forward again); returns how many."""
    count = 0
    for root in models_of(model):
        for layer in root.modules():
            if FUSED_ATTR in layer.__dict__:
                del layer.__dict__[FUSED_ATTR]
                layer.__dict__.pop("forward", None)
                count += 1
    return count


def is_fused(layer: nn.Module) -> bool:
    """Whether `enable_fused` installed the fast path on this layer (it may still fall back per call)."""
    return FUSED_ATTR in layer.__dict__


__all__ = ["can_fuse", "disable_fused", "enable_fused", "is_fused"]
