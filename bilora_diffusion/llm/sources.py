"""Where the causal-LM tools' inputs come from — a local file or folder, the Hugging Face cache, or the Hub —
checked before anything loads, so a missing one fails in one line (exit 2) instead of after a minute of Hub
retries and a chained traceback.

A name is a local path when it exists, or when it can only be one (it starts with ``.``, ``/`` or ``~``, has
a data file's suffix or more than one ``/``): then "no such folder" (or file). Otherwise it is a Hub id: fine
when the Hugging Face cache holds a snapshot of it; else the Hub is asked once, without retries, whether it
exists and may be read (not cached and the Hub unreachable or offline / no such repo / a gated repo / no such
revision).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..options import OptionError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_TIMEOUT = 10.0
"""Seconds the one Hub query may take (no retries)."""


def looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(DATA_SUFFIXES)
    )


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_cached(name: str, repo_type: str = "model") -> bool:
    """Whether the Hugging Face cache holds a snapshot of the repo (any revision)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_hub(name: str, flag: str, repo_type: str = "model", revision: str | None = None) -> None:
    """A Hub id not in the cache must exist on a reachable Hub and be readable; else one-line OptionError."""
    from huggingface_hub import auth_check, dataset_info, model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    what = "model" if repo_type == "model" else "dataset"
    local = "no such folder" if repo_type == "model" else "no such file or folder"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise OptionError(f"{flag} {name}: {local} (and not a Hub {what} id)") from None
    if hub_cached(name, repo_type):
        return
    where = f"{flag} {name}: {local}, and not a {what} in the local Hugging Face cache"
    if hub_offline():
        raise OptionError(f"{where}; the Hub is offline (HF_HUB_OFFLINE is set)")
    info = model_info if repo_type == "model" else dataset_info
    try:
        found = info(name, revision=revision, timeout=HUB_TIMEOUT)
        if getattr(found, "gated", False):
            auth_check(name, repo_type=repo_type)
    except GatedRepoError:
        raise OptionError(
            f"{flag} {name}: a gated repo you have no access to: accept its conditions on "
            f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{name} and log in "
            "(hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise OptionError(f"--revision {revision}: {name} on the Hub has no such revision") from None
    except RepositoryNotFoundError:
        raise OptionError(f"{where}, nor on the Hub (a private repo needs a login: hf auth login)") from None
    except HfHubHTTPError as err:
        raise OptionError(f"{where}; the Hub answered {str(err).splitlines()[0]}") from None
    except Exception as err:  # no network, DNS, proxy, timeout: httpx/requests/OSError, whichever is used
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OptionError(f"{where}, and the Hub is unreachable ({reason})") from None


def check_data(source: str, flag: str = "--dataset") -> None:
    """A data source: an existing file or folder, or a Hub dataset id that can be loaded."""
    if Path(source).expanduser().exists():
        return
    if looks_like_path(source):
        raise OptionError(f"{flag} {source}: no such file or folder")
    check_hub(source, flag, "dataset")


def check_model(name: str, flag: str = "--model", revision: str | None = None) -> None:
    """A base model (or tokenizer): a folder transformers can load, or a Hub id that can be fetched."""
    path = Path(name).expanduser()
    if path.is_dir():
        markers = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")
        if not any((path / marker).is_file() for marker in markers):
            raise OptionError(f"{flag} {name}: the folder has no config.json (not a transformers model)")
        return
    if path.exists():
        raise OptionError(f"{flag} {name}: a file; expected a model folder or a Hub id")
    if looks_like_path(name):
        raise OptionError(f"{flag} {name}: no such folder")
    check_hub(name, flag, "model", revision)
