"""The primary LoRA of a training, as plain tensors: out of attached in-memory models (the trainer) or out of a
training output / ``checkpoint-N`` folder (``bilora-export``), plus the meta-device models it is checked against.

The auxiliary branch never leaves training: only the PEFT adapter "default" (``primary_state_dict``) is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...checkpoint import CONFIG_FILE
from ...config import PRIMARY, BiLoRAConfig
from ...errors import ExportError, KeyMapError
from ...peft_glue import bilora_layers, lora_config, primary_state_dict, unwrap
from ...state import STATE_FILE, read_bilora_state
from ..kohya import COMPONENTS, text_encoder_path

MAGNITUDE = "lora_magnitude_vector"
"""PEFT's (and diffusers') key of a DoRA layer's magnitude vector: ``<module>.lora_magnitude_vector``."""
# Inits that rewrite W0 at attach time (W0 <- W0 - s·B0·A0): a plain LoRA on the original W0 is not what was
# trained, so such a run cannot be exported as one.
_W0_REWRITING_INITS = ("pissa", "olora")


@dataclass
class LoraModule:
    """One adapted module of the primary branch: ``delta W = (alpha / rank) · up · down``.

    down: [r, in] (Linear) or [r, in, kh, kw] (Conv2d); up: [out, r] or [out, r, 1, 1]. With DoRA,
    ``magnitude`` is PEFT's magnitude vector (the trained norm of each output row of W0 + delta W): [out]
    (Linear) or [1, out, 1, 1] (Conv2d), and the layer computes ``magnitude · (W0 + delta W) / ||W0 + delta W||``
    (row norms).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LoraSet = dict[str, dict[str, LoraModule]]
"""component ("unet", "text_encoder", "text_encoder_2") -> canonical module path -> LoraModule."""


def canonical_path(component: str, module: str) -> str:
    """Text-encoder paths with the ``text_model.`` level (portable across transformers versions: diffusers
    strips it when the installed CLIPTextModel lacks it, and older transformers need it); UNet paths as is."""
    return text_encoder_path(module) if component.startswith("text_encoder") else module


def lora_modules(
    component: str, state: Mapping[str, torch.Tensor], config: BiLoRAConfig, source: str
) -> dict[str, LoraModule]:
    """Group a primary PEFT state dict (``<module>.lora_A.weight`` / ``.lora_B.weight``, and with
    ``config.use_dora`` ``.lora_magnitude_vector``) into modules.

    Refuses any other tensor (a DoRA magnitude without ``use_dora``, LoRA biases, an auxiliary key): a loader
    would drop or misread it, so the file would not be the model that was trained."""
    if config.init in _W0_REWRITING_INITS:
        raise ExportError(
            f"{source}: {component} was trained with init={config.init!r}, which rewrites the base weights; "
            "its adapter is not a standard LoRA on the original model and cannot be exported as one"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    parts = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}
    if config.use_dora:
        parts[MAGNITUDE] = f".{MAGNITUDE}"
    for key, value in state.items():
        for part, suffix in parts.items():
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            what = "LoRA A/B weight" + (" or DoRA magnitude" if config.use_dora else "")
            if key.endswith(f".{MAGNITUDE}"):
                what += " (a DoRA magnitude, but the config has use_dora=False)"
            raise ExportError(f"{source}: {component} tensor {key!r} is not a {what}; refusing to export it")
    modules: dict[str, LoraModule] = {}
    for path, pair in pairs.items():
        if set(pair) != set(parts):
            raise ExportError(
                f"{source}: {component}.{path} has {sorted(pair)} but not all of {sorted(parts)}"
            )
        try:
            name = canonical_path(component, path)
        except KeyMapError as err:
            raise ExportError(f"{source}: {component}: {err}") from err
        if name in modules:
            raise ExportError(f"{source}: {component}.{path} appears twice (with and without 'text_model.')")
        # On the CPU: the writers and checks below need it, and a LoRA is small.
        down, up = pair["lora_A"].detach().cpu(), pair["lora_B"].detach().cpu()
        magnitude = pair[MAGNITUDE].detach().cpu() if MAGNITUDE in pair else None
        modules[name] = LoraModule(down, up, float(config.alpha), magnitude)
    return modules


def collect_primary(components: Mapping[str, nn.Module], configs: Mapping[str, BiLoRAConfig]) -> LoraSet:
    """The primary branch of attached in-memory models, never an auxiliary tensor."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ExportError(
            f"components {sorted(unknown)} are not SDXL LoRA components ({', '.join(COMPONENTS)})"
        )
    loras: LoraSet = {}
    for name, model in components.items():
        if name not in configs:
            raise ExportError(f"no BiLoRAConfig given for component {name!r}")
        loras[name] = lora_modules(name, primary_state_dict(model), configs[name], f"in-memory {name}")
    return loras


