"""SDXLOptions from YAML files: flags override the file, every config in configs/ parses."""

from pathlib import Path

import pytest

from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.sdxl.options import SDXLOptions

ROOT = Path(__file__).resolve().parents[3]


def test_yaml_config_with_flag_overrides(tmp_path, image_folder):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"dataset: {image_folder}\nrank: 8\nlearning_rate: 0.0002\nvalidation_prompt: [a, b]\n")
    opts = parse_options(SDXLOptions, ["--config", str(cfg), "--rank", "16"])
    assert opts.rank == 16 and opts.learning_rate == 2e-4 and opts.validation_prompt == ["a", "b"]
    cfg.write_text("dataset: x\nrnak: 4\n")
    with pytest.raises(OptionError, match="did you mean 'rank'"):
        parse_options(SDXLOptions, ["--config", str(cfg)])


def test_every_config_file_parses(monkeypatch):
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and any(
            c in first for c in ("train_sdxl.py", "train_llm.py", "bilora-compare")
        ), path
        if "train_sdxl.py" in first or "bilora-compare" in first:
            opts = parse_options(SDXLOptions, ["--config", str(path), "--dataset", "."])
            assert opts.method
