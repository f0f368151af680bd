"""A single-file SDXL checkpoint as the base model of real runs: the command line refuses what it cannot use in one
line, and a run on a single-file base trains, exports, and its kohya LoRA names modules of that same file."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.sdxl.single_file import PREFIXES, load_single_file_components

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


def _images(components, lora_dir=None) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        "a red square", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    )
    if lora_dir is not None:
        pipe.unload_lora_weights()
    return out.images


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bilora", "lora"])
def test_train_on_a_single_file_and_export(tiny_sdxl_dir, single_file, image_folder, tmp_path, method):
    from bilora_diffusion.sdxl.export import export_from_folder
    from bilora_diffusion.sdxl.train import train

    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(single_file), "--single_file_config", tiny_sdxl_dir,
            "--dataset", str(image_folder), "--output_dir", str(out), "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "3", "--learning_rate", "1e-2", "--method", method,
            "--train_text_encoder", "true", "--report_to", "none", "--compare_grid", "false"]  # fmt: skip
    result = train(parse_options(SDXLOptions, argv))
    assert result.global_step == 3

    # The kohya file names modules of the very file trained on: every stem is a weight of the checkpoint.
    modules = {
        key.removesuffix(".weight"): key for key in load_file(str(single_file)) if key.endswith(".weight")
    }
    by_stem = {}
    for module in modules:
        for prefix, kohya in (
            (PREFIXES["unet"], "lora_unet_"),
            (PREFIXES["text_encoder"], "lora_te1_"),
            ("conditioner.embedders.1.transformer.", "lora_te2_"),
        ):
            if module.startswith(prefix):
                by_stem[kohya + module[len(prefix) :].replace(".", "_")] = module
    # OpenCLIP fuses q/k/v: ComfyUI maps lora_te2_text_model_encoder_layers_N_* onto resblocks.N (HF names).
    te2 = PREFIXES["text_encoder_2"] + "transformer.resblocks."
    layers = {m[len(te2) :].split(".")[0] for m in modules if m.startswith(te2)}
    for n in layers:
        for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
            by_stem[f"lora_te2_text_model_encoder_layers_{n}_{leaf}"] = te2 + n
    kohya = load_file(str(out / "bilora_sdxl.safetensors"))
    stems = {key.split(".")[0] for key in kohya}
    assert any(s.startswith("lora_unet_") for s in stems) and any(s.startswith("lora_te2_") for s in stems)
    assert stems <= set(by_stem), sorted(stems - set(by_stem))[:5]

    # The LoRA changes the single-file model's images (diffusers file, stock load_lora_weights).
    base = load_single_file_components(str(single_file), tiny_sdxl_dir)
    before, after = _images(base), _images(base, out)
    assert np.abs(after - before).max() > 1e-3

    # bilora-export of the run resolves the same single-file base and its config folder.
    written = export_from_folder(out, tmp_path / "export", format="kohya")
    assert set(load_file(str(written[0]))) == set(kohya)

    # bilora-generate renders the single-file base with the kohya file through stock diffusers: it changes them.
    from PIL import Image

    from bilora_diffusion.sdxl.generate import main as generate_main

    shots = tmp_path / "shots"
    argv = ["--pretrained_model_name_or_path", str(single_file), "--single_file_config", tiny_sdxl_dir,
            "--lora", str(out / "bilora_sdxl.safetensors"), "--compare", "--prompt", "a red square",
            "--num_inference_steps", "2", "--height", "64", "--width", "64", "--output_dir", str(shots),
            "--device", "cpu"]  # fmt: skip
    assert generate_main(argv) == 0
    with_lora = np.asarray(Image.open(shots / "00_a-red-square_seed0.png"), dtype=np.int16)
    without = np.asarray(Image.open(shots / "00_a-red-square_seed0_base.png"), dtype=np.int16)
    assert np.abs(with_lora - without).max() > 0
