"""Base models: is the one named on the command line there, and is it the right kind? One line if not.

`resolve_base_model` runs before any model loads (train_sdxl.py, bilora-generate, bilora-export --fuse, and the
causal-LM trainer) and turns what would otherwise be 50-90 lines of chained tracebacks from diffusers,
transformers and huggingface_hub into one `BaseModelError` that says which case it is:

- a local path that does not exist ("no such folder");
- a local folder that is not that kind of model (an SDXL pipeline needs ``model_index.json`` with a UNet and
  both text encoders, a causal LM or a VAE needs ``config.json``);
- a Hub id that is not in the local cache while the Hub cannot be reached (``HF_HUB_OFFLINE=1``, no network);
- a Hub id that does not exist (or is private), a revision that does not exist, or a gated repository whose
  license has not been accepted with the token in use;
- a Hub repository without the file that kind of model has (not a diffusers SDXL pipeline, not a model).
- a single checkpoint file (``sdxl/single_file.py``) that is pickled (refused: loading runs its code),
  truncated, not safetensors, or without the SGM-layout UNet and both text encoders.

Nothing is downloaded but the one small file ``from_pretrained`` reads first (``model_index.json`` or
``config.json``), into the usual Hugging Face cache.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import BaseModelError
from .files import SINGLE_FILE_SUFFIXES

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
"""The default base model of train_sdxl.py when any argument is given (as in diffusers' SDXL scripts)."""

KINDS = {
    "sdxl": ("model_index.json", "an SDXL model"),
    "causal-lm": ("config.json", "a model"),
    "vae": ("config.json", "a VAE"),
    "clip": ("config.json", "a model"),  # scoring models (--validation_clip_model, bilora-score)
}
SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path: absolute, ./ ../ ~ or a backslash, more than one slash, or not a
    valid Hub repo id."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name):
        return True
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError:
        return True
    return False


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the Hub endpoint opens within ``timeout`` seconds, else why not. Behind a
    proxy (HTTPS_PROXY / ALL_PROXY) the direct connection proves nothing, so the Hub is assumed reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}: {err.strerror or err}"
    return None


def _check_sdxl_index(index_file: Path, where: str, flag: str) -> None:
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as err:
        raise BaseModelError(f"{flag} {where}: {index_file.name} is not readable JSON ({err})") from None
    missing = [part for part in ("unet", "text_encoder", "text_encoder_2") if part not in index]
    if missing:
        kind = index.get("_class_name", "a pipeline") if isinstance(index, dict) else "a pipeline"
        raise BaseModelError(
            f"{flag} {where}: not an SDXL model ({kind} without {', '.join(missing)}); "
            f"pass an SDXL pipeline such as {SDXL_BASE}"
        )


def _check_folder(path: Path, kind: str, flag: str) -> None:
    marker, what = KINDS[kind]
    if not (path / marker).is_file():
        hint = f"; pass an SDXL pipeline such as {SDXL_BASE}" if kind == "sdxl" else ""
        raise BaseModelError(f"{flag} {path}: not {what} folder (no {marker}){hint}")
    if kind == "sdxl":
        _check_sdxl_index(path / marker, str(path), flag)
        absent = [p for p in SDXL_PARTS if not (path / p).is_dir()]
        if absent:
            raise BaseModelError(
                f"{flag} {path}: not a complete SDXL pipeline folder (no {'/, '.join(absent)}/ subfolder)"
            )


def resolve_base_model(
    name: str | os.PathLike,
    kind: str = "sdxl",
    *,
    revision: str | None = None,
    flag: str = "--pretrained_model_name_or_path",
) -> str:
    """Check that ``name`` (a local folder or a Hub id; for "sdxl" and "vae" also one ``.safetensors`` file in
    the original SGM layout) is there and is a model of ``kind`` ("sdxl", "causal-lm" or "vae") before anything
    loads it. Returns the local folder or file (for a Hub id: its cached snapshot folder). Raises
    `BaseModelError` (an `OptionError`: exit 2, one line) naming ``flag``, the model and which case it is."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = str(name)
    if not name.strip():
        raise BaseModelError(f"{flag}: empty")
    path = Path(name).expanduser()
    single = path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if kind in ("sdxl", "vae") and single and not path.is_dir():
        # One .safetensors file in the original (SGM) layout: whole, and holding that kind of model.
        from .sdxl.single_file import check_single_file

        check_single_file(path, kind, flag)
        return str(path)
    if path.exists() or looks_like_path(name):
        if not path.exists():
            raise BaseModelError(f"{flag} {name}: no such folder")
        if not path.is_dir():
            raise BaseModelError(f"{flag} {name}: not a folder (expected a model folder or a Hub id)")
        _check_folder(path, kind, flag)
        return str(path)
    return _resolve_hub(name, kind, revision, flag)


def _resolve_hub(repo_id: str, kind: str, revision: str | None, flag: str) -> str:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    marker, what = KINDS[kind]
    at = f" at revision {revision}" if revision else ""
    # A bare name ("my-model") may have meant a folder in the working directory.
    local = "no such folder; as a Hub id it is " if "/" not in repo_id else ""
    cached = try_to_load_from_cache(repo_id, marker, revision=revision)
    if not isinstance(cached, str):
        if hub_offline():
            raise BaseModelError(
                f"{flag} {repo_id}: {local}not in the local Hugging Face cache{at}, and the Hub is "
                "unreachable (HF_HUB_OFFLINE=1); download it once online, or pass a local folder"
            )
        unreachable = hub_unreachable()
        if unreachable:
            raise BaseModelError(
                f"{flag} {repo_id}: {local}not in the local Hugging Face cache{at}, and the Hub is "
                f"unreachable ({unreachable}); download it once online, or pass a local folder"
            )
    try:
        cached = cached if isinstance(cached, str) else hf_hub_download(repo_id, marker, revision=revision)
    except GatedRepoError:
        raise BaseModelError(
            f"{flag} {repo_id}: a gated repository; accept its license at https://huggingface.co/{repo_id} "
            "and log in with that account (hf auth login, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise BaseModelError(
            f"{flag} {repo_id}: no such repository on the Hub (or a private one your token cannot see)"
        ) from None
    except RevisionNotFoundError:
        raise BaseModelError(f"{flag} {repo_id}: no revision {revision!r} on the Hub") from None
    except LocalEntryNotFoundError:
        raise BaseModelError(
            f"{flag} {repo_id}: {local}not in the local Hugging Face cache{at}, and the Hub is unreachable "
            "(the download failed: check the connection); download it once online, or pass a local folder"
        ) from None
    except EntryNotFoundError:
        hint = f"; pass an SDXL pipeline such as {SDXL_BASE}" if kind == "sdxl" else ""
        raise BaseModelError(f"{flag} {repo_id}: not {what} (the repository has no {marker}){hint}") from None
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BaseModelError(f"{flag} {repo_id}: the Hub refused it ({first})") from None
    if kind == "sdxl":
        _check_sdxl_index(Path(cached), repo_id, flag)
    return str(Path(cached).parent)
