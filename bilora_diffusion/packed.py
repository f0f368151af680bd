"""Packed storage: both Bi-LoRA branches of a Linear layer in one pair of leaf tensors.

The fused forward (`bilora_diffusion.fused`) computes a layer's two branches as one rank-(r1 + r2) product of
``[A1; A2]`` and ``[B1, B2]``. Concatenating PEFT's four weights for it costs two ``cat``s per layer and call,
and autograd splits the gradient again in backward (two ``CatBackward``s, four gradient accumulations): on
small layers (64-128 wide, 77 tokens) that was 5-7 % of a training step. A packed layer instead holds

    packed_A = [A1; A2]    [r1 + r2, in]     registered parameters of the LoRA layer, the leaves autograd,
    packed_B = [B1, B2]    [out, r1 + r2]    DDP, ``.to()`` and the grad clip see

and PEFT's own ``lora_A[name].weight`` / ``lora_B[name].weight`` become views of them (same storage; B's views
are column slices, so not contiguous) with ``requires_grad=False``: as everywhere in torch, the tensors that
require gradients are the ones that get them, here the packed ones. Everything that reads or writes the
adapters through PEFT's parameters -- the auxiliary clip, ``get_peft_model_state_dict``, the export, PEFT's own
forward when the auxiliary branch is disabled -- sees and changes the packed values. The flat update
(`bilora_diffusion.methods`) reads the packed tensors and their gradients directly, block by block, and its
param groups list the packed tensors (so GradScaler and the schedulers see the trained tensors); its per-role
vectors and state keep PEFT's layout, so checkpoints do not change.

The views are kept honest: ``.to()``/casts, unpickling or a load with ``assign=True`` give the packed
tensors or a view new storage; ``state_dict()``, ``load_state_dict()`` and `build_optimizer` first check the
storage pointers of all of them, and every fused forward those of the packed tensors, and re-alias (`sync`):
when the packed tensors moved,
their values win (a cast of the trainable parameters); when only a view moved or was replaced (a load that
assigned new tensors), its values are copied into the packed tensors. ``copy.deepcopy`` keeps a copy aliased.

``state_dict()`` of a packed model is the unpacked one: the packed keys are dropped and PEFT's tensors are
contiguous copies (safetensors refuses tensors that share storage or are not contiguous); loads need no packed
key. Gradients flow through the fused forward only: a layer that falls back to PEFT's forward (auxiliary branch
disabled, adapters merged) computes the right values without gradients. `unpack` restores PEFT's own
parameters (the per-tensor optimizers, e.g. bitsandbytes', need them: `build_optimizer` unpacks when the flat
update is off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from .adapters import ModelOrModels, _models

PACK_ATTR = "_bilora_packed"
"""Instance attribute of a packed layer: its `_Packed` record."""
PACKED_A, PACKED_B = "packed_A", "packed_B"
"""Names of the packed parameters on the layer (no "lora_" in them: PEFT's state-dict filters match it)."""
_PACKED_NAMES = (PACKED_A, PACKED_B)


_generation = [0]
"""Counts packings and unpackings (the flat update rebuilds where it reads the adapters from when it changes)."""


class _Packed:
    """A layer's packed layout: which adapters, their ranks, PEFT's parameters with their slices and the storage
    pointers as last aliased. An unpickled layer gets a fresh record and re-aliases at first use."""

    def __init__(self, adapters: Sequence[str], ranks: Sequence[int]) -> None:
        self.adapters = tuple(adapters)
        self.ranks = tuple(ranks)
        self.ptrs: tuple[int, ...] = ()
        self.views: list[tuple[nn.Parameter, str, object]] = []
        self.packed: dict[str, nn.Parameter] = {}

    def __deepcopy__(self, memo: dict) -> _Packed:
        """``copy.deepcopy`` copies every tensor on its own; the layer's tensors are copied before this record
        (it comes last in the layer's ``__dict__``), so the copies' views are pointed at the copied packed
        tensors here: a copy is aliased like its original, and an in-place change of a copied PEFT tensor
        before the copy's first forward is not lost."""
        new = _Packed(self.adapters, self.ranks)
        packed = {name: memo.get(id(t)) for name, t in self.packed.items()}
        views = [(memo.get(id(v)), which, index) for v, which, index in self.views]
        if packed and all(t is not None for t in packed.values()) and all(v is not None for v, _, _ in views):
            for view, which, index in views:
                view.data = packed[which].data[index]
            new.packed, new.views = packed, views
            new.ptrs = _ptrs(packed, views)
        return new

    def __getstate__(self) -> dict:
        return {"adapters": self.adapters, "ranks": self.ranks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["adapters"], state["ranks"])


def no_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def can_pack(layer: nn.Module, adapters: Sequence[str]) -> bool:
    """A fusable Linear LoRA layer (see `fused.can_fuse`) with two or more branches whose weights share device
    and dtype, and without dropout: a layer with dropout runs PEFT's forward in training (each branch draws its
    own mask), which reads PEFT's weights -- views without gradients, once packed."""
    if type(layer) is not LoraLinear or len(adapters) < 2:
        return False
    if not all(no_dropout(layer.lora_dropout[n]) for n in adapters):
        return False
    weights = [layer.lora_A[n].weight for n in adapters] + [layer.lora_B[n].weight for n in adapters]
    return len({(w.device, w.dtype) for w in weights}) == 1


def is_packed(layer: nn.Module) -> bool:
    return PACK_ATTR in layer.__dict__


def _views(layer: LoraLayer, record: _Packed) -> list[tuple[nn.Parameter, str, object]]:
    """PEFT's parameters of the packed adapters, each with the name of its packed tensor and its slice."""
    out, offset = [], 0
    a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
    for name, r in zip(record.adapters, record.ranks):
        out.append((a_mods[name].weight, PACKED_A, slice(offset, offset + r)))
        out.append((b_mods[name].weight, PACKED_B, (slice(None), slice(offset, offset + r))))
        offset += r
    return out


def _ptrs(packed: dict, views: list) -> tuple[int, ...]:
    """Storage pointers of the packed tensors and of PEFT's views (compared to detect new storage)."""
    return (packed[PACKED_A].data_ptr(), packed[PACKED_B].data_ptr(), *(v.data_ptr() for v, _, _ in views))


def pack_layer(layer: LoraLayer, adapters: Sequence[str]) -> None:
    """Give ``layer`` packed storage for ``adapters`` (in this order); PEFT's weights become views of it."""
    record = layer.__dict__.get(PACK_ATTR)
    if record is not None and record.adapters == tuple(adapters):
        return
    unpack_layer(layer)
    a_w = [layer.lora_A[n].weight for n in adapters]
    b_w = [layer.lora_B[n].weight for n in adapters]
    trainable = any(w.requires_grad for w in a_w + b_w)
    with torch.no_grad():
        layer.register_parameter(PACKED_A, nn.Parameter(torch.cat([w.detach() for w in a_w], 0), trainable))
        layer.register_parameter(PACKED_B, nn.Parameter(torch.cat([w.detach() for w in b_w], 1), trainable))
    record = _Packed(adapters, [w.shape[0] for w in a_w])
    layer.__dict__[PACK_ATTR] = record
    _generation[0] += 1
    for w in a_w + b_w:
        w.requires_grad_(False)
    if not getattr(layer, "_bilora_pack_hooks", False):  # registered once; they do nothing once unpacked
        layer.register_state_dict_post_hook(_state_dict_hook)
        layer.register_load_state_dict_pre_hook(_load_pre_hook)
        layer.register_load_state_dict_post_hook(_load_post_hook)
        layer._bilora_pack_hooks = True
    _realias(layer, record, packed_wins=True)


def _realias(layer: LoraLayer, record: _Packed, packed_wins: bool) -> None:
    """Point PEFT's parameters at their slices of the packed tensors again. ``packed_wins=False``: a view that
    got storage of its own (a load with assign=True) is copied into the packed tensors first."""
    params = layer._parameters
    record.views = _views(layer, record)
    record.packed = {name: params[name] for name in _PACKED_NAMES}
    for view, which, index in record.views:
        part = params[which].data[index]
        if not packed_wins and view.data_ptr() != part.data_ptr():
            with torch.no_grad():
                part.copy_(view.detach())
        view.data = part
        view.requires_grad_(False)
    record.ptrs = _ptrs(params, record.views)


def sync_layer(layer: LoraLayer) -> None:
    """Re-alias ``layer`` if the packed tensors or PEFT's views got new storage (or PEFT's parameters were
    replaced, by a load with assign=True, or marked trainable, by PEFT's set_adapter) since it was last
    aliased."""
    record = layer.__dict__.get(PACK_ATTR)
    if record is None:
        return
    views = _views(layer, record)
    replaced = len(views) != len(record.views) or any(
        new is not old for (new, _, _), (old, _, _) in zip(views, record.views)
    )
    current = _ptrs(layer._parameters, views)
    # PEFT's set_adapter marks its weights trainable again: they are views here, the packed tensors train.
    if not replaced and current == record.ptrs and not any(v.requires_grad for v, _, _ in views):
        return
    packed_moved = not record.ptrs or current[:2] != record.ptrs[:2]
    _realias(layer, record, packed_wins=packed_moved and not replaced)


def packed_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(packed_A, packed_B)`` of a packed layer, checked by `sync_layer` (this runs at every fused call);
    None for a layer without packed storage."""
    record = layer.__dict__.get(PACK_ATTR)
    if record is None:
        return None
    params = layer._parameters
    pa, pb = params[PACKED_A], params[PACKED_B]
    # Cheap per-call check: an unpickled layer (not aliased yet), or packed tensors moved or cast. (A view given
    # storage of its own is caught by the full checks of state_dict, load_state_dict and build_optimizer.)
    if not record.ptrs or pa.data_ptr() != record.ptrs[0] or pb.data_ptr() != record.ptrs[1]:
        sync_layer(layer)
    return pa, pb


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict()`` of a packed layer = the unpacked one: no packed keys, PEFT's tensors as contiguous
    copies of their own."""
    record = module.__dict__.get(PACK_ATTR)
    if record is None:
        return
    sync_layer(module)
    for name in _PACKED_NAMES:
        state_dict.pop(prefix + name, None)
    for name in record.adapters:
        for key in (f"{prefix}lora_A.{name}.weight", f"{prefix}lora_B.{name}.weight"):
            if key in state_dict:
                state_dict[key] = state_dict[key].detach().clone(memory_format=torch.contiguous_format)


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loads write into PEFT's parameters in place: make sure they are the packed storage first."""
    sync_layer(module)


def _load_post_hook(module: nn.Module, incompatible_keys) -> None:
    """The packed keys are never required (state dicts hold PEFT's tensors); called with the whole load's
    keys, so every packed name is dropped from the missing ones."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if k.rsplit(".", 1)[-1] not in _PACKED_NAMES]
    if is_packed(module):  # a load with assign=True replaced views: take their values now
        sync_layer(module)


def unpack_layer(layer: LoraLayer) -> None:
    """PEFT's own parameters again (contiguous storage of their own, trainable, gradients copied)."""
    record = layer.__dict__.get(PACK_ATTR)
    if record is None:
        return
    sync_layer(layer)
    params = layer._parameters
    for view, which, index in record.views:
        grad = params[which].grad
        view.data = view.data.clone(memory_format=torch.contiguous_format)
        view.grad = None if grad is None else grad[index].clone(memory_format=torch.contiguous_format)
        view.requires_grad_(params[PACKED_A].requires_grad)
    for name in _PACKED_NAMES:
        del layer._parameters[name]
    del layer.__dict__[PACK_ATTR]
    _generation[0] += 1


def _packed_layers(model: ModelOrModels) -> list[LoraLayer]:
    return [m for root in _models(model) for m in root.modules() if is_packed(m)]


def sync(model: ModelOrModels) -> None:
    """`sync_layer` every packed layer (e.g. after casting the trainable parameters)."""
    for layer in _packed_layers(model):
        sync_layer(layer)


def unpack(model: ModelOrModels) -> int:
    """`unpack_layer` every packed layer of ``model``; returns how many."""
    layers = _packed_layers(model)
    for layer in layers:
        unpack_layer(layer)
    return len(layers)


def packed_sources(model: ModelOrModels) -> tuple[dict[int, tuple[nn.Parameter, object]], int]:
    """For the flat update: ``{id(PEFT parameter): (its packed tensor, its slice)}`` over every packed layer,
    and a token for `packing_changed`."""
    sources = {}
    for layer in _packed_layers(model):  # (synced by the caller: build_optimizer, or pack/unpack itself)
        record = layer.__dict__[PACK_ATTR]
        for view, which, index in record.views:
            sources[id(view)] = (layer._parameters[which], index)
    return sources, _generation[0]


def packing_changed(token: int) -> bool:
    """Whether a layer (of any model) was packed or unpacked since `packed_sources` returned ``token``."""
    return token != _generation[0]


__all__ = [
    "PACKED_A",
    "PACKED_B",
    "can_pack",
    "is_packed",
    "pack_layer",
    "packed_factors",
    "packed_sources",
    "packing_changed",
    "sync",
    "sync_layer",
    "unpack",
    "unpack_layer",
]
