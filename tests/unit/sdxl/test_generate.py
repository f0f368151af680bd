"""bilora-generate: the stock StableDiffusionXLPipeline with an exported LoRA, and refusal of bad LoRA files."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora, bilora_layers
from bilora_diffusion.peft_glue import lora_pair
from bilora_diffusion.sdxl.export import DIFFUSERS_FILE, ExportError, check_lora_file, export_lora
from bilora_diffusion.sdxl.generate import main

PROMPTS = ["a red cube", "a blue ball"]
SEEDS = [0, 7]


def stock(base_dir: str, lora: Path | None = None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    return pipe


def render(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    image = pipe(
        prompt,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
        **kwargs,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sdxl_dir: str) -> tuple[Path, Path]:
    """(diffusers file, kohya file) of a randomised Bi-LoRA (UNet and both text encoders) on tiny_sdxl_dir."""
    pipe = stock(tiny_sdxl_dir)
    configs = {
        "unet": BiLoRAConfig(rank=4, alpha=6.0, aux_rank=2),
        "text_encoder": BiLoRAConfig(
            rank=2, alpha=3.0, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
        ),
    }
    configs["text_encoder_2"] = configs["text_encoder"]
    g = torch.Generator().manual_seed(3)
    for name, config in configs.items():
        attach_bilora(getattr(pipe, name), config)
        for layer in bilora_layers(getattr(pipe, name)):
            for branch in (PRIMARY, AUX):
                pair = lora_pair(layer, branch)
                if pair is not None:
                    with torch.no_grad():
                        pair.A_param.copy_(torch.randn(pair.A_param.shape, generator=g) * 0.1)
                        pair.B_param.copy_(torch.randn(pair.B_param.shape, generator=g) * 0.1)
    out = tmp_path_factory.mktemp("exported")
    diffusers_file, kohya_file = export_lora(out, {n: getattr(pipe, n) for n in configs}, configs)
    return diffusers_file, kohya_file


def test_compare_grid_and_images_match_the_stock_pipeline(
    tmp_path: Path, tiny_sdxl_dir: str, exported, capsys
) -> None:
    _, kohya_file = exported
    argv = ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--lora", str(kohya_file), "--compare"]
    argv += [a for p in PROMPTS for a in ("--prompt", p)] + [a for s in SEEDS for a in ("--seed", str(s))]
    argv += [
        "--num_inference_steps",
        "2",
        "--lora_scale",
        "0.5",
        "--output_dir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 * len(PROMPTS) * len(SEEDS) + 1 and printed[-1] == str(tmp_path / "compare.png")

    base, with_lora = stock(tiny_sdxl_dir), stock(tiny_sdxl_dir, kohya_file)
    for p, seed in [(1, 7)]:  # the last row of the grid (each render costs seconds on a CPU)
        stem = tmp_path / f"{p:02d}_{PROMPTS[p].replace(' ', '-')}_seed{seed}"
        got_lora = np.asarray(Image.open(f"{stem}.png"), dtype=np.int16)
        got_base = np.asarray(Image.open(f"{stem}_base.png"), dtype=np.int16)
        assert (
            np.abs(
                got_lora - render(with_lora, PROMPTS[p], seed, cross_attention_kwargs={"scale": 0.5})
            ).max()
            <= 1
        )
        assert np.abs(got_base - render(base, PROMPTS[p], seed)).max() <= 1
        assert np.abs(got_lora - got_base).max() > 10, "the LoRA should change the image"
    grid = Image.open(tmp_path / "compare.png")
    w, h = Image.open(f"{stem}.png").size
    assert grid.size == (2 * w, len(PROMPTS) * len(SEEDS) * h)
    # Last row, right cell = the last LoRA image; left cell = its base image.
    cells = np.asarray(grid, dtype=np.int16)[-h:]
    assert np.array_equal(cells[:, w:], got_lora) and np.array_equal(cells[:, :w], got_base)


def test_lora_scale_zero_gives_the_base_model(tmp_path: Path, tiny_sdxl_dir: str, exported) -> None:
    diffusers_file, _ = exported
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sdxl_dir,
        "--lora",
        str(diffusers_file.parent),
        "--compare",
    ]
    argv += ["--prompt", "a red cube", "--num_inference_steps", "2", "--lora_scale", "0", "--device", "cpu"]
    assert main([*argv, "--output_dir", str(tmp_path)]) == 0
    zero, base = (
        np.asarray(Image.open(tmp_path / f"00_a-red-cube_seed0{s}.png"), np.int16) for s in ("", "_base")
    )
    assert np.abs(zero - base).max() <= 1


# ------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def models(tiny_sdxl_dir: str):
    pipe = stock(tiny_sdxl_dir)
    return {n: getattr(pipe, n) for n in ("unet", "text_encoder", "text_encoder_2")}, pipe.unet.config


def _payload(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    return pickle.dumps({"unet.x.lora_A.weight": Payload()})


def test_pickle_lora_is_refused_and_runs_no_code(tmp_path: Path, tiny_sdxl_dir: str, capsys) -> None:
    marker = tmp_path / "pwned"
    blob = _payload(marker)
    pickle.loads(blob)
    assert marker.exists(), "the payload must be live for this test to mean anything"
    marker.unlink()
    for name in ("lora.safetensors", DIFFUSERS_FILE.replace(".safetensors", ".bin")):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(blob)
        target = folder / name if name.endswith(".safetensors") else folder
        with pytest.raises(SystemExit) as exit_info:
            main(["--pretrained_model_name_or_path", tiny_sdxl_dir, "--lora", str(target), "--prompt", "x"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("bilora-generate: error:") and ("safetensors" in err)
        assert not marker.exists()
    assert not list(tmp_path.glob("**/*.png"))


def _write(path: Path, tensors: dict) -> Path:
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_wrong_files_are_refused_before_loading(tmp_path: Path, models, exported) -> None:
    parts, unet_config = models
    diffusers_file, kohya_file = exported
    assert check_lora_file(diffusers_file, parts, unet_config) == (diffusers_file, "diffusers")
    assert check_lora_file(kohya_file, parts, unet_config) == (kohya_file, "kohya")

    kohya = load_file(kohya_file)
    peft = load_file(diffusers_file)
    stem = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # layers_per_block = 1 here
    key = next(
        k for k in sorted(peft) if k.startswith("unet.") and k.endswith(("lora.down.weight", "lora_A.weight"))
    )
    cases = {
        "flux.safetensors": (
            {"transformer.single_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)},
            "not an SDXL",
        ),
        "sd15.safetensors": (
            {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
            "not an SDXL",
        ),
        # input_blocks.7 exists in SDXL but not in this two-level UNet: a LoRA for another model.
        "other_unet.safetensors": (
            {
                **kohya,
                **{k.replace(stem, stem.replace("_3_1_", "_7_1_")): v for k, v in kohya.items() if stem in k},
            },
            "matches no module",
        ),
        "shape.safetensors": (
            {**peft, key: torch.zeros(peft[key].shape[0], peft[key].shape[1] + 3)},
            "shapes",
        ),
        "alpha.safetensors": ({**kohya, f"{stem}.alpha": torch.tensor(0.0)}, "0-dim value > 0"),
        "up_only.safetensors": (
            {k: v for k, v in kohya.items() if not k.endswith("lora_down.weight")},
            "complete",
        ),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(ExportError, match=message):
            check_lora_file(_write(tmp_path / name, tensors), parts, unet_config)
    (tmp_path / "two").mkdir()
    _write(tmp_path / "two" / "a.safetensors", kohya)
    _write(tmp_path / "two" / "b.safetensors", kohya)
    with pytest.raises(ExportError, match="exactly one"):
        check_lora_file(tmp_path / "two", parts, unet_config)


def test_compare_needs_a_lora(tiny_sdxl_dir: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--pretrained_model_name_or_path", tiny_sdxl_dir, "--prompt", "x", "--compare"])
    assert exit_info.value.code == 2 and "--compare needs --lora" in capsys.readouterr().err


def test_options_keep_argparse_spellings() -> None:
    """The typed parser reads bilora-generate's flags as its argparse parser did: repeated --prompt / --seed
    collect (action="append"), a bare --compare is true, --dtype is checked against its choices."""
    from bilora_diffusion.errors import OptionError
    from bilora_diffusion.options import parse_options
    from bilora_diffusion.sdxl.generate import GenerateOptions

    argv = ["--pretrained_model_name_or_path", "base", "--prompt", "a red cube", "--prompt", "a blue ball",
            "--seed", "0", "--seed=7", "--lora", "x.safetensors", "--compare", "--guidance_scale", "2.5"]  # fmt: skip
    o = parse_options(GenerateOptions, argv)
    assert (o.prompt, o.seed, o.compare, o.guidance_scale) == (
        ["a red cube", "a blue ball"],
        [0, 7],
        True,
        2.5,
    )
    assert (o.num_inference_steps, o.dtype, o.output_dir, o.height) == (30, "fp32", "samples", None)
    for bad, flag in ((["--dtype", "fp8"], "--dtype"), (["--seed", "x"], "--seed"), ([], "--prompt")):
        base = ["--pretrained_model_name_or_path", "base"] + ([] if flag == "--prompt" else ["--prompt", "p"])
        with pytest.raises(OptionError, match=flag):
            parse_options(GenerateOptions, base + bad)
