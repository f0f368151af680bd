"""The full Bi-LoRA state file: both branches of every trained component, for resuming, study and export.

``bilora_adapters.safetensors`` holds one tensor per adapter weight, keyed
``<component>.<branch>.<PEFT key>`` (component: unet, text_encoder, text_encoder_2, model; branch: default or
bilora_aux; PEFT key: ``<module path>.lora_A.weight``), and in its header the `BiLoRAConfig` of each
component. Files are written atomically (temporary file, then rename): a crash never leaves a half file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AUX, PRIMARY, BiLoRAConfig
from .files import umask_file
from .peft_glue import adapter_state_dict, load_adapter_state_dict

STATE_FILE = "bilora_adapters.safetensors"
FORMAT = "bilora-state-v1"


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """`safetensors.torch.save_file` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask_file(tmp)  # mkstemp made it 0600; the file gets the mode of any file the user writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_bilora_state(
    path: str | os.PathLike,
    components: dict[str, nn.Module],
    configs: dict[str, BiLoRAConfig],
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Save both branches of every component (``{"unet": unet, "text_encoder": te1, ...}``)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in components.items():
        for branch in (PRIMARY, AUX):
            for key, value in adapter_state_dict(module, branch).items():
                tensors[f"{name}.{branch}.{key}"] = value
    metadata = {
        "format": FORMAT,
        "configs": json.dumps({name: asdict(configs[name]) for name in components}),
        **(extra_metadata or {}),
    }
    atomic_save_file(tensors, path, metadata)


def read_bilora_state(
    path: str | os.PathLike,
) -> tuple[dict[str, dict[str, dict[str, torch.Tensor]]], dict[str, BiLoRAConfig], dict[str, str]]:
    """Read a state file: ``(tensors[component][branch][peft_key], configs[component], metadata)``.

    Only safetensors is read (no pickle, no code runs); a wrong file raises ValueError naming it."""
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        flat = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Bi-LoRA state file (header format={metadata.get('format')!r})")
    configs = {name: BiLoRAConfig(**cfg) for name, cfg in json.loads(metadata["configs"]).items()}
    tensors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in flat.items():
        component, rest = key.split(".", 1)
        branch, peft_key = rest.split(".", 1)
        tensors.setdefault(component, {}).setdefault(branch, {})[peft_key] = value
    return tensors, configs, metadata


def load_bilora_state(path: str | os.PathLike, components: dict[str, nn.Module]) -> dict[str, str]:
    """Load a state file into attached components (both branches); returns the file's metadata."""
    tensors, _, metadata = read_bilora_state(path)
    missing = set(components) - set(tensors)
    if missing:
        raise ValueError(f"{path}: no adapter tensors for {sorted(missing)}")
    for name, module in components.items():
        for branch, state in tensors[name].items():
            load_adapter_state_dict(module, state, branch)
    return metadata
