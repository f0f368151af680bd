"""Single-file SDXL checkpoints (original SGM layout, as ComfyUI / A1111 use them) as the base model (issue 16,
item 1): a tiny SDXL written as one file loads offline with diffusers' single-file loading, every tensor of
every component equal to the same model loaded from its diffusers folder; a file diffusers would load only in
part, a truncated file, a non-SDXL file and a pickled checkpoint fail in one line; a run on a single-file base
trains, exports, and its kohya LoRA names modules of that same file."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bilora_diffusion.hub import BaseModelError, resolve_base_model
from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.sdxl.models import load_components
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.sdxl.single_file import (
    CONFIG_DIR,
    PREFIXES,
    check_config,
    load_single_file_components,
    load_vae_file,
    sgm_key,
    to_sgm_state_dict,
    verify_component,
)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def write_single_file(folder: str | Path, path: str | Path, edit=None) -> Path:
    """The diffusers SDXL in ``folder`` as one SGM-layout .safetensors file (``edit`` may change the dict)."""
    components = load_components(str(folder))
    state = to_sgm_state_dict({name: getattr(components, name) for name in PARTS})
    if edit is not None:
        edit(state)
    save_file(state, str(path))
    return Path(path)


@pytest.fixture(scope="module")
def single_file(tiny_sdxl_dir, tmp_path_factory):
    return write_single_file(tiny_sdxl_dir, tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors")


@pytest.fixture(scope="module")
def sdxl_topology(tmp_path_factory):
    """SDXL's real block structure at toy widths (32-layer CLIP-G) as a folder and as one file."""
    from bilora_diffusion.testing import save_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl-topology")
    folder = save_tiny_sdxl(str(root / "model"), "sdxl", seed=1)
    return folder, write_single_file(folder, root / "model.safetensors")


def assert_same_components(a, b) -> None:
    for name in PARTS:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        for key in left:
            assert right[key].device.type != "meta", f"{name}.{key} on the meta device"
            assert torch.equal(left[key], right[key]), f"{name}.{key} differs from the folder's"
    ids = [tok(["a red square"], padding="max_length", max_length=77).input_ids for tok in a.tokenizers]
    assert ids == [
        tok(["a red square"], padding="max_length", max_length=77).input_ids for tok in b.tokenizers
    ]
    assert a.noise_scheduler.config.num_train_timesteps == b.noise_scheduler.config.num_train_timesteps


def test_every_component_equals_the_folders(tiny_sdxl_dir, single_file):
    assert resolve_base_model(single_file) == str(single_file)
    from_file = load_single_file_components(str(single_file), tiny_sdxl_dir)
    assert_same_components(load_components(tiny_sdxl_dir), from_file)
    # load_components dispatches a file to the same loader.
    assert_same_components(from_file, load_components(str(single_file), single_file_config=tiny_sdxl_dir))


def test_real_topology_with_a_32_layer_clip_g_loads_whole(sdxl_topology):
    """Small-width CLIP-G with SDXL's 32 layers: every layer (past the twelfth too) comes from the file."""
    folder, path = sdxl_topology
    from_file = load_single_file_components(str(path), folder)
    assert from_file.text_encoder_2.config.num_hidden_layers == 32
    assert_same_components(load_components(folder), from_file)


def test_clip_l_without_the_text_model_level_still_loads(tiny_sdxl_dir, tmp_path):
    """A file written from a transformers >= 5.6 CLIPTextModel without the ``text_model.`` level original files
    carry: renamed on load, every tensor still checked."""
    prefix = PREFIXES["text_encoder"]

    def strip(state):
        for key in [k for k in state if k.startswith(prefix + "text_model.")]:
            state[prefix + key[len(prefix + "text_model.") :]] = state.pop(key)

    path = write_single_file(tiny_sdxl_dir, tmp_path / "flat_clip.safetensors", strip)
    assert_same_components(
        load_components(tiny_sdxl_dir), load_single_file_components(str(path), tiny_sdxl_dir)
    )


