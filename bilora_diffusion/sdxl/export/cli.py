"""``bilora-export`` (and ``python pipelines/export_lora.py``): export a training output or ``checkpoint-N``
folder. Options are a dataclass read by the project's typed parser (`bilora_diffusion.options`), so
``--config FILE.yaml`` works here as it does for the trainers."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import OptionError
from ...options import opt, run_cli
from .validate import FORMATS, SAVE_DTYPES
from .write import default_output, export_from_folder

PROG = "bilora-export"


@dataclass
class ExportOptions:
    """Options of ``bilora-export``."""

    usage = (
        f"usage: {PROG} --input FOLDER [--output FOLDER] [--overwrite] [--format {{{','.join(FORMATS)}}}]\n"
        f"       [--save_dtype {{{','.join(SAVE_DTYPES)}}}] [--fuse] [--output_name NAME]\n"
        "       [--pretrained_model_name_or_path BASE]\n\n"
        "Export the primary branch (W0 + s1·B1·A1) of a Bi-LoRA training output or checkpoint folder as a\n"
        "standard SDXL LoRA: diffusers (pytorch_lora_weights.safetensors) and/or kohya (<output_name>.safetensors,\n"
        "for ComfyUI / A1111 / Forge)."
    )

    input: str | None = opt(None, "Training output or checkpoint-N folder (required).", path=True)
    output: str | None = opt(
        None,
        "Folder to write to (default: a new folder INPUT/export-<save_dtype>[-fused]; for INPUT "
        "RUN/checkpoint-N, RUN/export-checkpoint-N-<save_dtype>[-fused]).",
    )
    overwrite: bool = opt(
        False,
        "Replace LoRA files or a fused/ folder that already exist in the output folder (never by default).",
    )
    format: str = opt("both", "Which LoRA files to write.", choices=FORMATS)
    save_dtype: str = opt("fp32", "dtype of the written tensors.", choices=tuple(SAVE_DTYPES))
    fuse: bool = opt(False, "Also write <output>/fused: the base pipeline with the LoRA fused.")
    output_name: str | None = opt(None, "kohya file name without .safetensors (default: from training).")
    pretrained_model_name_or_path: str | None = opt(
        None, "Base SDXL model (default: the one in training_config.yaml)."
    )

    def validate(self) -> None:
        if not self.input:
            raise OptionError("--input is required (a training output or checkpoint-N folder)")


def export(options: ExportOptions) -> int:
    """Export as ``options`` say; print the written paths (stdout; where they went on stderr)."""
    out = options.output or default_output(options.input, options.save_dtype, options.fuse)
    written = export_from_folder(
        options.input,
        out,
        format=options.format,
        fuse=options.fuse,
        save_dtype=options.save_dtype,
        output_name=options.output_name,
        pretrained_model_name_or_path=options.pretrained_model_name_or_path,
        overwrite=options.overwrite,
    )
    print(f"{PROG}: wrote {len(written)} file(s) to {out}:", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``bilora-export``: exit 0 and print the written paths, or exit 2 with a one-line error (a bad option, a
    refused export, an unreadable file). Never replaces an existing file unless ``--overwrite``."""
    return run_cli(export, ExportOptions, None if argv is None else list(argv), (OSError,), prog=PROG)
