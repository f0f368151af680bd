"""What is checked before a byte is written: the export options, and every module of a LoRA against the model
it is for (it exists, is a Linear or an ungrouped Conv2d, shapes and rank fit, alpha > 0, values finite, and
with the kohya format a name loaders accept). The shape helpers also serve `verify` (untrusted files).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...config import BiLoRAConfig
from ...errors import ExportError, KeyMapError
from ..kohya import stem_table
from .collect import LoraSet, canonical_path

FORMATS = ("diffusers", "kohya", "both")
"""Values of --format."""
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Values of --save_dtype and their torch dtypes."""


def resolve_dtype(save_dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype of --save_dtype (a name of `SAVE_DTYPES` or one of its dtypes)."""
    if isinstance(save_dtype, torch.dtype):
        if save_dtype not in SAVE_DTYPES.values():
            raise ExportError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype}")
        return save_dtype
    if save_dtype not in SAVE_DTYPES:
        raise ExportError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    return SAVE_DTYPES[save_dtype]


def find_module(model: nn.Module, component: str, path: str) -> nn.Module | None:
    """The base layer at ``path`` (a canonical path), trying the text encoder's path with and without the
    ``text_model.`` level; None if the model has no such module."""
    candidates = [path]
    if component.startswith("text_encoder"):
        candidates.append(path.removeprefix("text_model."))
    for candidate in candidates:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        get_base = getattr(module, "get_base_layer", None)
        return get_base() if callable(get_base) else module
    return None


def magnitude_shape(module: nn.Module) -> tuple[int, ...]:
    """PEFT's DoRA magnitude shape on ``module``: [out] (Linear) or [1, out, 1, 1] (Conv2d)."""
    if isinstance(module, nn.Conv2d):
        return (1, module.out_channels, 1, 1)
    return (module.out_features,)


def expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(down, up) shapes of a rank-``rank`` LoRA on ``module``, as kohya and PEFT lay them out."""
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return None


def validate(
    loras: LoraSet,
    configs: Mapping[str, BiLoRAConfig],
    models: Mapping[str, nn.Module],
    *,
    expected: Mapping[str, set[str]] | None = None,
    unet_config: Any = None,
    kohya: bool = True,
    source: str = "export",
) -> None:
    """Refuse (ExportError) anything a loader would ignore or misread, before anything is written.

    Per module: it exists in the component's model, is a Linear or an ungrouped Conv2d, down/up shapes match
    it, rank equals the config's rank, alpha > 0, all values finite; per component: every module in
    ``expected`` (the targeted modules) is present; with ``kohya``: every module has a kohya name loaders
    accept, and no two share one."""
    if not any(loras.values()):
        raise ExportError(f"{source}: no LoRA tensors of the primary branch to export")
    for component, modules in loras.items():
        model, config = models.get(component), configs[component]
        if model is None:
            raise ExportError(f"{source}: no {component} model to check the {component} LoRA against")
        for path, lora in modules.items():
            where = f"{source}: {component}.{path}"
            module = find_module(model, component, path)
            if module is None:
                raise ExportError(
                    f"{where}: no such module in {type(model).__name__} (not this model's LoRA?)"
                )
            shapes = expected_shapes(module, lora.rank)
            if shapes is None:
                raise ExportError(
                    f"{where}: {type(module).__name__} is not a Linear or Conv2d; loaders skip it"
                )
            got = (tuple(lora.down.shape), tuple(lora.up.shape))
            if got != shapes:
                raise ExportError(f"{where}: down/up shapes {got} do not fit the module (expected {shapes})")
            if lora.rank != config.rank:
                raise ExportError(f"{where}: rank {lora.rank} != configured rank {config.rank}")
            if not (math.isfinite(lora.alpha) and lora.alpha > 0):
                raise ExportError(f"{where}: alpha must be > 0, got {lora.alpha}")
            if not (torch.isfinite(lora.down).all() and torch.isfinite(lora.up).all()):
                raise ExportError(f"{where}: NaN or Inf in the LoRA weights")
            if (lora.magnitude is not None) != bool(config.use_dora):
                raise ExportError(
                    f"{where}: use_dora={config.use_dora} but the module "
                    f"{'has' if lora.magnitude is not None else 'lacks'} a DoRA magnitude vector"
                )
            if lora.magnitude is not None:
                if tuple(lora.magnitude.shape) != magnitude_shape(module):
                    raise ExportError(
                        f"{where}: DoRA magnitude of shape {tuple(lora.magnitude.shape)} does not fit the "
                        f"module (expected {magnitude_shape(module)})"
                    )
                if not torch.isfinite(lora.magnitude).all():
                    raise ExportError(f"{where}: NaN or Inf in the DoRA magnitude vector")
        if expected is not None and component in expected:
            missing = {canonical_path(component, p) for p in expected[component]} - set(modules)
            if missing:
                raise ExportError(
                    f"{source}: {component}: {len(missing)} targeted modules have no LoRA tensors, "
                    f"e.g. {sorted(missing)[:3]}"
                )
    if kohya:
        try:
            stem_table({c: list(m) for c, m in loras.items()}, unet_config)
        except KeyMapError as err:
            raise ExportError(f"{source}: kohya format: {err}") from err
