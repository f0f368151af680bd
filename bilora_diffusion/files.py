"""Files the project writes get the permissions of the user's umask, like any file a program writes.

Atomic writes go through a temporary file or folder that is renamed when complete; ``tempfile.mkstemp``
creates it 0600 and ``tempfile.mkdtemp`` 0700 (private on purpose), and the rename keeps that mode. So every
atomic write calls `umask_file` / `umask_dir` on its temporary before the rename: a LoRA file, a
``checkpoint-N/`` folder or a cache entry is then as readable by a ComfyUI service or a teammate as the
``training_config.yaml`` written next to it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
"""Names taken as one checkpoint file (a safetensors file is checked; a pickled one is refused)."""


def current_umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored under a lock)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def umask_file(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have given it: 0o666 & ~umask."""
    os.chmod(path, 0o666 & ~current_umask())


def umask_dir(path: str | os.PathLike) -> None:
    """Give the folder ``path`` the mode ``os.mkdir`` would have given it: 0o777 & ~umask."""
    os.chmod(path, 0o777 & ~current_umask())


def umask_tree(root: str | os.PathLike) -> None:
    """`umask_dir` on ``root`` and every folder under it, `umask_file` on every file: for folders written by
    other libraries' ``save_pretrained`` (transformers writes its weights 0600 through a temporary file)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)
