"""The diffusers-format LoRA file (``pytorch_lora_weights.safetensors``, written by
``StableDiffusionXLPipeline.save_lora_weights`` with the adapter metadata that carries alpha, so that
``pipe.load_lora_weights(dir)`` reads it at the right scale), and a base pipeline with the LoRA fused in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...config import BiLoRAConfig
from ...errors import ExportError
from ...files import umask_file, umask_tree
from ..components import cast, dtype_kwargs
from .collect import MAGNITUDE, LoraModule, LoraSet
from .validate import resolve_dtype

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
"""The diffusers-format LoRA file's name (what ``load_lora_weights(folder)`` looks for)."""
FUSED_DIR = "fused"
"""The fused pipeline's folder in an export's output folder."""


def adapter_metadata(modules: Mapping[str, LoraModule], config: BiLoRAConfig, component: str) -> dict:
    """The ``LoraConfig`` kwargs diffusers rebuilds the adapter from at load time (``LoraConfig(**metadata)``).

    Deliberately minimal rather than ``peft_config.to_dict()``: every key here exists in old PEFT versions (an
    unknown key makes the loader's LoraConfig raise), ``init_lora_weights`` is True whatever the training used
    (the loader would otherwise re-run e.g. PiSSA's init on the user's weights), and ``target_modules`` lists
    exactly the exported modules (text encoders without ``text_model.``, which PEFT's suffix match finds in
    both transformers layouts), so no empty adapter is injected anywhere else."""
    names = sorted(p.removeprefix("text_model.") if component != "unet" else p for p in modules)
    return {
        "r": config.rank,
        "lora_alpha": float(config.alpha),
        "target_modules": names,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": bool(config.use_dora),
        "use_rslora": False,
    }


def _diffusers_spelling(
    component: str, peft_state: dict[str, torch.Tensor], convert: Any
) -> dict[str, torch.Tensor]:
    """``convert_state_dict_to_diffusers`` as diffusers' training scripts apply it, except for a UNet whose
    result mixes spellings: it renames only attention projections (``to_q.lora.down``) and leaves e.g.
    ``ff.net.2.lora_A`` as is, and diffusers' UNet loader (``load_lora_adapter``) decides from the FIRST key
    alone whether to convert back, so a mixed file loads with part of its LoRA silently dropped. The PEFT
    spelling (``lora_A`` / ``lora_B``) loads whole, so such a UNet keeps it. (The text-encoder loader converts
    every key, so mixed ``q_proj.lora_linear_layer`` / ``fc1.lora_A`` text-encoder keys load fine.)"""
    converted = convert(dict(peft_state))
    if component != "unet":
        return converted
    # DoRA magnitudes (``.lora_magnitude_vector``) have one spelling in both; only the factors decide.
    peft_style = [".lora_A." in k or ".lora_B." in k for k in converted if not k.endswith(f".{MAGNITUDE}")]
    return converted if all(peft_style) or not any(peft_style) else peft_state


def write_diffusers(
    output_dir: str | os.PathLike,
    loras: LoraSet,
    configs: Mapping[str, BiLoRAConfig],
    save_dtype: torch.dtype = torch.float32,
) -> Path:
    """``pytorch_lora_weights.safetensors`` through ``StableDiffusionXLPipeline.save_lora_weights`` (into a
    temporary folder, then an atomic rename: the stock writer writes in place)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for component, modules in loras.items():
        if not modules:
            continue
        peft_state = {}
        for path, lora in modules.items():
            peft_state[f"{path}.lora_A.weight"] = lora.down.to(save_dtype).contiguous()
            peft_state[f"{path}.lora_B.weight"] = lora.up.to(save_dtype).contiguous()
            if lora.magnitude is not None:
                peft_state[f"{path}.{MAGNITUDE}"] = lora.magnitude.to(save_dtype).contiguous()
        kwargs[f"{component}_lora_layers"] = _diffusers_spelling(
            component, peft_state, convert_state_dict_to_diffusers
        )
        kwargs[f"{component}_lora_adapter_metadata"] = adapter_metadata(
            modules, configs[component], component
        )
    tmp = Path(tempfile.mkdtemp(prefix=".diffusers-lora-", dir=output_dir))
    try:
        StableDiffusionXLPipeline.save_lora_weights(tmp, **kwargs)
        target = output_dir / DIFFUSERS_FILE
        umask_file(tmp / DIFFUSERS_FILE)  # diffusers' writer leaves it 0600
        os.replace(tmp / DIFFUSERS_FILE, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an existing ``target`` is swapped out first, then deleted, so a
    reader sees either the old folder or the new one, never a half-written one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fuse_into_pipeline(
    base: str,
    loras: LoraSet,
    configs: Mapping[str, BiLoRAConfig],
    output_dir: str | os.PathLike,
    save_dtype: torch.dtype | str = torch.float32,
) -> Path:
    """A full SDXL pipeline folder ``<output_dir>/fused`` with W0 + s1·B1·A1 in its weights, made the stock way:
    load the base pipeline (float32), load the diffusers LoRA file, ``fuse_lora``, ``unload_lora_weights``,
    cast to ``save_dtype`` and ``save_pretrained``."""
    from diffusers import StableDiffusionXLPipeline

    dtype = resolve_dtype(save_dtype)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(base, **dtype_kwargs(torch.float32))
    except (OSError, ValueError) as err:
        raise ExportError(
            f"--fuse needs the base pipeline {base!r}, which could not be loaded: {err}"
        ) from err
    with tempfile.TemporaryDirectory(prefix=".fuse-lora-", dir=output_dir) as tmp:
        write_diffusers(tmp, loras, configs, torch.float32)  # fuse from full-precision factors
        pipe.load_lora_weights(tmp, weight_name=DIFFUSERS_FILE, use_safetensors=True)
    pipe.fuse_lora(lora_scale=1.0, safe_fusing=True)
    pipe.unload_lora_weights()
    for name in ("unet", "text_encoder", "text_encoder_2"):
        # The VAE keeps its own dtype: an fp16 SDXL VAE overflows to NaN (the pipeline upcasts it anyway).
        cast(getattr(pipe, name), dtype=dtype)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{FUSED_DIR}-", dir=output_dir))
    try:
        pipe.save_pretrained(tmp_out)
        # mkdtemp made it 0700 and transformers writes its weights 0600: the folder and its files get the modes
        # of any the user makes.
        umask_tree(tmp_out)
        _replace_dir(tmp_out, output_dir / FUSED_DIR)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    return output_dir / FUSED_DIR
