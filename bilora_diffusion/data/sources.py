"""Finding the samples of a dataset: which kind of source a path is, and what each sample's caption is.

Four kinds, detected from the path (see `open_source`):
- a kohya-style folder: images with same-name caption files, subfolders included;
- an "imagefolder" folder: images plus metadata.jsonl / metadata.csv (`file_name` + caption column), read
  here directly so it works offline and reports every bad row instead of failing on the first;
- a dataset written by `Dataset.save_to_disk` (or a DatasetDict: its "train" split);
- a Hugging Face Hub id (or a local folder of parquet/arrow/csv/json files), through `datasets.load_dataset`.
Nothing here decodes images; records.py does that once per sample in the scan.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bilora_diffusion.data.common import (
    IMAGE_EXTENSIONS,
    METADATA_NAMES,
    RowSource,
    image_value_bytes,
)
from bilora_diffusion.errors import DataError

# Files a folder dataset may hold next to its images without being bad samples.
_HARMLESS_PREFIXES = ("readme", "license", "licence")
_HARMLESS_EXTENSIONS = {".npz": "kohya latent cache", ".md": "documentation"}
# Files that make a folder without images a dataset for `datasets.load_dataset(folder)`.
_DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_SUPPORTED = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


@dataclass
class Candidate:
    """One sample before its image is checked: where it is, its caption, and what is already known wrong."""

    key: str
    source: str | RowSource
    caption: str | None = None  # the caption to train with; None when caption_problem says why there is none
    problem: str | None = None  # known without decoding ("not an image: ...", "file not found: ...")
    caption_problem: str | None = None  # "missing caption: ...", "empty caption: ...", ...
    data: bytes | None = None  # the encoded image when the source already holds it (HF rows)


@dataclass
class SourceListing:
    """The samples of one dataset, lazily for HF datasets (bytes are read batch by batch)."""

    kind: str  # "kohya folder", "imagefolder (metadata)", "save_to_disk dataset", "Hub dataset", ...
    location: str
    candidates: Iterable[Candidate]
    ignored: list[tuple[str, str]] = field(default_factory=list)


def caption_text(value: Any) -> str | None:
    """A caption cell as text: None stays None (missing); a list gives its first non-empty string."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        texts = [item for item in value if isinstance(item, str)]
        return next((text for text in texts if text.strip()), texts[0] if texts else None)
    return str(value)


def apply_caption(
    candidate: Candidate, raw: str | None, instance_prompt: str | None, where: str
) -> Candidate:
    """Set the caption by the precedence rule: a non-empty caption wins, else instance_prompt, else a problem.

    `where` names the caption's place for the message ("no a.txt next to it", "column 'text'").
    """
    if raw is not None and raw.strip():
        candidate.caption = raw.strip()
    elif instance_prompt is not None:
        candidate.caption = instance_prompt
    elif raw is None:
        candidate.caption_problem = f"missing caption: {where}"
    else:
        candidate.caption_problem = f"empty caption: {where}"
    return candidate


def walk_files(root: str) -> list[str]:
    """Every non-hidden file under root as a sorted relative POSIX path (symlinked folders followed once)."""
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink cycle or a second link to the same folder
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        relative_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):  # .DS_Store, .gitattributes, editor swap files: never samples
                continue
            relative = name if relative_dir == "." else os.path.join(relative_dir, name)
            found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def _extension(relative: str) -> str:
    return posixpath.splitext(relative)[1].lower()


def _harmless_reason(relative: str) -> str | None:
    """Why a non-image file is expected in a dataset folder (README, LICENSE, kohya .npz caches), else None."""
    name = posixpath.basename(relative).lower()
    if name.startswith(_HARMLESS_PREFIXES):
        return "documentation"
    return _HARMLESS_EXTENSIONS.get(_extension(relative))


def _not_an_image(key: str, path: str, relative: str) -> Candidate:
    extension = _extension(relative) or "(no extension)"
    return Candidate(
        key, path, problem=f"not an image: unsupported file type {extension} (images: {_SUPPORTED})"
    )


