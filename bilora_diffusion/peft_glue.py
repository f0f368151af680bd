"""How the two branches live in PEFT, and how to read them back: the glue every other module uses.

Both branches are ordinary PEFT LoRA adapters on the same layers: the primary one is named ``"default"`` (so
every stock PEFT, diffusers and transformers save path exports it and nothing else) and the auxiliary one
``"bilora_aux"``. A: [r, in] (a Conv2d's [r, in, kh, kw]), B: [out, r] ([out, r, 1, 1]). Everything here reads
PEFT through its public layer API (``active_adapters``, ``set_adapter``, ``enable_adapters``, ``lora_A``,
``lora_B``, ``scaling``, ``get_peft_model_state_dict``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.distributed.fsdp import FSDPModule

from .config import AUX, PRIMARY, BiLoRAConfig
from .core import block_sq_norms

ModelOrModels = nn.Module | Iterable[nn.Module]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def models_of(model: ModelOrModels) -> list[nn.Module]:
    """One model or several (e.g. a UNet and its text encoders) as a list of unwrapped modules."""
    if isinstance(model, nn.Module):
        return [unwrap(model)]
    return [unwrap(m) for m in model]


def lora_config(config: BiLoRAConfig, branch: str = PRIMARY) -> LoraConfig:
    """The PEFT `LoraConfig` of one branch. The auxiliary branch always uses PEFT's default init (B2 = 0), so
    the perturbation starts at zero, and is always plain LoRA (``use_dora`` makes only the primary DoRA)."""
    primary = branch == PRIMARY
    init = config.init if primary else "default"
    return LoraConfig(
        r=config.rank if primary else config.aux_rank,
        lora_alpha=config.alpha if primary else config.aux_alpha,
        target_modules=config.target_modules,
        lora_dropout=config.dropout,
        init_lora_weights=True if init == "default" else init,
        use_dora=config.use_dora and primary,
    )


def bilora_layers(model: ModelOrModels) -> Iterator[LoraLayer]:
    """Every PEFT LoRA layer that carries the primary adapter."""
    for m in models_of(model):
        for module in m.modules():
            if isinstance(module, LoraLayer) and (
                PRIMARY in module.lora_A or PRIMARY in module.lora_embedding_A
            ):
                yield module


@dataclass
class LoraPair:
    """The low-rank factors of one branch of one layer: PEFT's parameters ``A_param``, ``B_param`` and, as 2-D
    views made at each access (wrappers such as DDP may swap a parameter's storage), ``A`` [r, in_flat] and
    ``B`` [out, r]."""

    A_param: torch.Tensor
    B_param: torch.Tensor
    scale: float
    embedding: bool = False

    @property
    def A(self) -> torch.Tensor:
        return self.A_param if self.embedding else self.A_param.reshape(self.A_param.shape[0], -1)

    @property
    def B(self) -> torch.Tensor:
        return self.B_param if self.embedding else self.B_param.reshape(self.B_param.shape[0], -1)


def lora_pair(layer: LoraLayer, branch: str) -> LoraPair | None:
    """The (A, B, scale) of ``branch`` in ``layer``, or None if the layer does not carry it."""
    if branch in layer.lora_A:
        return LoraPair(layer.lora_A[branch].weight, layer.lora_B[branch].weight, layer.scaling[branch])
    if branch in layer.lora_embedding_A:
        a, b = layer.lora_embedding_A[branch], layer.lora_embedding_B[branch]
        return LoraPair(a, b, layer.scaling[branch], embedding=True)
    return None


def branch_pairs(model: ModelOrModels, branch: str) -> list[LoraPair]:
    """The factor pairs of ``branch`` in every adapted layer, in module order."""
    pairs = (lora_pair(layer, branch) for layer in bilora_layers(model))
    return [p for p in pairs if p is not None]


def branch_parameters(model: ModelOrModels, branch: str) -> list[nn.Parameter]:
    """The trainable parameters of one branch (A and B of every layer, plus DoRA magnitudes if any)."""
    params: list[nn.Parameter] = []
    for layer in bilora_layers(model):
        pair = lora_pair(layer, branch)
        if pair is not None:
            params += [pair.A_param, pair.B_param]
        magnitude = getattr(layer, "lora_magnitude_vector", {})
        if branch in magnitude:
            params += list(magnitude[branch].parameters())
    return params


def shape_blocks(pairs: list[LoraPair]) -> dict[tuple, list[int]]:
    """Indices of ``pairs`` grouped by (A shape, B shape, device): the blocks the Gram norms are batched over
    (a handful on SDXL instead of one small computation per adapted layer)."""
    blocks: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        blocks.setdefault((p.A.shape, p.B.shape, p.A.device), []).append(i)
    return blocks


def pair_sq_norms(pairs: list[LoraPair]) -> torch.Tensor:
    """``||s·B·A||_F²`` of every pair (`core.block_sq_norms`, one batched computation per block of equally
    shaped pairs), in float32 at least; a 1-D tensor in the order of ``pairs``."""
    if not pairs:
        return torch.zeros(0)
    device = pairs[0].A.device
    out = torch.empty(len(pairs), dtype=torch.promote_types(pairs[0].A.dtype, torch.float32), device=device)
    for indices in shape_blocks(pairs).values():
        a = torch.stack([pairs[i].A.detach() for i in indices])  # [n, r, in]
        b = torch.stack([pairs[i].B.detach() for i in indices])  # [n, out, r]
        scales = torch.tensor([pairs[i].scale ** 2 for i in indices], dtype=torch.float64, device=a.device)
        out[torch.tensor(indices, device=device)] = block_sq_norms(a, b, scales).to(device, out.dtype)
    return out


def aux_norm(model: ModelOrModels) -> float:
    """c = sqrt(sum_j ||s2·B2_j·A2_j||_F²) over every auxiliary pair of the model(s); 0.0 without one."""
    sq = pair_sq_norms(branch_pairs(model, AUX))
    return float(sq.sum().sqrt()) if sq.numel() else 0.0


@contextlib.contextmanager
def _layers_restored(layers: list[LoraLayer]) -> Iterator[None]:
    """Restore each layer's active adapters, enabled state and adapter ``requires_grad`` flags on exit (PEFT's
    ``set_adapter`` and ``enable_adapters`` change ``requires_grad``)."""
    saved = [
        (
            layer,
            list(layer.active_adapters),
            layer.disable_adapters,
            [p.requires_grad for p in layer.parameters()],
        )
        for layer in layers
    ]
    try:
        yield
    finally:
        for layer, active, disabled, flags in saved:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
            for p, flag in zip(layer.parameters(), flags):
                p.requires_grad_(flag)


@contextlib.contextmanager
def aux_disabled(model: ModelOrModels) -> Iterator[None]:
    """Within this context the model computes exactly ``W0 + s1·B1·A1`` (validation, sampling, export).
    Everything it changes (active adapters, ``requires_grad``) is restored on exit."""
    layers = list(bilora_layers(model))
    with _layers_restored(layers):
        for layer in layers:
            layer.set_adapter([a for a in layer.active_adapters if a != AUX])
        yield


@contextlib.contextmanager
def adapters_disabled(model: ModelOrModels) -> Iterator[None]:
    """Within this context the model computes the base weights W0 only (the "before" of a comparison)."""
    layers = list(bilora_layers(model))
    with _layers_restored(layers):
        for layer in layers:
            layer.enable_adapters(False)
        yield


def adapter_state_dict(model: nn.Module, branch: str = PRIMARY) -> dict[str, torch.Tensor]:
    """One branch's tensors with PEFT key names (``<module>.lora_A.weight``, adapter name removed)."""
    target = unwrap(model)
    if branch not in getattr(target, "peft_config", {}):
        return {}
    state = get_peft_model_state_dict(target, adapter_name=branch)
    return {k: v.detach() for k, v in state.items()}