def test_a_tensor_not_loaded_fails_in_one_line(sdxl_topology, tmp_path):
    """diffusers' converters skip what they do not find and leave those parameters on the meta device or at
    their initial value; the check after loading names them in one line."""
    folder, _ = sdxl_topology
    layer = PREFIXES["text_encoder_2"] + "transformer.resblocks.12."

    def drop(state):
        for key in [k for k in state if k.startswith(layer)]:
            del state[key]

    path = write_single_file(folder, tmp_path / "missing_layer.safetensors", drop)
    with pytest.raises(BaseModelError) as err:
        load_single_file_components(str(path), folder)
    message = str(err.value)
    assert "text_encoder_2 not loaded from the file" in message and "layers.12." in message, message
    assert "\n" not in message and isinstance(err.value, OptionError)

    # A misnamed UNet tensor: diffusers' UNet loader stops on the meta tensor it leaves; one line naming the unet.
    key = PREFIXES["unet"] + "input_blocks.1.0.in_layers.2.weight"
    path = write_single_file(
        folder, tmp_path / "misnamed.safetensors", lambda st: st.update({key + "X": st.pop(key)})
    )
    with pytest.raises(BaseModelError) as err:
        load_single_file_components(str(path), folder)
    assert "its unet (a tensor missing or misnamed in the file?) could not be loaded" in str(err.value)
    assert "\n" not in str(err.value)

    # A parameter holding anything but the file's tensor (e.g. its random init) is caught too.
    components = load_components(folder)
    state = load_file(str(sdxl_topology[1]))
    key, _ = sgm_key("unet", "conv_in.weight", components.unet.config)
    state[key] = state[key] + 1
    with pytest.raises(BaseModelError, match="unet not loaded from the file: conv_in.weight does not hold"):
        verify_component("unet", components.unet, state, "test")


def test_single_file_vae(tiny_sdxl_dir, tmp_path):
    """--pretrained_vae_model_name_or_path takes one file: a VAE's own layout (encoder.* / decoder.*) or the
    first_stage_model.* of an SDXL file."""
    folder = load_components(tiny_sdxl_dir)
    state = to_sgm_state_dict({"vae": folder.vae})
    save_file(
        {k.removeprefix(PREFIXES["vae"]): v for k, v in state.items()}, str(tmp_path / "vae.safetensors")
    )
    assert resolve_base_model(tmp_path / "vae.safetensors", "vae") == str(tmp_path / "vae.safetensors")
    for vae in (
        load_vae_file(str(tmp_path / "vae.safetensors"), tiny_sdxl_dir),
        load_components(tiny_sdxl_dir, vae_path=str(tmp_path / "vae.safetensors")).vae,
    ):
        for key, value in folder.vae.state_dict().items():
            assert torch.equal(value, vae.state_dict()[key]), key


def test_bad_files_fail_in_one_line(single_file, tmp_path):
    data = single_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)},
        str(tmp_path / "sd_unet.safetensors"),
    )
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2)}, str(tmp_path / "a_lora.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "model.ckpt").write_bytes(b"not even opened")
    cases = {
        "truncated.safetensors": "truncated",
        "sd_unet.safetensors": "not an SDXL checkpoint in the original (SGM) layout: no CLIP-L",
        "a_lora.safetensors": "not an SDXL checkpoint in the original (SGM) layout: no the UNet",
        "garbage.safetensors": "not a safetensors file",
        "model.ckpt": "a pickled checkpoint (.ckpt) is refused: loading one runs whatever code it holds",
        "missing.safetensors": "no such file",
    }
    for name, why in cases.items():
        with pytest.raises(BaseModelError) as err:
            resolve_base_model(tmp_path / name)
        message = str(err.value)
        assert (
            message.startswith(f"--pretrained_model_name_or_path {tmp_path / name}: ") and why in message
        ), message
        assert "\n" not in message
    with pytest.raises(BaseModelError, match="--pretrained_vae_model_name_or_path .*not a VAE checkpoint"):
        resolve_base_model(tmp_path / "a_lora.safetensors", "vae", flag="--pretrained_vae_model_name_or_path")


def test_config_folder_checks():
    """The shipped configs are SDXL base 1.0's (parameter counts of the real model); a config folder without
    tokenizer files names the ways to give them, in one line."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae")),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig.from_pretrained(CONFIG_DIR, subfolder="text_encoder")
            ),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(CONFIG_DIR, subfolder="text_encoder_2")
            ),
        }
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {
        "unet": 2567463684,
        "vae": 83653863,
        "text_encoder": 123060480,
        "text_encoder_2": 694659840,
    }
    # Every parameter has a file key, and the UNet/CLIP-G names are those of sd_xl_base_1.0.safetensors.
    keys = set()
    for name, model in models.items():
        config = (
            model.config
            if name == "unet"
            else len(model.config.block_out_channels)
            if name == "vae"
            else None
        )
        keys |= {sgm_key(name, k, config)[0] for k in model.state_dict() if not k.endswith("position_ids")}
    assert len(keys) == 2513
    for key in (
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ):
        assert key in keys, key
    try:
        check_config(None)  # passes where the CLIP tokenizer is in the local Hugging Face cache
    except BaseModelError as err:
        message = str(err)
        assert "\n" not in message and "--single_file_config" in message and "vocab.json" in message


# ------------------------------------------------------------------------------ a run on a single-file base


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
