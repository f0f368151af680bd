"""`attach_bilora`: the primary and auxiliary LoRA branches on any torch model.

Each adapted layer then computes ``y = W0·x + s1·B1·A1·x + s2·B2·A2·x`` (s1 = alpha / rank,
s2 = aux_alpha / aux_rank), with both branches as ordinary PEFT adapters (`bilora_diffusion.peft_glue`) and,
by default, the fused forward (`bilora_diffusion.fused`).
"""

from __future__ import annotations

import warnings

from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import AUX, PRIMARY, BiLoRAConfig, ConfigError
from .fused import enable_fused
from .peft_glue import bilora_layers, lora_config, unwrap


def attach_bilora(model: nn.Module, config: BiLoRAConfig) -> nn.Module:
    """Attach the primary adapter "default" and (if ``config.aux_rank > 0``) the auxiliary adapter
    "bilora_aux" to every target module of ``model``, in place, and return the model.

    Works on any torch module (diffusers UNet2DConditionModel, transformers CLIP text encoders and causal LMs,
    a plain ``nn.Module``) through ``peft.inject_adapter_in_model``. The base weights are frozen; the adapters
    are active and trainable; with ``config.fused`` the layers run the fused forward.
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
        layer.set_adapter(branches)  # both active and trainable (the layer-level call takes a list)
    if config.fused:
        enable_fused(target, branches)
    return model


__all__ = ["attach_bilora"]
