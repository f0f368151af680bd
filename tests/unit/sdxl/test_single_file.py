"""Single-file SDXL checkpoints (original SGM layout, as ComfyUI / A1111 use them) as the base model (issue 16,
item 1): a tiny SDXL written as one file loads offline with diffusers' single-file loading, every tensor of
every component equal to the same model loaded from its diffusers folder; a file diffusers would load only in
part, a truncated file, a non-SDXL file and a pickled checkpoint fail in one line. Runs on a single-file base:
tests/e2e/test_single_file.py."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from bilora_diffusion.hub import BaseModelError, resolve_base_model
from bilora_diffusion.options import OptionError
from bilora_diffusion.sdxl.models import load_components
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
from bilora_diffusion.testing import SINGLE_FILE_PARTS, write_single_file

PARTS = SINGLE_FILE_PARTS


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