def targeted_modules(model: nn.Module) -> set[str]:
    """Module paths of an attached model that carry the primary adapter."""
    target = unwrap(model)
    layers = set(map(id, bilora_layers(target)))
    return {name for name, m in target.named_modules() if id(m) in layers}


def expected_targets(model: nn.Module, config: BiLoRAConfig) -> set[str]:
    """Module paths of a bare model (a skeleton) that ``config.target_modules`` selects, as PEFT matches them."""
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = lora_config(config, PRIMARY)
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and _is_match(check_target_module_exists(peft_config, name))
    }


def _is_match(result: Any) -> bool:
    # PEFT returns True, a re.Match, None/False, or an _ExcludedModule marker (truthy) for excluded names.
    return bool(result) and type(result).__name__ != "_ExcludedModule"


def read_options(folder: Path) -> dict[str, Any]:
    """``training_config.yaml`` of a training output (or of the parent of a ``checkpoint-N`` folder); {} if
    there is none. Read with ``yaml.safe_load``: no tags, no code."""
    import yaml

    for candidate in (folder / CONFIG_FILE, folder.parent / CONFIG_FILE):
        if candidate.is_file():
            try:
                options = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError as err:
                raise ExportError(f"{candidate}: not valid YAML ({str(err).splitlines()[0]})") from err
            if options is None:
                return {}
            if not isinstance(options, dict):
                raise ExportError(f"{candidate}: expected a mapping of options, got {type(options).__name__}")
            return options
    return {}


def read_training_output(src: str | os.PathLike) -> tuple[LoraSet, dict[str, BiLoRAConfig], dict[str, Any]]:
    """(primary LoRA modules, configs, training options) of a training output or checkpoint folder (or of a
    ``bilora_adapters.safetensors`` given directly). Safetensors and YAML only: a pickle is refused, unread."""
    src = Path(src)
    if not src.exists():
        raise ExportError(f"{src}: no such folder (expected a training output or checkpoint-N folder)")
    state_path = src / STATE_FILE if src.is_dir() else src
    if not state_path.is_file():
        raise ExportError(f"{state_path}: not found (expected a training output or checkpoint-N folder)")
    try:
        tensors, configs, _ = read_bilora_state(state_path)
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{state_path}: {err}") from err
    loras: LoraSet = {}
    for component, branches in tensors.items():
        if component not in COMPONENTS:
            raise ExportError(f"{state_path}: component {component!r} is not an SDXL LoRA component")
        if component not in configs:
            raise ExportError(f"{state_path}: no BiLoRAConfig for {component!r} in the header")
        loras[component] = lora_modules(
            component, branches.get(PRIMARY, {}), configs[component], str(state_path)
        )
    return loras, configs, read_options(state_path.parent)


def skeleton_models(base: str, components: Iterable[str]) -> tuple[dict[str, nn.Module], Any]:
    """Meta-device models built from the base model's configs only (no weights read): enough to check module
    names and shapes. Returns (models, unet config)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    models: dict[str, nn.Module] = {}
    try:
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
        with init_empty_weights():
            for name in components:
                if name == "unet":
                    models[name] = UNet2DConditionModel.from_config(unet_config)
                else:
                    models[name] = classes[name](CLIPTextConfig.from_pretrained(base, subfolder=name))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"cannot read the configs of base model {base!r} ({first}); pass --pretrained_model_name_or_path "
            "with a local SDXL folder"
        ) from err
    return models, unet_config
