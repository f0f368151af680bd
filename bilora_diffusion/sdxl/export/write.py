"""Export entry points: `export_lora` (the trainer, with in-memory models) and `export_from_folder` (a
training output or ``checkpoint-N`` folder, for ``bilora-export``). Both validate everything first
(`write_lora`), then write the requested formats atomically; nothing is written unless every check passes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...checkpoint import CHECKPOINT_RE, CONFIG_FILE
from ...config import BiLoRAConfig
from ...errors import ExportError
from ...hub import resolve_base_model
from ...peft_glue import unwrap
from ..single_file import config_dir, is_single_file
from .collect import (
    LoraSet,
    collect_primary,
    expected_targets,
    read_training_output,
    skeleton_models,
    targeted_modules,
)
from .diffusers import DIFFUSERS_FILE, FUSED_DIR, fuse_into_pipeline, write_diffusers
from .kohya import DEFAULT_OUTPUT_NAME, kohya_metadata, kohya_state_dict, training_metadata, write_kohya
from .validate import FORMATS, resolve_dtype, validate


def write_lora(
    output_dir: str | os.PathLike,
    loras: LoraSet,
    configs: Mapping[str, BiLoRAConfig],
    models: Mapping[str, nn.Module],
    *,
    expected: Mapping[str, set[str]] | None = None,
    unet_config: Any = None,
    format: str = "both",
    save_dtype: torch.dtype | str = torch.float32,
    metadata: Mapping[str, str] | None = None,
    output_name: str = DEFAULT_OUTPUT_NAME,
    source: str = "export",
) -> list[Path]:
    """Validate ``loras`` against ``models`` (real or meta-device skeletons), then write the requested formats.
    Nothing is written unless every check passes."""
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    dtype = resolve_dtype(save_dtype)
    if not output_name or os.sep in output_name or output_name.startswith("."):
        raise ExportError(f"--output_name must be a plain file name, got {output_name!r}")
    kohya = format in ("kohya", "both")
    validate(loras, configs, models, expected=expected, unet_config=unet_config, kohya=kohya, source=source)
    tensors = kohya_state_dict(loras, unet_config, dtype) if kohya else {}
    header = kohya_metadata(loras, configs, metadata, output_name) if kohya else {}
    written: list[Path] = []
    if format in ("diffusers", "both"):
        written.append(write_diffusers(output_dir, loras, configs, dtype))
    if kohya:
        written.append(write_kohya(Path(output_dir) / f"{output_name}.safetensors", tensors, header))
    return written


def export_lora(
    output_dir: str | os.PathLike,
    components: Mapping[str, nn.Module],
    configs: Mapping[str, BiLoRAConfig],
    *,
    format: str = "both",
    save_dtype: torch.dtype | str = torch.float32,
    metadata: Mapping[str, str] | None = None,
    output_name: str = DEFAULT_OUTPUT_NAME,
) -> list[Path]:
    """Export the primary branch of attached in-memory models (what the trainer calls at the end of training).

    ``components``: ``{"unet": unet, "text_encoder": te1, "text_encoder_2": te2}`` (text encoders only if they
    were trained; DDP/compile wrappers are unwrapped); ``configs``: their `BiLoRAConfig`; ``metadata``: extra
    kohya header entries (e.g. ``training_metadata(options)``). Returns the written files."""
    loras = collect_primary(components, configs)
    models = {name: unwrap(model) for name, model in components.items()}
    unet_config = getattr(models.get("unet"), "config", None)
    expected = {name: targeted_modules(model) for name, model in models.items()}
    return write_lora(
        output_dir,
        loras,
        configs,
        models,
        expected=expected,
        unet_config=unet_config,
        format=format,
        save_dtype=save_dtype,
        metadata=metadata,
        output_name=output_name,
        source="export",
    )


def default_output(src: str | os.PathLike, save_dtype: str, fuse: bool = False) -> Path:
    """Where ``bilora-export`` writes without ``--output``: a new folder next to what it reads, never the
    training output itself — ``RUN/export-<dtype>[-fused]``, or for ``RUN/checkpoint-N``
    ``RUN/export-checkpoint-N-<dtype>[-fused]`` (checkpoint rotation deletes checkpoint folders whole)."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    name = f"{save_dtype}-fused" if fuse else str(save_dtype)
    if CHECKPOINT_RE.match(folder.name):
        return folder.parent / f"export-{folder.name}-{name}"
    return folder / f"export-{name}"


def _existing_targets(out: Path, format: str, fuse: bool, output_name: str) -> list[Path]:
    targets = []
    if format in ("diffusers", "both"):
        targets.append(out / DIFFUSERS_FILE)
    if format in ("kohya", "both"):
        targets.append(out / f"{output_name}.safetensors")
    if fuse:
        targets.append(out / FUSED_DIR)
    return [t for t in targets if t.exists()]


def export_from_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "both",
    fuse: bool = False,
    save_dtype: torch.dtype | str = torch.float32,
    output_name: str | None = None,
    pretrained_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Export a training output or ``checkpoint-N`` folder (``bilora_adapters.safetensors`` +
    ``training_config.yaml``). The LoRA is checked against meta-device models built from the base model's
    configs; only ``fuse`` loads real weights. ``output_name`` / ``pretrained_model_name_or_path`` default to
    the training options. A file or ``fused/`` folder that already exists in ``out`` (e.g. the training's own
    LoRA files) is refused unless ``overwrite``. Returns the written files (and the fused folder)."""
    loras, configs, options = read_training_output(src)
    output_name = output_name or str(options.get("output_name") or DEFAULT_OUTPUT_NAME)
    existing = [] if overwrite else _existing_targets(Path(out), format, fuse, output_name)
    if existing:
        raise ExportError(
            f"{existing[0]} exists (a training output?); pass --overwrite to replace it, or another --output"
        )
    flag = "--pretrained_model_name_or_path"
    base = pretrained_model_name_or_path
    if not base:
        base = options.get("pretrained_model_name_or_path")
        flag = f"base model (pretrained_model_name_or_path of {CONFIG_FILE})"
    if not base:
        raise ExportError(
            f"{src}: {CONFIG_FILE} gives no pretrained_model_name_or_path; pass --pretrained_model_name_or_path"
        )
    base = str(base)
    resolve_base_model(base, "sdxl", flag=flag)
    configs_from = base
    if is_single_file(base):
        # One SGM-layout file: its configs come from the run's --single_file_config (or the shipped ones).
        configs_from = str(config_dir(options.get("single_file_config")))
        if fuse:
            raise ExportError(
                f"{flag} {base}: --fuse needs a diffusers base folder; a single-file base takes the LoRA file "
                "itself (bilora_sdxl.safetensors in ComfyUI / A1111)"
            )
    models, unet_config = skeleton_models(configs_from, [c for c, m in loras.items() if m])
    expected = {name: expected_targets(model, configs[name]) for name, model in models.items()}
    extra = training_metadata({**options, "pretrained_model_name_or_path": base})
    written = write_lora(
        out,
        loras,
        configs,
        models,
        expected=expected,
        unet_config=unet_config,
        format=format,
        save_dtype=save_dtype,
        metadata=extra,
        output_name=output_name,
        source=str(src),
    )
    if fuse:
        written.append(fuse_into_pipeline(base, loras, configs, out, save_dtype))
    return written
