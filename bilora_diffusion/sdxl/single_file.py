"""Single-file SDXL checkpoints (the original SGM layout ComfyUI and AUTOMATIC1111 use) as the base model.

One ``.safetensors`` file holds the UNet (``model.diffusion_model.``), the VAE (``first_stage_model.``), CLIP-L
(``conditioner.embedders.0.transformer.``, Hugging Face CLIP names) and OpenCLIP bigG
(``conditioner.embedders.1.model.``, OpenCLIP names with fused q/k/v). It carries no configs and no tokenizer, so
those come from a diffusers-layout folder: ``--single_file_config DIR`` or, by default, SDXL base 1.0's configs
shipped in ``single_file_config/`` (the CLIP tokenizer's vocab.json / merges.txt are not shipped: see
`tokenizer_files`). Nothing is downloaded.

Loading goes through diffusers' single-file converters (``from_single_file`` for the UNet and the VAE, the same
CLIP converter ``StableDiffusionXLPipeline.from_single_file`` uses for the text encoders), and then every
parameter of every component is compared with the tensor of the file it must come from (`verify_component`):
diffusers' converters leave a parameter at its initial value, or on the meta device, without an error when a
key name does not match. Any parameter not loaded stops the run with one line naming it.

`sgm_key` is the diffusers -> SGM name of every parameter (the inverse of diffusers' converters, the same
block arithmetic as the kohya LoRA names in `kohya.py`); `to_sgm_state_dict` writes a whole diffusers SDXL in
the single-file layout (used by the tests to make a tiny single-file SDXL).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseModelError
from ..files import SINGLE_FILE_SUFFIXES
from .components import SDXLComponents, cast
from .kohya import KeyMapError, unet_sgm_path

CONFIG_DIR = Path(__file__).resolve().parent / "single_file_config"
"""SDXL base 1.0's component configs (diffusers layout, no weights), used when --single_file_config is not given."""

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
SAFE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_CLIP_G_LEAVES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def is_single_file(name: str | os.PathLike | None) -> bool:
    """True for a name that is one checkpoint file (``.safetensors``, or a pickled ``.ckpt``/``.pt``/... that
    `check_single_file` refuses), not a folder or a Hub id."""
    if not name:
        return False
    path = Path(str(name)).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not path.is_dir()


# -- the file's header: what it holds, read without loading a tensor ------------------------------------------


