"""kohya's SDXL LoRA names: diffusers module paths -> ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` stems.

ComfyUI, AUTOMATIC1111 and Forge match a kohya SDXL LoRA by the module paths of Stability's original (SGM)
UNet, not diffusers'. The map below is the general rule for a diffusers
``UNet2DConditionModel`` whose SGM counterpart has ``layers_per_block`` resnets per down level and
``layers_per_block + 1`` per up level:

    down_blocks.B.(resnets|attentions).I   -> input_blocks.(1 + B·(L+1) + I).(0|1)
    down_blocks.B.downsamplers.0.conv      -> input_blocks.((B+1)·(L+1)).0.op
    mid_block.resnets.I                    -> middle_block.(2·I)
    mid_block.attentions.0                 -> middle_block.1
    up_blocks.B.(resnets|attentions).I     -> output_blocks.(B·(L+1) + I).(0|1)
    up_blocks.B.upsamplers.0.conv          -> output_blocks.(B·(L+1) + L).(2 if the level has attentions else 1).conv

Inside a resnet diffusers' names differ too (``conv1`` is SGM's ``in_layers.2``); inside a transformer stack
they are the same. Text encoders are written ``text_model_encoder_layers_N_...`` whatever the installed
transformers calls the module (>= 5.6 dropped the ``text_model.`` level of CLIPTextModel; no loader accepts
a name without it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import KeyMapError

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# diffusers ResnetBlock2D -> SGM ResBlock sub-module names (SGM: in_layers = [norm, SiLU, conv], emb_layers =
# [SiLU, linear], out_layers = [norm, SiLU, dropout, conv]).
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the block structure. time_embed / label_emb are deliberately absent: loaders disagree on them,
# so a LoRA on them is refused rather than written.
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_TEXT_ENCODER_LEAVES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
}
_TEXT_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def _get(config: Mapping[str, Any] | Any, key: str) -> Any:
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def _layers_per_block(unet_config: Mapping[str, Any] | Any) -> int:
    layers = _get(unet_config, "layers_per_block")
    if isinstance(layers, (list, tuple)):
        # SGM's block numbering assumes one count for every level (true of SDXL and SD1/2).
        if len(set(layers)) != 1:
            raise KeyMapError(f"layers_per_block={layers!r} differs per level: no SGM layout matches it")
        layers = layers[0]
    return int(layers)


def _resnet_leaf(rest: list[str], module: str) -> str:
    if not rest or rest[0] not in _RESNET:
        raise KeyMapError(f"{module}: no SGM name for resnet sub-module {'.'.join(rest)!r}")
    return ".".join([_RESNET[rest[0]], *rest[1:]])


def _block_child(kind: str, rest: list[str], module: str) -> tuple[int, str]:
    """(SGM inner index, SGM tail) of ``<kind>.<i>.<rest>`` inside one down or up block."""
    if kind == "resnets":
        return 0, _resnet_leaf(rest, module)
    if kind == "attentions" and rest:
        return 1, ".".join(rest)
    raise KeyMapError(f"{module}: unknown block child {kind!r}")


def _index(parts: list[str], i: int, module: str) -> int:
    try:
        return int(parts[i])
    except (IndexError, ValueError):
        raise KeyMapError(f"{module}: not a diffusers SDXL UNet module path") from None


def unet_sgm_path(module: str, unet_config: Mapping[str, Any] | Any) -> str:
    """The SGM module path of a diffusers UNet module path, e.g.
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.

    ``unet_config`` is the UNet's config (``unet.config`` or its dict); only ``layers_per_block`` and
    ``up_block_types`` are read. Raises `KeyMapError` for a module no SGM loader would find.
    """
    for top, sgm in _TOP_LEVEL.items():
        if module == top or module.startswith(top + "."):
            return sgm + module[len(top) :]
    parts = module.split(".")
    L = _layers_per_block(unet_config)
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
        b, kind, i, rest = _index(parts, 1, module), parts[2], _index(parts, 3, module), parts[4:]
        if kind in ("downsamplers", "upsamplers") and (i != 0 or rest != ["conv"]):
            raise KeyMapError(f"{module}: no SGM name for this {kind[:-1]} part")
        if kind == "downsamplers" and parts[0] == "down_blocks":
            return f"input_blocks.{(b + 1) * (L + 1)}.0.op"
        if kind == "upsamplers" and parts[0] == "up_blocks":
            has_attention = "CrossAttn" in _get(unet_config, "up_block_types")[b]
            return f"output_blocks.{b * (L + 1) + L}.{2 if has_attention else 1}.conv"
        inner, tail = _block_child(kind, rest, module)
        if parts[0] == "down_blocks":
            return f"input_blocks.{1 + b * (L + 1) + i}.{inner}.{tail}"
        return f"output_blocks.{b * (L + 1) + i}.{inner}.{tail}"
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, i, rest = parts[1], _index(parts, 2, module), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * i}.{_resnet_leaf(rest, module)}"
        if kind == "attentions" and i == 0:
            return f"middle_block.1.{'.'.join(rest)}"
        raise KeyMapError(f"{module}: SGM's middle block has one attention stack and two resnets")
    if parts[0] in ("time_embedding", "add_embedding"):
        raise KeyMapError(
            f"{module}: LoRA on the time/label embedding (SGM time_embed/label_emb) is not exported: "
            "loaders disagree on it; do not target it"
        )
    raise KeyMapError(f"{module}: no SGM name for this UNet module")


def text_encoder_path(module: str) -> str:
    """The canonical ``text_model.encoder.layers.N.<leaf>`` path of a CLIP text-encoder module, with or without
    the ``text_model.`` level the installed transformers uses. Only the attention projections and the MLP are
    accepted (norms, embeddings and text_projection are not loaded by every tool)."""
    name = module.removeprefix("text_model.")
    match = _TEXT_LAYER.fullmatch(name)
    if not match or match.group(2) not in _TEXT_ENCODER_LEAVES:
        raise KeyMapError(
            f"{module}: only encoder.layers.N.{{self_attn.q/k/v/out_proj, mlp.fc1/fc2}} of a CLIP text encoder "
            "can be exported"
        )
    return f"text_model.encoder.layers.{match.group(1)}.{match.group(2)}"


def kohya_stem(component: str, module: str, unet_config: Mapping[str, Any] | Any | None = None) -> str:
    """kohya's stem for ``module`` (a diffusers/transformers module path) of ``component``
    ("unet", "text_encoder" or "text_encoder_2"): prefix + SGM path with ``.`` -> ``_``."""
    if component == "unet":
        if unet_config is None:
            raise ValueError("unet_config is needed to name UNet modules")
        return UNET_PREFIX + unet_sgm_path(module, unet_config).replace(".", "_")
    if component in TEXT_ENCODER_PREFIXES:
        return TEXT_ENCODER_PREFIXES[component] + text_encoder_path(module).replace(".", "_")
    raise KeyMapError(
        f"component {component!r} has no kohya prefix (expected one of {', '.join(COMPONENTS)})"
    )


def stem_table(
    modules: Mapping[str, Iterable[str]], unet_config: Mapping[str, Any] | Any | None
) -> dict[str, tuple[str, str]]:
    """``{stem: (component, module)}`` for the given module paths of each component; raises `KeyMapError`
    if a module has no name or two modules share one (a loader would apply only one of them)."""
    table: dict[str, tuple[str, str]] = {}
    for component, names in modules.items():
        for name in names:
            stem = kohya_stem(component, name, unet_config)
            if stem in table:
                raise KeyMapError(f"{component}.{name} and {'.'.join(table[stem])} both map to {stem}")
            table[stem] = (component, name)
    return table