def primary_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The primary adapter only, PEFT key names; never an auxiliary tensor."""
    state = adapter_state_dict(model, PRIMARY)
    leaked = [k for k in state if AUX in k]
    if leaked:  # a guard on PEFT's key filtering, which matches adapter names as substrings
        raise RuntimeError(f"auxiliary tensors in the primary state dict: {leaked[:3]}")
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], branch: str = PRIMARY) -> None:
    """Load one branch's tensors (PEFT key names) into an attached model; every key must match."""
    target = unwrap(model)
    if any(isinstance(m, FSDPModule) for m in target.modules()):
        _copy_into(target, state, branch)  # FSDP's load_state_dict hooks expect its sharded parameters
        return
    result = set_peft_model_state_dict(target, state, adapter_name=branch)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{len(unexpected)} adapter keys match no module, e.g. {unexpected[:3]}")


def _copy_into(model: nn.Module, state: dict[str, torch.Tensor], branch: str) -> None:
    """``state`` (PEFT key names: the parameter names without ``.<branch>``) copied into the parameters."""
    params = {
        name.replace(f".{branch}.", ".", 1): p
        for name, p in model.named_parameters()
        if f".{branch}." in name
    }
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise ValueError(f"{len(unexpected)} adapter keys match no module, e.g. {unexpected[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
