"""Resumable checkpoints shared by the trainers: step folders written atomically.

``output_dir/checkpoint-<step>/`` holds
- ``bilora_adapters.safetensors``: both branches of every trained component (`state.save_bilora_state`);
- ``optimizer.pt`` / ``scheduler.pt``: state dicts of tensors and numbers only (loaded with weights_only=True);
  under FSDP with ``--fsdp_state_dict sharded``, ``optimizer-rank<k>-of-<n>.pt`` instead: each rank's shard;
- ``rng.pt``: torch CPU/CUDA generator states;
- ``training_config.yaml``: the resolved options;
- ``trainer_state.json``: step, data position and what the run was (method, ranks, base model, data: the
  trainer's ``identity``, compared on resume) — written last.

A checkpoint is first written to a hidden temporary folder and renamed when complete, so a crash (or kill -9)
mid-write never leaves a folder that looks complete, and the previous checkpoint is deleted by rotation only
after the new one exists.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import BiLoRAConfig
from .errors import CheckpointError
from .files import umask_dir
from .state import STATE_FILE, load_bilora_state, save_bilora_state

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "training_config.yaml"
MIN_FREE_BYTES = 64 * 2**20
OPTIMIZER_FILE = "optimizer.pt"


def optimizer_shard_name(rank: int, world: int) -> str:
    return f"optimizer-rank{rank}-of-{world}.pt"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (their trainer_state.json exists), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path | None:
    """'latest' -> the newest complete checkpoint in output_dir (None if there is none); else the folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint: {spec} is not a complete checkpoint folder")
    return path


def check_free_space(folder: str | os.PathLike, needed: int) -> None:
    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(probe).free
    if free < needed + MIN_FREE_BYTES:
        raise CheckpointError(
            f"not enough free disk space in {probe}: {free / 2**20:.0f} MiB free, "
            f"{(needed + MIN_FREE_BYTES) / 2**20:.0f} MiB needed; the previous checkpoint is kept"
        )


def _estimate_bytes(components: dict[str, nn.Module]) -> int:
    params = sum(
        p.numel() * p.element_size() for m in components.values() for p in m.parameters() if p.requires_grad
    )
    return params * 4  # adapters + two Adam moments + slack


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    components: dict[str, nn.Module],
    configs: dict[str, BiLoRAConfig],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    options_yaml: str,
    total_limit: int | None = None,
    optimizer_state: dict | None = None,
    rank_files: list[Path] = (),
) -> Path:
    """Write checkpoint-<step> atomically, then rotate old ones down to ``total_limit``. ``optimizer_state``
    replaces ``optimizer.state_dict()`` (e.g. gathered from every rank); ``rank_files`` (each rank's optimizer
    shard, already written) are moved in instead of an ``optimizer.pt``."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    check_free_space(root, _estimate_bytes(components))
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=root))
    try:
        save_bilora_state(tmp / STATE_FILE, components, configs)
        if rank_files:
            missing = [Path(f).name for f in rank_files if not Path(f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{', '.join(missing)} not found from the main process: --fsdp_state_dict sharded needs an "
                    "--output_dir every process shares (one machine or a shared filesystem); use full"
                )
            for file in rank_files:
                shutil.move(str(file), tmp / Path(file).name)
        else:
            torch.save(optimizer_state or optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / CONFIG_FILE).write_text(options_yaml)
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        umask_dir(tmp)  # mkdtemp made it 0700; the folder gets the mode of any folder the user makes
        if final.exists():  # a checkpoint of the same step (e.g. re-run after resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {final}: {err}; the previous checkpoint is kept") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".checkpoint-*.tmp"):  # leftovers of a crashed earlier write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    components: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Restore adapters, optimizer, scheduler and RNG; returns the trainer state (step, data position).
    Optimizer state is ``optimizer.pt`` (whole tensors; any number of processes) or this rank's shard."""
    path = Path(path)
    try:
        load_bilora_state(path / STATE_FILE, components)
    except ValueError as err:
        raise CheckpointError(f"--resume_from_checkpoint {path}: {err}") from err
    optimizer.load_state_dict(safe_torch_load(optimizer_file(path, rank, world)))
    scheduler.load_state_dict(safe_torch_load(path / "scheduler.pt"))
    rng = safe_torch_load(path / "rng.pt")
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / TRAINER_STATE).read_text())


def optimizer_file(path: Path, rank: int, world: int) -> Path:
    """The optimizer state a rank resumes from: the whole state, or its own shard of a sharded one."""
    if (path / OPTIMIZER_FILE).is_file():
        return path / OPTIMIZER_FILE
    shards = sorted(path.glob("optimizer-rank*-of-*.pt"))
    mine = path / optimizer_shard_name(rank, world)
    if shards and not mine.is_file():
        saved = re.search(r"-of-(\d+)\.pt$", shards[0].name).group(1)
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: its optimizer state is sharded over {saved} processes, this run "
            f"has {world}; resume with {saved} processes (checkpoints written with --fsdp_state_dict full "
            "resume on any number)"
        )
    return mine if shards else path / OPTIMIZER_FILE


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True: tensors, numbers and containers only — a pickle that would run code
    is refused with a message naming the file, and nothing in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing from the checkpoint") from err
    except Exception as err:  # UnpicklingError, RuntimeError: weights_only refusals and corrupt files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused (not a plain tensor file; nothing in it was run): {first}"
        ) from err


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_compatible(
    trainer_state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike
) -> None:
    """Refuse to resume a checkpoint whose identity differs from this run's: every key of ``expected`` (the
    trainer's `identity`: method, ranks, base model, data, ...) that the checkpoint saved must be equal (a key
    it lacks, from an older version, is not compared); a seed change only warns."""
    for key, value in expected.items():
        if key == "seed" or key not in trainer_state or trainer_state[key] == _as_json(value):
            continue
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: it was made with {key}={trainer_state[key]!r}, "
            f"this run has {key}={value!r}"
        )
    if trainer_state.get("seed") != expected.get("seed"):
        logger.warning(
            "resuming with seed %s, the checkpoint used %s", expected.get("seed"), trainer_state.get("seed")
        )


def _as_json(value: Any) -> Any:
    """``value`` as trainer_state.json gives it back (tuples become lists)."""
    return json.loads(json.dumps(value))