def _read_caption_file(path: str) -> tuple[str | None, str | None]:
    """(text, problem): text None when the file does not exist; problem when it exists but cannot be read."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"unreadable caption: {path}: {exc.strerror or exc}"
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return None, f"unreadable caption: {path} is not UTF-8 text"


def kohya_listing(
    root: str, files: list[str], caption_extension: str, instance_prompt: str | None
) -> SourceListing:
    """Images with same-name caption files (`a.png` + `a.txt`); caption files without an image are ignored."""
    image_stems = {posixpath.splitext(f)[0] for f in files if _extension(f) in IMAGE_EXTENSIONS}
    candidates: list[Candidate] = []
    ignored: list[tuple[str, str]] = []
    for relative in files:
        key = os.path.join(root, relative)
        path = os.path.abspath(key)
        if _extension(relative) in IMAGE_EXTENSIONS:
            caption_path = os.path.splitext(path)[0] + caption_extension
            text, problem = _read_caption_file(caption_path)
            where = f"no {os.path.basename(caption_path)} next to it"
            candidate = Candidate(key, path, caption_problem=problem)
            candidates.append(
                candidate if problem else apply_caption(candidate, text, instance_prompt, where)
            )
        elif relative.lower().endswith(caption_extension.lower()):
            if relative[: -len(caption_extension)] not in image_stems:
                ignored.append((key, "caption file without an image"))
        elif (reason := _harmless_reason(relative)) is not None:
            ignored.append((key, reason))
        else:
            candidates.append(_not_an_image(key, path, relative))
    images = [c for c in candidates if c.problem is None]
    if images and instance_prompt is None and all(c.caption is None for c in images):
        raise DataError(
            f"{root}: none of its {len(images)} images has a caption file (*{caption_extension}); add caption "
            "files, set --caption_extension, or pass --instance_prompt to train every image on one prompt"
        )
    return SourceListing("kohya folder", root, candidates, ignored)


def _read_metadata(path: str, key: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Rows of a metadata.jsonl / metadata.csv as (line number, dict), and (line, message) for broken rows."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}: cannot read the metadata file ({exc})") from exc
    rows: list[tuple[int, dict]] = []
    errors: list[tuple[int, str]] = []
    if path.endswith(".csv"):
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
        return rows, errors
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append((number, f"invalid JSON ({exc.msg})"))
            continue
        if isinstance(row, dict):
            rows.append((number, row))
        else:
            errors.append((number, f"a JSON {type(row).__name__}, not an object"))
    return rows, errors


def _metadata_entries(
    root: str, meta: str, caption_column: str, instance_prompt: str | None
) -> tuple[dict[str, tuple[Any, str]], list[Candidate]]:
    """One metadata file: {image relative path: (caption cell, "where")} and bad-row candidates."""
    key = os.path.join(root, meta)
    rows, errors = _read_metadata(os.path.join(root, meta), key)
    columns = sorted({name for _, row in rows for name in row})
    if rows and "file_name" not in columns:
        raise DataError(f"{key}: no 'file_name' column (columns: {', '.join(columns)})")
    if rows and instance_prompt is None and caption_column not in columns:
        raise DataError(
            f"{key}: no caption column '{caption_column}' (columns: {', '.join(columns)}); "
            "set --caption_column, or pass --instance_prompt"
        )
    bad = [Candidate(f"{key}:{line}", key, problem=f"bad metadata: {message}") for line, message in errors]
    entries: dict[str, tuple[Any, str]] = {}
    directory = posixpath.dirname(meta)
    for line, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            bad.append(Candidate(f"{key}:{line}", key, problem="bad metadata: empty file_name"))
            continue
        relative = posixpath.normpath(posixpath.join(directory, name.strip().replace("\\", "/")))
        where = f"{posixpath.basename(meta)} line {line}"
        if relative in entries:
            problem = f"bad metadata: {relative} listed again (first at {entries[relative][1]})"
            bad.append(Candidate(f"{key}:{line}", key, problem=problem))
            continue
        entries[relative] = (row.get(caption_column), where)
    return entries, bad


def imagefolder_listing(
    root: str, files: list[str], caption_column: str, instance_prompt: str | None
) -> SourceListing:
    """The datasets "imagefolder" convention: metadata.jsonl/.csv rows name images by `file_name`.

    `file_name` is relative to the metadata file's folder; an image no row lists has no caption.
    """
    metas = [f for f in files if posixpath.basename(f) in METADATA_NAMES]
    folders = [posixpath.dirname(f) for f in metas]
    if len(set(folders)) != len(folders):
        twice = sorted({d for d in folders if folders.count(d) > 1})
        raise DataError(f"{os.path.join(root, twice[0])}: both metadata.jsonl and metadata.csv; keep one")
    entries: dict[str, tuple[Any, str]] = {}
    candidates: list[Candidate] = []
    for meta in metas:
        found, bad = _metadata_entries(root, meta, caption_column, instance_prompt)
        entries.update(found)
        candidates.extend(bad)
    ignored: list[tuple[str, str]] = []
    for relative in files:
        if relative in metas:
            continue
        key = os.path.join(root, relative)
        path = os.path.abspath(key)
        listed = entries.pop(posixpath.normpath(relative), None)
        if _extension(relative) in IMAGE_EXTENSIONS:
            candidate = Candidate(key, path)
            if listed is None:
                apply_caption(candidate, None, instance_prompt, "not listed in any metadata file")
            else:
                apply_caption(
                    candidate, caption_text(listed[0]), instance_prompt, f"'{caption_column}' at {listed[1]}"
                )
            candidates.append(candidate)
        elif listed is None and (reason := _harmless_reason(relative)) is not None:
            ignored.append((key, reason))
        else:
            candidates.append(_not_an_image(key, path, relative))
    for relative, (_, where) in entries.items():  # rows whose file does not exist
        key = os.path.join(root, relative)
        candidates.append(Candidate(key, os.path.abspath(key), problem=f"file not found: listed at {where}"))
    candidates.sort(key=lambda c: c.key)
    return SourceListing("imagefolder (metadata)", root, candidates, ignored)


def _train_split(loaded: Any, name: str) -> Any:
    """The Dataset to train on: itself, or the "train" split of a DatasetDict (or its only split)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if isinstance(loaded, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(f"{name}: streaming datasets are not supported; load it without streaming")
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(f"{name}: no 'train' split (splits: {', '.join(loaded)})")
    raise DataError(f"{name}: not a datasets.Dataset ({type(loaded).__name__})")


def hf_listing(
    loaded: Any,
    name: str,
    kind: str,
    image_column: str,
    caption_column: str,
    instance_prompt: str | None,
    base_dir: str | None = None,
) -> SourceListing:
    """Samples of a Hugging Face dataset, rows keyed "<name>[<row>]", images read undecoded batch by batch.

    The image column is cast to `Image(decode=False)` so a corrupt row is reported by the scan instead of
    raising inside datasets' decoder, and each row's bytes are decoded exactly once.
    """
    import datasets

    dataset = _train_split(loaded, name)
    columns = dataset.column_names
    if image_column not in columns:
        raise DataError(
            f"{name}: no image column '{image_column}' (columns: {', '.join(columns)}); set --image_column"
        )
    has_captions = caption_column in columns
    if not has_captions and instance_prompt is None:
        raise DataError(
            f"{name}: no caption column '{caption_column}' (columns: {', '.join(columns)}); "
            "set --caption_column, or pass --instance_prompt"
        )
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.with_format(None)
    source = dataset.select_columns([image_column])
    scanned = dataset.select_columns([image_column] + ([caption_column] if has_captions else []))

    def generate() -> Iterator[Candidate]:
        row = 0
        for batch in scanned.iter(batch_size=64):
            for index, value in enumerate(batch[image_column]):
                candidate = Candidate(f"{name}[{row}]", RowSource(source, row, image_column, base_dir))
                try:
                    candidate.data = image_value_bytes(value, base_dir)
                except FileNotFoundError as exc:
                    candidate.problem = f"file not found: {exc.filename}"
                except OSError as exc:
                    candidate.problem = f"unreadable: {exc}"
                except TypeError as exc:
                    candidate.problem = f"not an image: {exc}"
                raw = caption_text(batch[caption_column][index]) if has_captions else None
                yield apply_caption(candidate, raw, instance_prompt, f"column '{caption_column}'")
                row += 1

    return SourceListing(kind, name, generate())


def _classify_folder(files: list[str]) -> str:
    """Which kind of local dataset a folder is, from the files in it (metadata first: it also has images)."""
    top = set(files)
    if any(posixpath.basename(f) in METADATA_NAMES for f in files):
        return "imagefolder"
    if {"dataset_info.json", "state.json"} <= top or "dataset_dict.json" in top:
        return "save_to_disk"
    if any(_extension(f) in IMAGE_EXTENSIONS for f in files):
        return "kohya"
    if any(_extension(f) in _DATA_FILE_EXTENSIONS for f in files):
        return "data_files"
    return "kohya"  # nothing usable: the folder scan reports what is there


def _local_listing(root: str, option: str, settings: dict[str, Any]) -> SourceListing:
    files = walk_files(root)
    kind = _classify_folder(files)
    hf_args = (settings["image_column"], settings["caption_column"], settings["instance_prompt"])
    if kind == "imagefolder":
        return imagefolder_listing(root, files, settings["caption_column"], settings["instance_prompt"])
    if kind == "kohya":
        return kohya_listing(root, files, settings["caption_extension"], settings["instance_prompt"])
    import datasets  # imported only here: it takes a second, and folder datasets do not need it

    try:
        if kind == "save_to_disk":
            loaded, label = datasets.load_from_disk(root), "save_to_disk dataset"
        else:
            config, cache_dir = settings["dataset_config_name"], settings["cache_dir"]
            loaded, label = datasets.load_dataset(root, config, cache_dir=cache_dir), "local data files"
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{option} {root}: cannot load it with datasets ({type(exc).__name__}: {exc})"
        ) from exc
    return hf_listing(loaded, root, label, *hf_args, base_dir=root)


