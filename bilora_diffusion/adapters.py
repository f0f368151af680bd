"""Attach the primary and auxiliary LoRA branches to any torch model, and read them back.

Both branches are ordinary PEFT LoRA adapters: the primary one is named ``"default"`` (so every stock PEFT,
diffusers and transformers save path exports it and nothing else) and the auxiliary one ``"bilora_aux"``.
Each adapted layer computes

    y = W0·x + s1·B1·A1·x + s2·B2·A2·x          s1 = alpha / rank,  s2 = aux_alpha / aux_rank

with A: [r, in], B: [out, r] (for a Conv2d, A is [r, in, kh, kw] and B is [out, r, 1, 1]).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import AUX, PRIMARY, BiLoRAConfig, ConfigError

ModelOrModels = nn.Module | Iterable[nn.Module]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _models(model: ModelOrModels) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return [unwrap(model)]
    return [unwrap(m) for m in model]


def lora_config(config: BiLoRAConfig, branch: str = PRIMARY) -> LoraConfig:
    """The PEFT `LoraConfig` of one branch. The auxiliary branch always uses PEFT's default init (B2 = 0), so
    the perturbation starts at zero."""
    primary = branch == PRIMARY
    init = config.init if primary else "default"
    return LoraConfig(
        r=config.rank if primary else config.aux_rank,
        lora_alpha=config.alpha if primary else config.aux_alpha,
        target_modules=config.target_modules,
        lora_dropout=config.dropout,
        init_lora_weights=True if init == "default" else init,
    )


def attach_bilora(model: nn.Module, config: BiLoRAConfig) -> nn.Module:
    """Attach the primary adapter "default" and (if ``config.aux_rank > 0``) the auxiliary adapter
    "bilora_aux" to every target module of ``model``, in place, and return the model.

    Works on any torch module (diffusers UNet2DConditionModel, transformers CLIP text encoders and causal LMs,
    a plain ``nn.Module``): it uses ``peft.inject_adapter_in_model``, which needs no model-specific glue. The base
    weights are frozen; both adapters are active and trainable.
    """
    target = unwrap(model)
    if any(isinstance(m, LoraLayer) for m in target.modules()):
        raise ConfigError(
            "the model already has LoRA adapters; attach_bilora expects a model without adapters"
        )
    branches = [PRIMARY] + ([AUX] if config.aux_rank else [])
    for branch in branches:
        with warnings.catch_warnings():
            # PEFT warns when a second adapter is injected into a model that has a peft_config: that is the point.
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            try:
                inject_adapter_in_model(lora_config(config, branch), target, adapter_name=branch)
            except ValueError as err:
                if "not found in the base model" in str(err) or "Target modules" in str(err):
                    raise ConfigError(
                        f"target_modules {config.target_modules!r} matched no module of "
                        f"{type(target).__name__}: {err}"
                    ) from err
                raise
    if hasattr(target, "_hf_peft_config_loaded"):
        # diffusers ModelMixin / transformers PreTrainedModel: their adapter API (disable_adapters,
        # get_adapter_state_dict, save paths) checks this flag, set by their own add_adapter.
        target._hf_peft_config_loaded = True
    for p in target.parameters():
        p.requires_grad_(False)
    for layer in bilora_layers(target):
        # Layer-level set_adapter takes a list (PeftModel.set_adapter takes one name) and marks exactly these
        # adapters trainable.
        layer.set_adapter(branches)
    if config.fused and config.aux_rank:
        from .fused import enable_fused  # fused.py imports this module

        enable_fused(model)
    return model


def bilora_layers(model: ModelOrModels) -> Iterator[LoraLayer]:
    """Every PEFT LoRA layer that carries the primary adapter."""
    for m in _models(model):
        for module in m.modules():
            if isinstance(module, LoraLayer) and (
                PRIMARY in module.lora_A or PRIMARY in module.lora_embedding_A
            ):
                yield module


@dataclass
class LoraPair:
    """The low-rank factors of one branch of one layer. ``A`` [r, in_flat] and ``B`` [out, r] are 2-D views made
    at each access (never cached: wrappers such as DDP may swap a parameter's storage after the pair is built)."""

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


def pair_sq_norms(pairs: list[LoraPair]) -> torch.Tensor:
    """``||s·B·A||_F²`` of every pair, from r×r Gram matrices without forming B·A:
    ``||B·A||_F² = trace(Aᵀ·Bᵀ·B·A) = sum((BᵀB) ⊙ (A·Aᵀ))``. Computed in float32; returns a 1-D tensor."""
    if not pairs:
        return torch.zeros(0)
    norms = []
    for p in pairs:
        a, b = p.A.detach().float(), p.B.detach().float()
        norms.append((p.scale**2) * ((b.T @ b) * (a @ a.T)).sum())
    return torch.stack([n.to(norms[0].device) for n in norms])


def aux_norm(model: ModelOrModels) -> float:
    """c = sqrt(sum_j ||s2·B2_j·A2_j||_F²) over every auxiliary pair of the model(s); 0.0 without one."""
    sq = pair_sq_norms(branch_pairs(model, AUX))
    return float(sq.sum().sqrt()) if sq.numel() else 0.0


@contextlib.contextmanager
def aux_disabled(model: ModelOrModels) -> Iterator[None]:
    """Within this context the model computes exactly ``W0 + s1·B1·A1`` (validation, sampling, export).

    It changes only which adapters are active (not ``requires_grad``), and restores the previous state.
    """
    saved = []
    for layer in bilora_layers(model):
        active = list(layer.active_adapters)
        saved.append((layer, layer._active_adapter))
        layer._active_adapter = [a for a in active if a != AUX]
    try:
        yield
    finally:
        for layer, active in saved:
            layer._active_adapter = active


@contextlib.contextmanager
def adapters_disabled(model: ModelOrModels) -> Iterator[None]:
    """Within this context the model computes the base weights W0 only (the "before" of a comparison)."""
    layers = list(bilora_layers(model))
    saved = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, saved):
            layer._disable_adapters = flag


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
    result = set_peft_model_state_dict(unwrap(model), state, adapter_name=branch)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{len(unexpected)} adapter keys match no module, e.g. {unexpected[:3]}")
