"""Datasets for the SDXL trainer: sample discovery, the pre-flight scan, image reopening, aspect buckets.

`load_records(...)` scans a dataset once and returns a ScanReport of Records (key, caption, size, source);
`assign_bucket` / `resize_size` / `epoch_batches` decide training sizes and batches from the sizes alone;
`open_image(record)` reopens a sample as RGB at training time.
"""

from bilora_diffusion.data.buckets import assign_bucket, epoch_batches, make_buckets, resize_size
from bilora_diffusion.data.common import IMAGE_EXTENSIONS, RowSource
from bilora_diffusion.data.records import Record, ScanReport, load_records, open_image
from bilora_diffusion.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "Record",
    "RowSource",
    "ScanReport",
    "assign_bucket",
    "epoch_batches",
    "load_records",
    "make_buckets",
    "open_image",
    "resize_size",
]