def _hub_listing(name: str, option: str, data_dir: str | None, settings: dict[str, Any]) -> SourceListing:
    """The path users run with a Hub id: `datasets.load_dataset(id, config, cache_dir=, revision=)`."""
    import datasets

    try:
        loaded = datasets.load_dataset(
            name,
            settings["dataset_config_name"],
            cache_dir=settings["cache_dir"],
            revision=settings["revision"],
            data_dir=data_dir,
        )
    except Exception as exc:
        raise DataError(
            f"{option} {name}: no such local folder, and loading it as a Hugging Face Hub dataset failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    args = (settings["image_column"], settings["caption_column"], settings["instance_prompt"])
    return hf_listing(loaded, name, "Hub dataset", *args)


def open_source(
    dataset: Any, dataset_name: str | None, train_data_dir: str | None, settings: dict[str, Any]
) -> SourceListing:
    """Resolve the three dataset options to one source and list its samples.

    `dataset` and `dataset_name` mean the same (a folder or a Hub id); `train_data_dir` alone is a local
    folder; with a Hub id it is the `data_dir` inside the repository (diffusers' meaning), with a local
    `dataset_name` a subfolder of it. `settings` carries the remaining load_records options.
    """
    if dataset is not None and dataset_name is not None and dataset != dataset_name:
        raise DataError(f"--dataset {dataset} and --dataset_name {dataset_name} both given; give one")
    name, option = (dataset, "--dataset") if dataset is not None else (dataset_name, "--dataset_name")
    if name is not None and not isinstance(name, str):  # a datasets.Dataset / DatasetDict object
        args = (settings["image_column"], settings["caption_column"], settings["instance_prompt"])
        return hf_listing(name, "dataset", "in-memory dataset", *args)
    if name is None:
        if train_data_dir is None:
            raise DataError(
                "no dataset given: pass --dataset (a folder or a Hub id), --dataset_name or --train_data_dir"
            )
        if not os.path.isdir(train_data_dir):
            raise DataError(f"--train_data_dir {train_data_dir}: folder not found")
        return _local_listing(os.path.normpath(train_data_dir), "--train_data_dir", settings)
    local = name if train_data_dir is None else os.path.join(name, train_data_dir)
    if os.path.isdir(local):
        return _local_listing(os.path.normpath(local), option, settings)
    if os.path.exists(local):
        raise DataError(f"{option} {local}: a file, not a folder or a Hub dataset id")
    if not _HUB_ID.fullmatch(name) or ".." in name:
        raise DataError(f"{option} {local}: folder not found")
    return _hub_listing(name, option, train_data_dir, settings)
