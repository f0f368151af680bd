"""bilora-diffusion: Bi-LoRA (sharpness-aware LoRA at LoRA cost) for SDXL and LLM fine-tuning.

Public API (see README.md):

    config = BiLoRAConfig(rank=4, alpha=8, rho=0.05)
    attach_bilora(model, config)                       # primary "default" + auxiliary "bilora_aux"
    optimizer = build_optimizer(model, config, method="bilora", lr=2e-4)
    loss = optimizer.step(closure)                     # closure: forward + backward, returns the loss
    with aux_disabled(model): ...                      # W0 + s1·B1·A1 only (validation, sampling)
    primary_state_dict(model)                          # the LoRA users take away

The algorithm itself: `bilora_diffusion.core` (each rule once, and a plain reference step).
"""

from .adapters import attach_bilora
from .config import AUX, METHODS, PRIMARY, BiLoRAConfig, ConfigError
from .optim import BiLoRAOptimizer, build_optimizer
from .peft_glue import (
    adapter_state_dict,
    adapters_disabled,
    aux_disabled,
    aux_norm,
    bilora_layers,
    load_adapter_state_dict,
    primary_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "AUX",
    "METHODS",
    "PRIMARY",
    "BiLoRAConfig",
    "BiLoRAOptimizer",
    "ConfigError",
    "adapter_state_dict",
    "adapters_disabled",
    "attach_bilora",
    "aux_disabled",
    "aux_norm",
    "bilora_layers",
    "build_optimizer",
    "load_adapter_state_dict",
    "primary_state_dict",
]