def read_header(path: str | os.PathLike, flag: str = "--pretrained_model_name_or_path") -> dict[str, dict]:
    """``{key: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, checked against the file's size (a
    truncated download fails here, in one line, not half-way through loading)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BaseModelError(f"{flag} {path}: not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            raise BaseModelError(
                f"{flag} {path}: not a safetensors file, or truncated (header of {length} bytes in a file of "
                f"{size})"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise BaseModelError(
                f"{flag} {path}: not a safetensors file (header unreadable: {err})"
            ) from None
    if not isinstance(header, dict):
        raise BaseModelError(f"{flag} {path}: not a safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        try:
            start, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            if stop - start != count * _DTYPES.get(info["dtype"], stop - start):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise BaseModelError(
                f"{flag} {path}: not a safetensors file (bad header entry {key!r})"
            ) from None
        end = max(end, stop)
    if 8 + length + end > size:
        raise BaseModelError(
            f"{flag} {path}: truncated ({size} bytes, the header describes {8 + length + end}); "
            "download or copy it again"
        )
    return header


def check_single_file(path: str | os.PathLike, kind: str, flag: str) -> dict[str, dict]:
    """Refuse a pickled checkpoint; check that a ``.safetensors`` file is whole and holds an SDXL model (``kind``
    "sdxl": UNet and both text encoders in the SGM layout) or a VAE ("vae"). Returns the header."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise BaseModelError(
            f"{flag} {path}: a pickled checkpoint ({suffix}) is refused: loading one runs whatever code it "
            "holds (Python pickle); convert it to .safetensors once, in a sandbox, or download the .safetensors "
            "release"
        )
    if not path.exists():
        raise BaseModelError(f"{flag} {path}: no such file")
    if suffix not in SAFE_SUFFIXES:
        raise BaseModelError(
            f"{flag} {path}: not a .safetensors file (expected an SDXL .safetensors file, a diffusers folder or "
            "a Hub id)"
        )
    header = read_header(path, flag)
    if kind == "sdxl":
        parts = {
            "the UNet (model.diffusion_model.*)": PREFIXES["unet"],
            "CLIP-L (conditioner.embedders.0.*)": "conditioner.embedders.0.",
            "OpenCLIP bigG (conditioner.embedders.1.*)": "conditioner.embedders.1.",
        }
        missing = [what for what, prefix in parts.items() if not any(k.startswith(prefix) for k in header)]
        if missing:
            raise BaseModelError(
                f"{flag} {path}: not an SDXL checkpoint in the original (SGM) layout: no "
                f"{', no '.join(missing)} among its {len(header)} tensors"
            )
    elif kind == "vae":
        if not any(k.startswith(("encoder.", "decoder.", PREFIXES["vae"])) for k in header):
            raise BaseModelError(
                f"{flag} {path}: not a VAE checkpoint (no encoder.* / decoder.* / first_stage_model.* tensors)"
            )
    else:
        raise BaseModelError(
            f"{flag} {path}: a single file is not accepted here; pass a model folder or Hub id"
        )
    return header


# -- configs and tokenizers -----------------------------------------------------------------------------------


def config_dir(single_file_config: str | os.PathLike | None = None) -> Path:
    """The diffusers-layout folder whose configs (and tokenizers) go with a single-file base model."""
    if not single_file_config:
        return CONFIG_DIR
    path = Path(single_file_config).expanduser()
    if not path.is_dir():
        raise BaseModelError(f"--single_file_config {path}: no such folder")
    missing = [
        p
        for p in (
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "text_encoder_2/config.json",
        )
        if not (path / p).is_file()
    ]
    if missing:
        raise BaseModelError(
            f"--single_file_config {path}: not a diffusers SDXL folder (no {', '.join(missing)}); pass a folder "
            "with SDXL's unet/vae/text_encoder/text_encoder_2/scheduler configs and both tokenizers"
        )
    return path


def _cached_clip_files() -> tuple[str, str] | None:
    """vocab.json and merges.txt of the CLIP BPE tokenizer from the local Hugging Face cache, if there."""
    from huggingface_hub import try_to_load_from_cache

    for repo, sub in (
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer/"),
        ("openai/clip-vit-large-patch14", ""),
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2/"),
    ):
        found = [try_to_load_from_cache(repo, sub + name) for name in ("vocab.json", "merges.txt")]
        if all(isinstance(f, str) for f in found):
            return found[0], found[1]
    return None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all(
        (folder / f).is_file() for f in ("vocab.json", "merges.txt")
    )


def tokenizer_files(folder: Path, name: str) -> tuple[str, str] | None:
    """None when ``folder/name`` holds a tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``);
    else (vocab.json, merges.txt) of the CLIP tokenizer from the local Hugging Face cache. Both SDXL tokenizers
    share one vocabulary (they differ in the pad token, which ``tokenizer_config.json`` sets). The vocabulary is
    not shipped with bilora-diffusion."""
    if _has_tokenizer(folder / name):
        return None
    cached = _cached_clip_files()
    if cached:
        return cached
    raise BaseModelError(
        f"{folder / name}: no tokenizer files (vocab.json, merges.txt), and the CLIP tokenizer is not in the "
        "local Hugging Face cache (bilora-diffusion does not ship it); pass --single_file_config DIR, a "
        "diffusers SDXL folder without weights (hf download stabilityai/stable-diffusion-xl-base-1.0 "
        "--exclude '*.safetensors' '*.bin' '*.onnx*' '*.msgpack' --local-dir DIR), or fetch the tokenizer "
        "once online (hf download openai/clip-vit-large-patch14 vocab.json merges.txt)"
    )


