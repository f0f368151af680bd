"""Where the causal-LM tools' inputs come from — a local file or folder, the Hugging Face cache, or the Hub —
checked before anything loads, data first, so a missing one fails in one line (exit 2) instead of after a
minute of Hub retries and a chained traceback.

Base models go through the shared resolver (`bilora_diffusion.hub.resolve_base_model`, kind "causal-lm"):
no such folder / not a model folder / not in the local cache and the Hub unreachable / no such repo or
revision / a gated repo. Data: a name that exists is read as it is; one that can only be a path (``./``,
``/``, ``~``, a data file's suffix, more than one ``/``) and does not exist is "no such file or folder"; a
Hub dataset id must be in the local cache or the Hub reachable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..hub import hub_offline, hub_unreachable, looks_like_path, resolve_base_model
from ..options import OptionError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def dataset_cached(name: str) -> bool:
    """Whether the Hugging Face cache (or the datasets cache) holds a copy of the Hub dataset ``name``."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    try:
        from datasets import config

        return (Path(config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir()
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False


def check_data(source: str, flag: str = "--dataset") -> None:
    """A data source: an existing file or folder, or a Hub dataset id that is cached or can be fetched."""
    if Path(source).expanduser().exists():
        return
    if looks_like_path(source) or source.lower().endswith(DATA_SUFFIXES):
        raise OptionError(f"{flag} {source}: no such file or folder")
    if dataset_cached(source):
        return
    local = "no such file or folder; as a Hub dataset it is " if "/" not in source else ""
    unreachable = "HF_HUB_OFFLINE=1" if hub_offline() else hub_unreachable()
    if unreachable:
        raise OptionError(
            f"{flag} {source}: {local}not in the local Hugging Face cache, and the Hub is unreachable "
            f"({unreachable}); download it once online, or pass a local file"
        )


def check_model(name: str, flag: str = "--model", revision: str | None = None) -> None:
    """A base model: a local model folder, or a Hub id that is cached or can be fetched (one line if not)."""
    resolve_base_model(name, "causal-lm", revision=revision, flag=flag)


def check_tokenizer(name: str, flag: str = "--tokenizer") -> None:
    """A separate tokenizer given as a local path must exist (Hub ids are left to transformers)."""
    path = Path(name).expanduser()
    if path.exists() or looks_like_path(name) or os.sep in name:
        if not path.is_dir():
            raise OptionError(f"{flag} {name}: no such folder")
