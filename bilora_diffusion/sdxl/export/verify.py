"""Checking an untrusted SDXL LoRA file (diffusers or kohya format) against a pipeline's models before any
loader sees it (``bilora-generate``): safetensors only (the header is parsed, no pickle), every key an SDXL
LoRA key of a module that exists, complete down/up pairs, shapes that fit, kohya alphas 0-dim and > 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from ...errors import ExportError, KeyMapError
from ...state import STATE_FILE
from ..kohya import kohya_stem
from .collect import MAGNITUDE
from .diffusers import DIFFUSERS_FILE
from .kohya import kohya_stems
from .validate import expected_shapes, find_module, magnitude_shape


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA file at ``path``: the file itself, or in a folder ``pytorch_lora_weights.safetensors`` or its only
    ``.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"{path}: no such LoRA file or folder")
    if (path / DIFFUSERS_FILE).is_file():
        return path / DIFFUSERS_FILE
    candidates = sorted(p for p in path.glob("*.safetensors") if p.name != STATE_FILE)
    if len(candidates) != 1:
        raise ExportError(
            f"{path}: expected {DIFFUSERS_FILE} or exactly one .safetensors LoRA file, found "
            f"{[p.name for p in candidates]}"
        )
    return candidates[0]


def lora_file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and header of a safetensors file, from its header alone (no tensor data, no pickle)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            return shapes, f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ExportError(
            f"{path}: not a safetensors file ({err}); LoRA files are read as safetensors only"
        ) from err


def _diffusers_module(key: str) -> tuple[str, str, str] | None:
    """(component, module path, "down"|"up") of a diffusers-format LoRA key, or None."""
    component, _, rest = key.partition(".")
    for suffix, part in (
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
    ):
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], part
    return None


def _check_pair(path: Path, where: str, module: nn.Module | None, down: tuple, up: tuple) -> None:
    if module is None:
        raise ExportError(
            f"{path}: {where} matches no module of this SDXL pipeline (a LoRA for another model?)"
        )
    expected = expected_shapes(module, down[0] if down else 0)
    if expected is None or (tuple(down), tuple(up)) != expected:
        raise ExportError(
            f"{path}: {where} has down/up shapes {(tuple(down), tuple(up))}, the module needs {expected} "
            "(a LoRA for another model?)"
        )


def _check_kohya_file(
    file: Path, shapes: Mapping[str, tuple], models: Mapping[str, nn.Module], unet_config: Any
) -> None:
    table: dict[str, tuple[str, str]] = {}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                try:
                    table[kohya_stem(component, name, unet_config)] = (component, name)
                except KeyMapError:
                    continue
    stems = kohya_stems(shapes, str(file))
    dora = [stem for stem, parts in stems.items() if ".dora_scale" in parts]
    if dora:
        raise ExportError(
            f"{file}: {dora[0]}.dora_scale: a kohya-format DoRA, whose dora_scale diffusers' loader drops (the "
            f"images would not be the model's); use the diffusers-format file ({DIFFUSERS_FILE}) instead"
        )
    alphas = [f"{stem}.alpha" for stem, parts in stems.items() if ".alpha" in parts]
    with safe_open(str(file), framework="pt") as f:
        bad = [k for k in alphas if shapes[k] != () or not float(f.get_tensor(k)) > 0]
    if bad:
        raise ExportError(f"{file}: {bad[0]} must be a 0-dim value > 0")
    for stem, parts in sorted(stems.items()):
        if not {".lora_down.weight", ".lora_up.weight"} <= parts:
            raise ExportError(f"{file}: {stem} is not a complete lora_down + lora_up module")
        if stem not in table:
            raise ExportError(
                f"{file}: {stem} matches no module of this SDXL pipeline (a LoRA for another model?)"
            )
        component, name = table[stem]
        down, up = shapes[f"{stem}.lora_down.weight"], shapes[f"{stem}.lora_up.weight"]
        _check_pair(file, stem, find_module(models[component], component, name), down, up)


def _check_diffusers_file(file: Path, shapes: Mapping[str, tuple], models: Mapping[str, nn.Module]) -> None:
    pairs: dict[tuple[str, str], dict[str, tuple]] = {}
    magnitudes: dict[tuple[str, str], tuple] = {}
    for key, shape in shapes.items():
        component, _, rest = key.partition(".")
        if rest.endswith(f".{MAGNITUDE}") and component in models:
            magnitudes[(component, rest[: -len(MAGNITUDE) - 1])] = tuple(shape)
            continue
        parsed = _diffusers_module(key)
        if parsed is None or parsed[0] not in models:
            raise ExportError(
                f"{file}: {key!r} is not an SDXL LoRA key (unet., text_encoder., text_encoder_2.)"
            )
        pairs.setdefault(parsed[:2], {})[parsed[2]] = shape
    for (component, name), pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            raise ExportError(
                f"{file}: {component}.{name} lacks its {'up' if 'down' in pair else 'down'} weight"
            )
        module = find_module(models[component], component, name)
        _check_pair(file, f"{component}.{name}", module, pair["down"], pair["up"])
    for (component, name), shape in sorted(magnitudes.items()):
        module = find_module(models[component], component, name)
        if (component, name) not in pairs or module is None:
            raise ExportError(f"{file}: {component}.{name}.{MAGNITUDE} has no LoRA down/up weights")
        if shape != magnitude_shape(module):
            raise ExportError(
                f"{file}: {component}.{name}.{MAGNITUDE} has shape {shape}, the module needs "
                f"{magnitude_shape(module)} (a LoRA for another model?)"
            )


def check_lora_file(
    path: str | os.PathLike, models: Mapping[str, nn.Module], unet_config: Any
) -> tuple[Path, str]:
    """Check an untrusted SDXL LoRA file (diffusers or kohya format) against the pipeline's models before any
    loader sees it: safetensors only (the header is parsed, no pickle), every key an SDXL LoRA key of a module
    that exists, complete down/up pairs, shapes that fit, kohya alphas 0-dim and > 0.
    Returns (file, "diffusers" | "kohya"); raises ExportError naming the first problem."""
    file = lora_file(path)
    shapes, _ = lora_file_shapes(file)
    if not shapes:
        raise ExportError(f"{file}: no tensors")
    if all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in shapes):
        _check_kohya_file(file, shapes, models, unet_config)
        return file, "kohya"
    _check_diffusers_file(file, shapes, models)
    return file, "diffusers"
