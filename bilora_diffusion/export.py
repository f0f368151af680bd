"""Export the primary branch of a Bi-LoRA training (W0 + s1·B1·A1) as a standard SDXL LoRA.

Two files, both loadable by stock tools (shared/FORMATS.md):

- ``pytorch_lora_weights.safetensors``: written by ``StableDiffusionXLPipeline.save_lora_weights`` (keys through
  ``convert_state_dict_to_diffusers``, as diffusers' training scripts do), with the LoRA adapter metadata in
  the header so that alpha != rank reloads at the right scale; ``pipe.load_lora_weights(dir)`` reads it.
- ``<output_name>.safetensors``: kohya's SDXL format (``lora_unet_`` + SGM path, ``lora_te1_`` / ``lora_te2_``,
  ``.lora_down.weight`` / ``.lora_up.weight`` / 0-dim ``.alpha``), the one ComfyUI, A1111 and Forge users load.

The auxiliary branch never leaves training: only ``primary_state_dict`` (the PEFT adapter "default") is read.
Everything is validated before a byte is written (every module exists in the model, shapes match the module,
alpha > 0, every kohya name is one loaders accept), and files are written atomically.

Entry points: `export_lora` (the trainer, with in-memory models), `export_from_folder` (a training output or
``checkpoint-N`` folder) and `main` (``bilora-export`` / ``pipelines/export_lora.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import CHECKPOINT_RE
from .config import PRIMARY, BiLoRAConfig, ConfigError
from .files import umask_file, umask_tree
from .hub import cast, dtype_kwargs, resolve_base_model
from .options import OptionError
from .peft_glue import bilora_layers, lora_config, primary_state_dict, unwrap
from .sdxl.kohya import COMPONENTS, KeyMapError, kohya_stem, stem_table, text_encoder_path
from .sdxl.single_file import config_dir, is_single_file
from .state import STATE_FILE, atomic_save_file, read_bilora_state

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
TRAINING_CONFIG = "training_config.yaml"
FUSED_DIR = "fused"
FORMATS = ("diffusers", "kohya", "both")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OUTPUT_NAME = "bilora_sdxl"
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
_KOHYA_REQUIRED = {".lora_down.weight", ".lora_up.weight", ".alpha"}
MAGNITUDE = "lora_magnitude_vector"
"""PEFT's (and diffusers') key of a DoRA layer's magnitude vector: ``<module>.lora_magnitude_vector``."""
# Inits that rewrite W0 at attach time (W0 <- W0 - s·B0·A0): a plain LoRA on the original W0 is not what was
# trained, so such a run cannot be exported as one.
_W0_REWRITING_INITS = ("pissa", "olora")


class ExportError(ValueError):
    """Export refused: the message names the file, module or option at fault."""


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


# ----------------------------------------------------------------------------------------------- collect


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


# ---------------------------------------------------------------------------------------------- validate


def _find_module(model: nn.Module, component: str, path: str) -> nn.Module | None:
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


def _magnitude_shape(module: nn.Module) -> tuple[int, ...]:
    """PEFT's DoRA magnitude shape on ``module``: [out] (Linear) or [1, out, 1, 1] (Conv2d)."""
    if isinstance(module, nn.Conv2d):
        return (1, module.out_channels, 1, 1)
    return (module.out_features,)