def check_config(single_file_config: str | os.PathLike | None = None) -> Path:
    """The config folder of a single-file base model, checked before anything loads: its configs are there and
    both tokenizers can be built (from the folder or the local Hugging Face cache). One line if not."""
    folder = config_dir(single_file_config)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer_files(folder, name)
    return folder


def load_tokenizer(folder: Path, name: str):
    """Tokenizer ``name`` of a config folder, or the cached CLIP vocabulary with that folder's settings."""
    from transformers import AutoTokenizer, CLIPTokenizer

    files = tokenizer_files(folder, name)
    if files is None:
        return AutoTokenizer.from_pretrained(folder, subfolder=name, use_fast=False)
    settings = {}
    config = folder / name / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
    keep = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "errors")
    kwargs = {k: v["content"] if isinstance(v, dict) else v for k, v in settings.items() if k in keep}
    return CLIPTokenizer(vocab_file=files[0], merges_file=files[1], **kwargs)


# -- diffusers <-> SGM names ----------------------------------------------------------------------------------


def _unet_key(name: str, unet_config: Mapping[str, Any] | Any) -> str:
    module, leaf = name.rsplit(".", 1)
    for diffusers, sgm in (
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ):
        if module == diffusers:
            return f"{sgm}.{leaf}"
    return f"{unet_sgm_path(module, unet_config)}.{leaf}"


def _vae_key(name: str, levels: int) -> tuple[str, str]:
    parts = name.split(".")
    how = "same"
    if parts[1] == "mid_block" and parts[2] == "attentions":
        # encoder.mid_block.attentions.0.<leaf> -> encoder.mid.attn_1.<leaf> (1x1 convs in the file)
        leaf = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
        rest = parts[6:] if parts[4] == "to_out" else parts[5:]
        how = "conv1x1" if rest[-1] == "weight" and leaf != "norm" else "same"
        return ".".join([parts[0], "mid", "attn_1", leaf, *rest]), how
    if parts[1] == "mid_block" and parts[2] == "resnets":
        tail = parts[4:]
        out = [parts[0], "mid", f"block_{int(parts[3]) + 1}", *tail]
    elif parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
        block = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] == "resnets":
            out = [parts[0], block, str(level), "block", parts[4], *parts[5:]]
        else:  # downsamplers.0.conv / upsamplers.0.conv
            out = [parts[0], block, str(level), "downsample" if block == "down" else "upsample", *parts[5:]]
    else:
        out = list(parts)
    key = ".".join(out).replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    return key, how


def sgm_key(component: str, name: str, config: Mapping[str, Any] | Any = None) -> tuple[str, str]:
    """(file key, how) of diffusers/transformers parameter ``name`` of ``component``. ``how`` says how the
    file's tensor becomes the parameter: "same", "T" (transposed), "conv1x1" (a [o, i, 1, 1] conv weight),
    or "q"/"k"/"v" (a third of OpenCLIP's fused in_proj). ``config`` is the UNet's config for "unet", the
    number of VAE levels for "vae". Raises `KeyMapError` for a name with no SGM counterpart."""
    prefix = PREFIXES[component]
    if component == "unet":
        return prefix + _unet_key(name, config), "same"
    if component == "vae":
        key, how = _vae_key(name, int(config))
        return prefix + key, how
    canonical = name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
    if component == "text_encoder":
        return prefix + canonical, "same"
    if component != "text_encoder_2":
        raise KeyMapError(f"component {component!r} has no single-file layout")
    if canonical == "text_projection.weight":
        return prefix + "text_projection", "T"
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    if canonical in fixed:
        return prefix + fixed[canonical], "same"
    rest = canonical.removeprefix("text_model.encoder.layers.")
    if rest == canonical:
        raise KeyMapError(f"text_encoder_2.{name}: no OpenCLIP name")
    layer, module, leaf = (
        rest.split(".", 1)[0],
        rest.split(".", 1)[1].rsplit(".", 1)[0],
        rest.rsplit(".", 1)[1],
    )
    base = f"{prefix}transformer.resblocks.{layer}."
    if module in _QKV:
        return f"{base}attn.in_proj_{leaf}", "qkv"[_QKV.index(module)]
    if module in _CLIP_G_LEAVES:
        return f"{base}{_CLIP_G_LEAVES[module]}.{leaf}", "same"
    raise KeyMapError(f"text_encoder_2.{name}: no OpenCLIP name")


