"""The optimizer side of the toolkit: `build_optimizer` and the `BiLoRAOptimizer` it returns.

- `optimizer`: the torch Optimizer facade (one method per step: passes, gradient clip, inner step, aux clip);
- `methods`: the methods as strategies (lora, bilora, dual-descent, lora-sam, flat-lora) and their registry;
- `flat`: the flat update (one vector per param group);
- `state_layout`: optimizer state between the per-tensor and the flat layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AUX, AUX_METHODS, METHODS, PRIMARY, BiLoRAConfig, ConfigError
from ..peft_glue import ModelOrModels, bilora_layers, branch_pairs, branch_parameters
from .optimizer import BiLoRAOptimizer
from .state_layout import ROLE


def build_optimizer(
    model: ModelOrModels | list[tuple[nn.Module, float]],
    config: BiLoRAConfig,
    method: str = "bilora",
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-4,
    *,
    max_grad_norm: float | None = None,
    total_steps: int | None = None,
    seed: int = 0,
    flat: bool | None = None,
    **kwargs,
) -> BiLoRAOptimizer:
    """A torch optimizer that trains the adapters of ``model`` with ``method``.

    Args:
        model: an attached model, several (e.g. UNet and text encoders), or ``(model, lr)`` pairs to give a
            model its own learning rate (diffusers' ``--text_encoder_lr``).
        config: the adapters' config; its rho, clip, aux_lr and aux_weight_decay are used here.
        method: one of lora, bilora, dual-descent, lora-sam, flat-lora.
        optimizer_cls: the inner optimizer class for both groups (the auxiliary one with ``maximize=True``
            under bilora, or negated gradients where the class has no ``maximize``).
        lr: learning rate of the primary group (the auxiliary group uses ``config.aux_lr`` or this).
        max_grad_norm: clip each group's gradient norm separately before the update.
        total_steps: number of optimizer steps T (flat-lora's ramp needs it).
        seed: seed of flat-lora's noise.
        flat: the flat update (`optim.flat`): None = wherever it gives the same steps (torch's AdamW, Adam,
            SGD; one device and dtype per group), False = the inner optimizer steps every tensor.
        kwargs: passed to ``optimizer_cls`` (betas, eps, weight_decay, ...); weight_decay applies to the
            primary group, ``config.aux_weight_decay`` to the auxiliary one.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    entries = [model] if isinstance(model, nn.Module) else list(model)
    pairs = [e if isinstance(e, tuple) else (e, lr) for e in entries]
    modules = [m for m, _ in pairs]
    has_aux = bool(branch_pairs(modules, AUX))
    if method in AUX_METHODS and not has_aux:
        raise ConfigError(f"method {method!r} needs the auxiliary adapter: attach with aux_rank > 0")
    if method not in AUX_METHODS and has_aux:
        raise ConfigError(
            f"method {method!r} trains no auxiliary branch: attach with aux_rank = 0 "
            f"(BiLoRAConfig.for_method({method!r}) does that)"
        )
    if method == "flat-lora" and not total_steps:
        raise ConfigError("method 'flat-lora' needs total_steps (max_train_steps) for its noise ramp")
    if not any(True for _ in bilora_layers(modules)):
        raise ConfigError("the model has no Bi-LoRA adapters: call attach_bilora(model, config) first")
    groups = []
    for module, module_lr in pairs:
        groups.append({"params": branch_parameters(module, PRIMARY), "lr": module_lr, ROLE: "primary"})
        if has_aux:
            aux = {"params": branch_parameters(module, AUX), "lr": config.aux_lr or module_lr, ROLE: "aux"}
            aux["weight_decay"] = config.aux_weight_decay
            groups.append(aux)
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if (
        optimizer_cls is torch.optim.AdamW
        and "foreach" not in kwargs
        and "fused" not in kwargs
        and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    ):
        kwargs["fused"] = True  # torch's fused AdamW: one kernel over every adapter tensor, same result
    return BiLoRAOptimizer(
        groups,
        modules,
        config,
        method,
        optimizer_cls,
        max_grad_norm=max_grad_norm,
        total_steps=total_steps,
        seed=seed,
        flat=flat,
        lr=lr,
        **kwargs,
    )


__all__ = ["BiLoRAOptimizer", "build_optimizer"]