def _dora_scale_shape(module: nn.Module) -> tuple[int, ...]:
    """kohya/LyCORIS ``dora_scale`` shape of an output-axis DoRA on ``module``: [out, 1] (Linear) or
    [out, 1, 1, 1] (Conv2d), the shape ComfyUI and Forge read as one magnitude per output row."""
    if isinstance(module, nn.Conv2d):
        return (module.out_channels, 1, 1, 1)
    return (module.out_features, 1)


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
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
            module = _find_module(model, component, path)
            if module is None:
                raise ExportError(
                    f"{where}: no such module in {type(model).__name__} (not this model's LoRA?)"
                )
            shapes = _expected_shapes(module, lora.rank)
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
                if tuple(lora.magnitude.shape) != _magnitude_shape(module):
                    raise ExportError(
                        f"{where}: DoRA magnitude of shape {tuple(lora.magnitude.shape)} does not fit the "
                        f"module (expected {_magnitude_shape(module)})"
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


# ---------------------------------------------------------------------------------------------- writers


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
    """The header A1111/Forge/ComfyUI read (FORMATS.md), plus how the file was made. All values strings."""
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


def write_kohya(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Check the kohya tensors are complete triples (a loader fails a whole file on an up-only or alpha-only
    module) and write them atomically."""
    stems: dict[str, set[str]] = {}
    for key in tensors:
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ExportError(f"{path}: stray tensor {key!r}")
        stems.setdefault(key[: -len(suffix)], set()).add(suffix)
    broken = [s for s, parts in stems.items() if not _KOHYA_REQUIRED <= parts]
    if broken:
        raise ExportError(f"{path}: incomplete modules {broken[:3]}")
    atomic_save_file(tensors, path, metadata)
    return Path(path)


# ------------------------------------------------------------------------------------------ entry points


def _resolve_dtype(save_dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(save_dtype, torch.dtype):
        if save_dtype not in SAVE_DTYPES.values():
            raise ExportError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype}")
        return save_dtype
    if save_dtype not in SAVE_DTYPES:
        raise ExportError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    return SAVE_DTYPES[save_dtype]


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
    dtype = _resolve_dtype(save_dtype)
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


def read_options(folder: Path) -> dict[str, Any]:
    """``training_config.yaml`` of a training output (or of the parent of a ``checkpoint-N`` folder); {} if
    there is none. Read with ``yaml.safe_load``: no tags, no code."""
    import yaml

    for candidate in (folder / TRAINING_CONFIG, folder.parent / TRAINING_CONFIG):
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

    dtype = _resolve_dtype(save_dtype)
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
        flag = f"base model (pretrained_model_name_or_path of {TRAINING_CONFIG})"
    if not base:
        raise ExportError(
            f"{src}: {TRAINING_CONFIG} gives no pretrained_model_name_or_path; pass --pretrained_model_name_or_path"
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


# ------------------------------------------------------------------------------- reading untrusted files


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
    expected = _expected_shapes(module, down[0] if down else 0)
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
    stems: dict[str, set[str]] = {}
    for key in shapes:
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ExportError(f"{file}: {key!r} is not a lora_down/lora_up/alpha tensor")
        stems.setdefault(key[: -len(suffix)], set()).add(suffix)
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
        _check_pair(file, stem, _find_module(models[component], component, name), down, up)


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
        module = _find_module(models[component], component, name)
        _check_pair(file, f"{component}.{name}", module, pair["down"], pair["up"])
    for (component, name), shape in sorted(magnitudes.items()):
        module = _find_module(models[component], component, name)
        if (component, name) not in pairs or module is None:
            raise ExportError(f"{file}: {component}.{name}.{MAGNITUDE} has no LoRA down/up weights")
        if shape != _magnitude_shape(module):
            raise ExportError(
                f"{file}: {component}.{name}.{MAGNITUDE} has shape {shape}, the module needs "
                f"{_magnitude_shape(module)} (a LoRA for another model?)"
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


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilora-export",
        description="Export the primary branch (W0 + s1·B1·A1) of a Bi-LoRA training output or checkpoint "
        "folder as a standard SDXL LoRA: diffusers (pytorch_lora_weights.safetensors) and/or kohya "
        "(<output_name>.safetensors, for ComfyUI / A1111 / Forge).",
    )
    parser.add_argument("--input", required=True, help="training output or checkpoint-N folder")
    parser.add_argument(
        "--output",
        default=None,
        help="folder to write to (default: a new folder INPUT/export-<save_dtype>[-fused]; for INPUT "
        "RUN/checkpoint-N, RUN/export-checkpoint-N-<save_dtype>[-fused])",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace LoRA files or a fused/ folder that already exist in the output folder (never by default)",
    )
    parser.add_argument("--format", choices=FORMATS, default="both")
    parser.add_argument("--save_dtype", choices=tuple(SAVE_DTYPES), default="fp32")
    parser.add_argument(
        "--fuse", action="store_true", help="also write <output>/fused: the base pipeline with the LoRA fused"
    )
    parser.add_argument(
        "--output_name", default=None, help="kohya file name without .safetensors (default: from training)"
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="base SDXL model (default: the one in training_config.yaml)",
    )
    return parser


def fail(prog: str, err: BaseException) -> SystemExit:
    """Print one line ``prog: error: ...`` and return the SystemExit(2) to raise (argparse's convention)."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``bilora-export``: exit 0 and print the written paths (stdout; where they went on stderr), or exit 2
    with a one-line error. Never replaces an existing file unless ``--overwrite``."""
    args = build_parser().parse_args(argv)
    out = args.output or default_output(args.input, args.save_dtype, args.fuse)
    try:
        written = export_from_folder(
            args.input,
            out,
            format=args.format,
            fuse=args.fuse,
            save_dtype=args.save_dtype,
            output_name=args.output_name,
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            overwrite=args.overwrite,
        )
    except (ExportError, ConfigError, KeyMapError, OptionError, OSError) as err:
        raise fail("bilora-export", err) from None
    print(f"bilora-export: wrote {len(written)} file(s) to {out}:", file=sys.stderr)
    for path in written:
        print(path)
    return 0
