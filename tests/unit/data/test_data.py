"""The data layer: dataset sources, the pre-flight scan's verdicts, image conversion, buckets and batches."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from bilora_diffusion.data import (
    DataError,
    RowSource,
    assign_bucket,
    epoch_batches,
    load_records,
    make_buckets,
    open_image,
    resize_size,
)

# ----------------------------------------------------------------------------------------------- helpers


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _write(path, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def _rgb(size=(48, 32), color=(10, 200, 30)) -> bytes:
    return _encode(Image.new("RGB", size, color))


def _corrupt_png() -> bytes:
    """A PNG whose IDAT payload has one byte flipped: the chunk CRC no longer matches."""
    data = bytearray(_rgb())
    at = data.index(b"IDAT") + 8
    data[at] ^= 0xFF
    return bytes(data)


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) // 2]


def _sixteen_bit_png() -> tuple[bytes, np.ndarray]:
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return _encode(image), values


def _kohya_folder(root) -> dict[str, bytes]:
    """A folder with one sample of every verdict the scan gives; returns {relative path: bytes}."""
    sixteen, _ = _sixteen_bit_png()
    palette = Image.new("RGB", (32, 32), (200, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 128))
    files = {
        "good.png": _rgb(),
        "good.txt": "a green square",
        "sub/deep.jpg": _encode(Image.new("RGB", (40, 40), "blue"), "JPEG"),
        "sub/deep.txt": "  a blue square\n",
        "corrupt.png": _corrupt_png(),
        "corrupt.txt": "x",
        "truncated.jpg": _truncated_jpeg(),
        "truncated.txt": "x",
        "zero.png": b"",
        "zero.txt": "x",
        "fake.png": "this is text, not a PNG",
        "fake.txt": "x",
        "notes.bin": b"\x00\x01",
        "orphan.txt": "caption without an image",
        "README.md": "# my dataset",
        "nocaption.png": _rgb(),
        "emptycaption.png": _rgb(),
        "emptycaption.txt": "   \n",
        "cmyk.jpg": _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95),
        "cmyk.txt": "cmyk",
        "sixteen.png": sixteen,
        "sixteen.txt": "16 bit",
        "palette.png": _encode(palette),
        "palette.txt": "palette",
        "rgba.png": _encode(rgba),
        "rgba.txt": "rgba",
        "gray.png": _encode(Image.new("L", (32, 32), 77)),
        "gray.txt": "gray",
    }
    for relative, data in files.items():
        _write(os.path.join(root, relative), data)
    return files


# ----------------------------------------------------------------------------------------------- buckets


def test_make_buckets_grid_area_ratio():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets and (1536, 640) in buckets and (640, 1536) in buckets
    assert buckets[0] == (512, 2048) and buckets[-1] == (2048, 512)  # ratio 4 at both ends
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 1024 * 1024
        assert max(width / height, height / width) <= 4.0
        assert (height, width) in buckets
    # each width gets the tallest height on the grid: one more row of 64 would exceed the area
    assert all((w * (h + 64) > 1024 * 1024) or (h, w) in buckets for w, h in buckets)


def test_assign_bucket_hand_computed():
    # 1536x640 has ratio 2.4, exactly the bucket (1536, 640) (area 983040 <= 1024²): no scaling needed.
    assert assign_bucket((1536, 640), 1024, bucketing=True) == (1536, 640)
    assert assign_bucket((3072, 1280), 1024, bucketing=True) == (1536, 640)
    assert assign_bucket((640, 1536), 1024, bucketing=True) == (640, 1536)
    # 1200x800 (ratio 1.5, 0.96 MP) cannot cover any ~1 MP bucket without upscaling...
    assert assign_bucket((1200, 800), 1024, bucketing=True) is None
    # ...with 10 % allowed, (1216, 832) (ratio 1.46, needs x1.04) beats (1280, 768) (ratio 1.67, needs x1.07).
    assert assign_bucket((1200, 800), 1024, bucketing=True, max_upscale=1.1) == (1216, 832)
    # No bucketing: the square, if the shorter side reaches it within max_upscale (1024 / 640 = 1.6).
    assert assign_bucket((1536, 640), 1024, bucketing=False) is None
    assert assign_bucket((1536, 640), 1024, bucketing=False, max_upscale=1.6) == (1024, 1024)
    assert assign_bucket((2048, 1024), 1024, bucketing=False) == (1024, 1024)
    # Tie: at resolution 1000 a square image sits between (960, 1024) and (1024, 960), same area: the wider.
    assert assign_bucket((2000, 2000), 1000, bucketing=True) == (1024, 960)


def test_resize_size_covers_bucket():
    assert resize_size((3072, 1280), (1536, 640)) == (1536, 640)
    assert resize_size((1000, 1500), (1024, 1024)) == (1024, 1536)  # width is the shorter relative side
    assert resize_size((2000, 600), (1024, 1024)) == (3413, 1024)
    assert resize_size((999, 1000), (512, 512)) == (512, 513)  # 512.51 rounds to 513, never below the bucket


def test_epoch_batches_deterministic_cover_once_one_bucket():
    rng = np.random.default_rng(1)
    choices = [(1024, 1024), (1536, 640), (640, 1536)]
    buckets = [choices[i] for i in rng.integers(0, 3, 50)] + [None]
    batches = epoch_batches(buckets, batch_size=4, seed=7, epoch=0)
    assert batches == epoch_batches(buckets, batch_size=4, seed=7, epoch=0)
    assert batches != epoch_batches(buckets, batch_size=4, seed=7, epoch=1)
    assert batches != epoch_batches(buckets, batch_size=4, seed=8, epoch=0)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(50))  # every sample once; the None one left out
    assert all(len({buckets[i] for i in batch}) == 1 and 1 <= len(batch) <= 4 for batch in batches)
    counts = Counter(buckets[:50])
    dropped = epoch_batches(buckets, batch_size=4, seed=7, epoch=0, drop_last=True)
    assert all(len(batch) == 4 for batch in dropped)
    assert len(dropped) == sum(n // 4 for n in counts.values())


# ----------------------------------------------------------------------------------------------- scan


def test_kohya_scan_verdicts(tmp_path):
    root = str(tmp_path / "icons")
    _kohya_folder(root)
    report = load_records(root)
    skipped = {os.path.relpath(key, root): reason for key, reason in report.skipped}
    assert skipped["corrupt.png"].startswith("corrupt image:")
    assert skipped["truncated.jpg"].startswith("truncated image:")
    assert skipped["zero.png"] == "empty file: 0 bytes"
    assert skipped["fake.png"].startswith("not an image:")
    assert skipped["notes.bin"].startswith("not an image: unsupported file type .bin")
    assert skipped["nocaption.png"] == "missing caption: no nocaption.txt next to it"
    assert skipped["emptycaption.png"].startswith("empty caption:")
    assert len(skipped) == 7
    ignored = {os.path.relpath(key, root): reason for key, reason in report.ignored}
    assert ignored == {"orphan.txt": "caption file without an image", "README.md": "documentation"}
    converted = {os.path.relpath(key, root): label for key, label in report.converted}
    assert converted == {
        "cmyk.jpg": "mode CMYK -> RGB",
        "sixteen.png": "mode I;16 -> RGB (scaled to 8 bits)",
        "palette.png": "mode P -> RGB",
        "rgba.png": "mode RGBA -> RGB on white",
        "gray.png": "mode L -> RGB",
    }
    records = {os.path.relpath(r.key, root): r for r in report.records}
    assert sorted(records) == [
        "cmyk.jpg",
        "good.png",
        "gray.png",
        "palette.png",
        "rgba.png",
        "sixteen.png",
        "sub/deep.jpg",
    ]
    assert [r.key for r in report.records] == sorted(r.key for r in report.records)  # deterministic order
    assert records["good.png"].caption == "a green square" and records["good.png"].size == (48, 32)
    assert records["sub/deep.jpg"].caption == "a blue square"  # stripped
    assert records["good.png"].source == os.path.abspath(os.path.join(root, "good.png"))
    assert len(records["good.png"].fingerprint) == 32
    summary = report.summary()
    assert "14 samples, 7 usable, 7 skipped" in summary and "1 truncated image" in summary
    assert "5 converted to RGB" in summary and "2 other files ignored" in summary


def test_on_bad_image_error_names_files_and_count(tmp_path):
    root = str(tmp_path / "icons")
    _kohya_folder(root)
    with pytest.raises(DataError) as caught:
        load_records(root, on_bad_image="error")
    message = str(caught.value)
    assert "7 bad sample(s)" in message and "--on_bad_image skip" in message
    assert os.path.join(root, "corrupt.png") in message and "... and 2 more" in message
    with pytest.raises(DataError, match="on_bad_image 'maybe'"):
        load_records(root, on_bad_image="maybe")


def test_open_image_converts_modes(tmp_path):
    root = str(tmp_path / "icons")
    _kohya_folder(root)
    records = {os.path.relpath(r.key, root): r for r in load_records(root).records}
    images = {name: open_image(record) for name, record in records.items()}
    assert all(image.mode == "RGB" and image.size == records[name].size for name, image in images.items())
    _, values = _sixteen_bit_png()
    sixteen = np.asarray(images["sixteen.png"])[..., 0]
    np.testing.assert_array_equal(sixteen, np.round(values / 257).astype(np.uint8))  # scaled, not clipped
    assert sixteen[0].tolist() == [0, 1, 128, 255]
    red = np.asarray(images["cmyk.jpg"]).astype(int)[16, 16]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert np.asarray(images["palette.png"])[5, 5].tolist() == [200, 0, 0]
    half = np.asarray(images["rgba.png"]).astype(int)[5, 5]  # 50 % red over white
    assert half[0] == 255 and abs(half[1] - 127) <= 1 and abs(half[2] - 127) <= 1
    assert np.asarray(images["gray.png"])[0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_swaps_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60x20, shown 20x60
    _write(str(tmp_path / "d" / "rot.jpg"), _encode(Image.new("RGB", (60, 20), "red"), "JPEG", exif=exif))
    _write(str(tmp_path / "d" / "rot.txt"), "rotated")
    (record,) = load_records(str(tmp_path / "d")).records
    assert record.size == (20, 60)
    assert open_image(record).size == (20, 60)


def test_open_image_reports_files_changed_after_scan(tmp_path):
    root = str(tmp_path / "d")
    _write(os.path.join(root, "a.png"), _rgb())
    _write(os.path.join(root, "a.txt"), "a")
    (record,) = load_records(root).records
    _write(os.path.join(root, "a.png"), _rgb()[:40])
    with pytest.raises(DataError, match="a.png: cannot be read any more"):
        open_image(record)
    _write(os.path.join(root, "a.png"), _rgb(size=(10, 10)))
    with pytest.raises(DataError, match=r"a.png: changed since the pre-flight scan \(was 48x32, now 10x10\)"):
        open_image(record)


def test_min_size_reports_too_small(tmp_path):
    root = str(tmp_path / "d")
    _write(os.path.join(root, "big.png"), _rgb(size=(64, 80)))
    _write(os.path.join(root, "small.png"), _rgb(size=(100, 63)))
    report = load_records(root, instance_prompt="x", min_size=64)
    assert [os.path.basename(r.key) for r in report.records] == ["big.png"]
    assert report.skipped == [
        (os.path.join(root, "small.png"), "too small: 100x63, shorter side below min_size 64")
    ]


def test_instance_prompt_and_caption_precedence(tmp_path):
    root = str(tmp_path / "d")
    _write(os.path.join(root, "a.png"), _rgb())
    _write(os.path.join(root, "b.png"), _rgb())
    _write(os.path.join(root, "c.png"), _rgb())
    with pytest.raises(DataError, match="none of its 3 images has a caption file.*--instance_prompt"):
        load_records(root)
    captions = [r.caption for r in load_records(root, instance_prompt="a TOK icon").records]
    assert captions == ["a TOK icon"] * 3
    _write(os.path.join(root, "a.caption"), "own caption")  # the caption file wins over instance_prompt
    _write(os.path.join(root, "b.caption"), "")  # an empty one does not
    report = load_records(root, instance_prompt="a TOK icon", caption_extension="caption")
    assert [r.caption for r in report.records] == ["own caption", "a TOK icon", "a TOK icon"]


def test_empty_dataset_is_an_error(tmp_path):
    root = str(tmp_path / "captions-only")
    _write(os.path.join(root, "a.txt"), "a caption")
    with pytest.raises(DataError, match="captions-only: no usable samples"):
        load_records(root)
    _write(os.path.join(root, "a.png"), b"")
    with pytest.raises(DataError, match=r"a.png: empty file: 0 bytes"):
        load_records(root)


def test_dataset_options(tmp_path):
    with pytest.raises(DataError, match="no dataset given"):
        load_records()
    with pytest.raises(DataError, match="both given"):
        load_records("a", dataset_name="b")
    with pytest.raises(DataError, match="--dataset ./missing/folder: folder not found"):
        load_records("./missing/folder")
    with pytest.raises(DataError, match="--train_data_dir .*nope: folder not found"):
        load_records(train_data_dir=str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------- metadata


def _imagefolder(root, kind: str) -> None:
    _write(os.path.join(root, "img", "a.png"), _rgb())
    _write(os.path.join(root, "img", "b.png"), _rgb(color=(1, 2, 3)))
    _write(os.path.join(root, "img", "unlisted.png"), _rgb())
    _write(os.path.join(root, "img", "bad.png"), _corrupt_png())
    rows = [
        {"file_name": "img/b.png", "text": "second"},
        {"file_name": "img/a.png", "text": "first"},
        {"file_name": "img/bad.png", "text": "bad"},
        {"file_name": "img/missing.png", "text": "gone"},
    ]
    if kind == "jsonl":
        _write(os.path.join(root, "metadata.jsonl"), "\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    else:
        _write(
            os.path.join(root, "metadata.csv"),
            "file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows),
        )


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_imagefolder_metadata(tmp_path, kind):
    root = str(tmp_path / "meta")
    _imagefolder(root, kind)
    report = load_records(dataset_name=root)  # a local folder given as diffusers' --dataset_name
    assert report.kind == "imagefolder (metadata)"
    assert [(os.path.relpath(r.key, root), r.caption) for r in report.records] == [
        ("img/a.png", "first"),
        ("img/b.png", "second"),
    ]
    skipped = {os.path.relpath(key, root): reason for key, reason in report.skipped}
    assert skipped["img/bad.png"].startswith("corrupt image")
    line = 4 if kind == "jsonl" else 5  # the csv header is line 1
    assert skipped["img/missing.png"] == f"file not found: listed at metadata.{kind} line {line}"
    assert skipped["img/unlisted.png"] == "missing caption: not listed in any metadata file"
    if kind == "jsonl":
        assert skipped["metadata.jsonl:5"].startswith("bad metadata: invalid JSON")
    assert len(load_records(train_data_dir=root).records) == 2
    assert len(load_records(root, instance_prompt="x").records) == 3  # unlisted.png gets the prompt
    with pytest.raises(DataError, match=r"no caption column 'caption' \(columns: file_name, text\)"):
        load_records(root, caption_column="caption")


# ----------------------------------------------------------------------------------------------- HF datasets


def _hf_dataset():
    import datasets

    images = [{"bytes": _rgb(), "path": None}, {"bytes": _corrupt_png(), "path": "bad.png"}]
    images.append({"bytes": _encode(Image.new("LA", (20, 30), (9, 0))), "path": None})
    table = {"picture": images, "caption": ["one", "two", "three"], "extra": [1, 2, 3]}
    features = datasets.Features(
        picture=datasets.Image(), caption=datasets.Value("string"), extra=datasets.Value("int64")
    )
    return datasets.Dataset.from_dict(table, features=features)


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    dataset = _hf_dataset()
    saved = str(tmp_path / "saved")
    dataset.save_to_disk(saved)
    report = load_records(saved, image_column="picture", caption_column="caption")
    assert report.kind == "save_to_disk dataset"
    assert [(r.key, r.caption, r.size) for r in report.records] == [
        (f"{saved}[0]", "one", (48, 32)),
        (f"{saved}[2]", "three", (20, 30)),
    ]
    assert report.skipped[0][0] == f"{saved}[1]" and report.skipped[0][1].startswith("corrupt image")
    assert report.converted == [(f"{saved}[2]", "mode LA -> RGB on white")]
    assert isinstance(report.records[0].source, RowSource)
    assert np.asarray(open_image(report.records[1]))[0, 0].tolist() == [255, 255, 255]  # alpha 0 -> white
    with pytest.raises(DataError, match=r"no image column 'image' \(columns: picture, caption, extra\)"):
        load_records(saved, caption_column="caption")
    with pytest.raises(DataError, match=r"no caption column 'text' .*--instance_prompt"):
        load_records(saved, image_column="picture")
    saved_dict = str(tmp_path / "saved_dict")
    datasets.DatasetDict(train=dataset, test=dataset.select([0])).save_to_disk(saved_dict)
    report = load_records(dataset_name=saved_dict, image_column="picture", caption_column="caption")
    assert len(report.records) == 2 and len(report.skipped) == 1
    with pytest.raises(DataError, match="1 bad sample"):
        load_records(saved_dict, image_column="picture", instance_prompt="p", on_bad_image="error")


def test_local_data_files_folder(tmp_path):
    """A folder of parquet files (a Hub repository cloned locally) goes through datasets.load_dataset."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    _hf_dataset().select([0, 2]).to_parquet(str(folder / "train.parquet"))
    report = load_records(
        dataset_name=str(folder),
        image_column="picture",
        caption_column="caption",
        cache_dir=str(tmp_path / "c"),
    )
    assert report.kind == "local data files"
    assert [r.caption for r in report.records] == ["one", "three"]


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict(validation=_hf_dataset().select([0]), train=_hf_dataset())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = load_records(
        dataset_name="someone/icons",
        dataset_config_name="small",
        cache_dir="/tmp/hf",
        revision="v1",
        image_column="picture",
        caption_column="caption",
    )
    assert calls == [("someone/icons", "small", {"cache_dir": "/tmp/hf", "revision": "v1", "data_dir": None})]
    assert [r.key for r in report.records] == ["someone/icons[0]", "someone/icons[2]"]  # the train split
    assert [r.caption for r in report.records] == ["one", "three"]

    def offline(path, name=None, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--dataset someone/icons: no such local folder.*ConnectionError"):
        load_records("someone/icons")
