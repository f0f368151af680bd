"""The kohya-format LoRA file (``<output_name>.safetensors``: ``lora_unet_`` + SGM path, ``lora_te1_`` /
``lora_te2_``, ``.lora_down.weight`` / ``.lora_up.weight`` / 0-dim ``.alpha``), the one ComfyUI, A1111 and
Forge users load, and its header (kohya's ``ss_*`` and Stability's ``modelspec.*`` keys, plus how it was made).
The key names themselves come from `bilora_diffusion.sdxl.kohya`; the format is described in docs/lora_formats.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ...config import BiLoRAConfig
from ...errors import ExportError
from ...state import atomic_save_file
from ..kohya import kohya_stem
from .collect import LoraSet

DEFAULT_OUTPUT_NAME = "bilora_sdxl"
"""The kohya file's name (without .safetensors) when the training options give none."""
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
"""The tensors of one kohya module: ``<stem><suffix>``."""
_KOHYA_REQUIRED = {".lora_down.weight", ".lora_up.weight", ".alpha"}


def kohya_state_dict(
    loras: LoraSet, unet_config: Any, save_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """kohya tensors: ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight`` (save_dtype) and a 0-dim float32
    ``<stem>.alpha`` per module (float32 so that e.g. alpha = 8 / 3 is not rounded by fp16); with DoRA also
    ``<stem>.dora_scale``: PEFT's magnitude vector (one norm per output row) as an [out, 1] column
    ([out, 1, 1, 1] for a Conv2d), LyCORIS's output-axis layout that ComfyUI and Forge read."""
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in loras.items():
        for path, lora in modules.items():
            stem = kohya_stem(component, path, unet_config)
            tensors[f"{stem}.lora_down.weight"] = lora.down.to(save_dtype).contiguous()
            tensors[f"{stem}.lora_up.weight"] = lora.up.to(save_dtype).contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
            if lora.magnitude is not None:
                out = lora.up.shape[0]
                shape = (out, 1) if lora.up.dim() == 2 else (out, 1, 1, 1)
                tensors[f"{stem}.dora_scale"] = lora.magnitude.reshape(shape).to(save_dtype).contiguous()
    return tensors


def training_metadata(options: Mapping[str, Any] | None) -> dict[str, str]:
    """Header entries saying how a LoRA was made, from the resolved training options
    (``training_config.yaml`` or the trainer's option dataclass as a dict). Missing keys are skipped."""
    options = options or {}
    fields = {
        "ss_sd_model_name": "pretrained_model_name_or_path",
        "ss_max_train_steps": "max_train_steps",
        "bilora_method": "method",
        "bilora_rho": "rho",
        "bilora_aux_rank": "aux_rank",
        "bilora_aux_alpha": "aux_alpha",
    }
    out: dict[str, str] = {}
    for header, key in fields.items():
        value = options.get(key)
        if value is not None:
            out[header] = value if isinstance(value, str) else json.dumps(value, default=str)
    dataset = next(
        (options[k] for k in ("dataset", "dataset_name", "train_data_dir") if options.get(k)), None
    )
    if dataset is not None:
        out["bilora_dataset"] = dataset if isinstance(dataset, str) else json.dumps(dataset, default=str)
    if options.get("train_text_encoder") is not None:
        out["ss_network_train_unet_only"] = str(not options["train_text_encoder"])
    return out


def kohya_metadata(
    loras: LoraSet,
    configs: Mapping[str, BiLoRAConfig],
    extra: Mapping[str, str] | None = None,
    output_name: str = DEFAULT_OUTPUT_NAME,
) -> dict[str, str]:
    """The header A1111/Forge/ComfyUI read, plus how the file was made. All values strings."""
    main = configs.get("unet") or next(configs[c] for c in loras if c in configs)
    header = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output_name,
        "ss_output_name": output_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(main.rank),
        "ss_network_alpha": str(float(main.alpha)),
        "ss_network_train_unet_only": str(
            not any(c.startswith("text_encoder") and m for c, m in loras.items())
        ),
        "bilora_rho": str(main.rho),
        "bilora_aux_rank": str(main.aux_rank),
        "bilora_aux_alpha": str(float(main.aux_alpha)),
        "bilora_components": ",".join(c for c, m in loras.items() if m),
        "bilora_exported": "primary branch only (W0 + s1·B1·A1)",
    }
    if main.use_dora:
        header["bilora_use_dora"] = "True"
        header["ss_network_args"] = json.dumps({"dora_wd": "True", "wd_on_out": "True"})
    for key, value in (extra or {}).items():
        header[str(key)] = str(value)
    return header


def kohya_stems(keys: Iterable[str], where: str) -> dict[str, set[str]]:
    """stem -> the `KOHYA_SUFFIXES` present for it; a key with none of them is refused (ExportError naming
    ``where`` and the key)."""
    stems: dict[str, set[str]] = {}
    for key in keys:
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ExportError(f"{where}: {key!r} is not a lora_down/lora_up/alpha tensor")
        stems.setdefault(key[: -len(suffix)], set()).add(suffix)
    return stems


def write_kohya(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Check the kohya tensors are complete triples (a loader fails a whole file on an up-only or alpha-only
    module) and write them atomically."""
    stems = kohya_stems(tensors, str(path))
    broken = [s for s, parts in stems.items() if not _KOHYA_REQUIRED <= parts]
    if broken:
        raise ExportError(f"{path}: incomplete modules {broken[:3]}")
    atomic_save_file(tensors, path, metadata)
    return Path(path)