def _component_config(component: str, model) -> Any:
    if component == "unet":
        return model.config
    if component == "vae":
        return len(model.config.block_out_channels)
    return None


def from_file(tensor: torch.Tensor, how: str) -> torch.Tensor:
    """The parameter value a file tensor stands for (see `sgm_key`)."""
    if how == "T":
        return tensor.T
    if how == "conv1x1":
        return tensor.reshape(tensor.shape[0], -1)
    if how in ("q", "k", "v"):
        third = tensor.shape[0] // 3
        i = "qkv".index(how)
        return tensor[i * third : (i + 1) * third]
    return tensor


def to_sgm_state_dict(components: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """A diffusers SDXL's ``unet`` / ``vae`` / ``text_encoder`` / ``text_encoder_2`` as one SGM-layout state
    dict (what ``save_file`` writes as a single-file checkpoint ComfyUI and A1111 load)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for component, model in components.items():
        config = _component_config(component, model)
        for name, param in model.state_dict().items():
            if name.endswith("position_ids"):
                continue
            key, how = sgm_key(component, name, config)
            value = param.detach().cpu().contiguous()
            if how == "T":
                value = value.T.contiguous()
            elif how == "conv1x1":
                value = value[:, :, None, None].contiguous()
            elif how in ("q", "k", "v"):
                fused.setdefault(key, {})[how] = value
                continue
            out[key] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]]).contiguous()
    return out


# -- loading and checking --------------------------------------------------------------------------------------


def verify_component(
    component: str,
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    prefix: str | None = None,
) -> None:
    """Every parameter (and persistent buffer) of ``model`` must hold the value of the file tensor it comes
    from; else one line naming the first one that does not (on the meta device, absent from the file, or left
    at another value)."""
    config = _component_config(component, model)
    bad: list[str] = []
    for name, tensor in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        key, how = sgm_key(component, name, config)
        if prefix is not None:
            key = prefix + key.removeprefix(PREFIXES[component])
        if tensor.device.type == "meta":
            bad.append(f"{name} was left on the meta device (nothing loaded into it)")
        elif key not in state:
            bad.append(f"{name} has no tensor {key} in the file")
        else:
            expected = from_file(state[key], how)
            if expected.shape != tensor.shape or not torch.equal(
                expected.to(torch.float32), tensor.detach().to("cpu", torch.float32)
            ):
                bad.append(f"{name} does not hold the file's {key} (left at its initial value)")
        if len(bad) > 2:
            break
    if bad:
        raise BaseModelError(
            f"{source}: {component} not loaded from the file: {bad[0]}"
            + (" (and more)" if len(bad) > 1 else "")
        )


def _clip_l_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L keys with the ``text_model.`` level original-layout files carry (a file written from a
    transformers >= 5.6 model without it is renamed here; diffusers' converter would not find it)."""
    prefix = PREFIXES["text_encoder"]
    renamed = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
            key = prefix + "text_model." + key[len(prefix) :]
        renamed[key] = value
    return renamed


def _load_state(path: str, flag: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BaseModelError(f"{flag} {path}: unreadable ({first})") from None


def _one_line(flag: str, path: str, what: str, err: Exception) -> BaseModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return BaseModelError(f"{flag} {path}: {what} could not be loaded ({first})")


def load_vae_file(path: str, config: str | os.PathLike, flag: str = "--pretrained_vae_model_name_or_path"):
    """An AutoencoderKL from a single VAE file (``encoder.*``/``decoder.*``, or an SDXL file's
    ``first_stage_model.*``), with ``config``'s ``vae/config.json``; checked tensor by tensor."""
    from diffusers import AutoencoderKL

    state = _load_state(path, flag)
    try:
        vae = AutoencoderKL.from_single_file(
            state, config=str(config), subfolder="vae", local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _one_line(flag, path, "the VAE", err) from None
    nested = any(k.startswith(PREFIXES["vae"]) for k in state)
    verify_component("vae", vae, state, f"{flag} {path}", prefix=None if nested else "")
    return vae


def load_single_file_components(
    path: str,
    single_file_config: str | os.PathLike | None = None,
    vae_path: str | None = None,
    flag: str = "--pretrained_model_name_or_path",
):
    """`SDXLComponents` (float32) from one SGM-layout ``.safetensors`` file, offline, every tensor checked."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = config_dir(single_file_config)
    check_single_file(path, "sdxl", flag)
    tokenizer = load_tokenizer(folder, "tokenizer")
    tokenizer_2 = load_tokenizer(folder, "tokenizer_2")
    state = _clip_l_keys(_load_state(path, flag))
    source = f"{flag} {path}"
    # No torch_dtype: diffusers' from_single_file would log a "kept in float32: []" line on the cast; the file's
    # dtype is kept and `cast` makes it float32 below.
    common = {"config": str(folder), "local_files_only": True}
    if not vae_path and not any(k.startswith(PREFIXES["vae"]) for k in state):
        raise BaseModelError(
            f"{source}: no VAE in the file (first_stage_model.*); pass --pretrained_vae_model_name_or_path"
        )
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common),
        "vae": lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common),
        "text_encoder": lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **common
        ),
        "text_encoder_2": lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, state, subfolder="text_encoder_2", **common
        ),
    }
    models: dict[str, torch.nn.Module] = {}
    for name, load in loaders.items():
        if name == "vae" and vae_path:
            continue
        try:
            models[name] = load()
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            # e.g. "Cannot copy out of meta tensor": a tensor of this component is missing or misnamed.
            raise _one_line(
                flag, path, f"its {name} (a tensor missing or misnamed in the file?)", err
            ) from None
    for name, model in models.items():
        verify_component(name, model, state, source)
    state.clear()  # the file's tensors not used by a model are freed now
    if not vae_path:
        vae = models["vae"]
    elif is_single_file(vae_path):
        vae = load_vae_file(vae_path, folder)
    else:  # a diffusers VAE folder or Hub id (e.g. madebyollin/sdxl-vae-fp16-fix)
        vae = AutoencoderKL.from_pretrained(vae_path)
    for model in (*models.values(), vae):
        cast(model, None, torch.float32).eval()
    return SDXLComponents(
        unet=models["unet"],
        vae=vae,
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def single_file_pipeline(
    path: str,
    single_file_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    flag: str = "--pretrained_model_name_or_path",
):
    """A stock ``StableDiffusionXLPipeline`` from one SGM-layout file (the components of
    `load_single_file_components`, the config folder's scheduler), cast to ``dtype`` (the VAE stays float32
    below it: SDXL's VAE overflows in fp16)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    c = load_single_file_components(path, single_file_config, flag=flag)
    for model in (c.unet, c.text_encoder, c.text_encoder_2):
        cast(model, None, dtype)
    scheduler = EulerDiscreteScheduler.from_pretrained(config_dir(single_file_config), subfolder="scheduler")
    return StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2,
        unet=c.unet,
        scheduler=scheduler,
    )
