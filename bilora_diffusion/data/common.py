"""Types shared by the data modules (kept apart so sources.py and records.py do not import each other)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class RowSource:
    """Where a sample of a Hugging Face dataset lives: `dataset[row][column]`, the column not decoded.

    `dataset` holds only the image column, cast to `Image(decode=False)`, so reopening a row reads its bytes
    (or path) and nothing else. `base_dir` resolves relative string paths of a local dataset.
    """

    dataset: Any
    row: int
    column: str
    base_dir: str | None = None


def image_value_bytes(value: Any, base_dir: str | None) -> bytes:
    """The encoded bytes behind one HF image cell: {"bytes", "path"} dict, raw bytes, a path or a PIL image.

    Raises OSError when a path cannot be read and TypeError for a value that is not an image at all.
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return read_file(value["path"], base_dir)
        if "bytes" in value:
            return b""  # {"bytes": b"", ...}: an empty file, reported as such
        raise TypeError(f"image dict without 'bytes' or 'path' (keys: {sorted(value)})")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return read_file(value, base_dir)
    if value is None:
        raise TypeError("no image (the cell is empty)")
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image handed over already decoded
        import io

        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def read_file(path: str, base_dir: str | None = None) -> bytes:
    """Read a file; a relative path is tried against `base_dir` (the local dataset folder), then as given."""
    if base_dir is not None and not os.path.isabs(path) and os.path.exists(os.path.join(base_dir, path)):
        path = os.path.join(base_dir, path)
    with open(path, "rb") as handle:
        return handle.read()
