"""Tag-style captions end to end: a run with tag shuffling and dropout under Prodigy resumes exactly."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_diffusion.options import parse_options
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.sdxl.train import SDXLTrainer
from bilora_diffusion.testing import make_image_folder


def tag_folder(root: Path) -> Path:
    folder = make_image_folder(root, n=6)
    extra = ["white background", "simple", "centered", "flat colors", "no text"]
    for i, path in enumerate(sorted(folder.glob("*.txt"))):
        color = path.read_text().split()[1]
        path.write_text(", ".join(["sks", f"{color} square", *extra[: 2 + i % 4]]))
    return folder


@pytest.mark.slow
def test_tag_captions_with_prodigy_resume_exactly(tiny_sdxl_dir, tmp_path, caplog):
    """The text-embedding cache turns itself off (one log line), the batches carry drawn captions (first tag in
    place), and a run resumed from its checkpoint ends at the same adapters, bit for bit, with Prodigy
    (whose d estimate travels in the optimizer's param groups)."""
    data = tag_folder(tmp_path / "data")

    def options(out, *extra):
        argv = ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset", str(data)]
        argv += ["--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2"]
        argv += ["--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none"]
        argv += [
            "--optimizer",
            "prodigy",
            "--learning_rate",
            "1.0",
            "--shuffle_caption",
            "--keep_tokens",
            "1",
        ]
        argv += ["--caption_tag_dropout", "0.3", "--random_flip", "--caption_dropout", "0.2", *extra]
        return parse_options(SDXLOptions, argv)

    full = tmp_path / "full"
    with caplog.at_level(logging.INFO, logger="bilora_diffusion.sdxl.train"):
        trainer = SDXLTrainer(options(full))
        trainer.setup()
    assert trainer.text_cache is None
    assert sum("text-embedding cache off" in r.getMessage() for r in caplog.records) == 1
    captions = [c for step in range(6) for mb in trainer.micro_batches(step) for c in mb.captions]
    again = [c for step in range(6) for mb in trainer.micro_batches(step) for c in mb.captions]
    assert captions == again
    written = {p.read_text() for p in data.glob("*.txt")}
    drawn = [c for c in captions if c]
    assert all(c.startswith("sks, ") or c == "sks" for c in drawn)
    assert any(c not in written for c in drawn)  # shuffled or dropped, not the files' captions
    trainer.train()
    assert (full / "checkpoint-2").is_dir()

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    result = SDXLTrainer.run(options(part, "--resume_from_checkpoint", "latest"))
    assert result.global_step == 4 and len(result.losses) == 2
    a = load_file(str(full / "bilora_adapters.safetensors"))
    b = load_file(str(part / "bilora_adapters.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
