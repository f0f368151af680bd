"""Export of the primary branch as a standard SDXL LoRA, checked against references and stock loaders.

References: a copy of the base models merged by hand as W0 + s1·B1·A1 (what the user should get), and
diffusers' own ``load_lora_weights``, which reads both the diffusers file and kohya SGM-named files (it maps
SGM names back itself: an independent client). Adapters are randomised, B included, so every module shows.
"""

from __future__ import annotations

import builtins
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora, bilora_layers
from bilora_diffusion.peft_glue import lora_pair
from bilora_diffusion.sdxl.export import (
    DIFFUSERS_FILE,
    ExportError,
    export_lora,
    main,
)
from bilora_diffusion.sdxl.kohya import KeyMapError, unet_sgm_path
from bilora_diffusion.state import STATE_FILE, save_bilora_state
from bilora_diffusion.testing import tiny_sdxl_components

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MODELS = ("unet", "text_encoder", "text_encoder_2")


# ------------------------------------------------------------------------------------------------ helpers


def randomise(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Random A and B in both branches (B != 0, so each branch changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bilora_layers(model):
            for branch in (PRIMARY, AUX):
                pair = lora_pair(layer, branch)
                if pair is not None:
                    pair.A_param.copy_(torch.randn(pair.A_param.shape, generator=g) * std)
                    pair.B_param.copy_(torch.randn(pair.B_param.shape, generator=g) * std)


def trained(
    topology: str = "dummy",
    *,
    text_encoders: bool = True,
    unet_targets=ATTN_TARGETS,
    te_targets=TE_TARGETS,
    components: dict | None = None,
    std: float = 0.05,
):
    """(pipeline components with the trained models attached, pristine base copy, configs). alpha != rank and
    aux scale != primary scale everywhere, so a wrong scale shows."""
    comps = components if components is not None else tiny_sdxl_components(topology, seed=0)
    base = copy.deepcopy(comps)
    configs = {
        "unet": BiLoRAConfig(rank=4, alpha=6.0, aux_rank=2, aux_alpha=3.0, target_modules=unet_targets)
    }
    if text_encoders:
        te = BiLoRAConfig(rank=2, alpha=5.0, aux_rank=2, aux_alpha=1.0, target_modules=te_targets)
        configs.update(text_encoder=te, text_encoder_2=te)
    for i, name in enumerate(configs):
        attach_bilora(comps[name], configs[name])
        randomise(comps[name], seed=10 + i, std=std)
    return comps, base, configs


def merged(base: dict, comps: dict, configs: dict, branches=(PRIMARY,)) -> dict:
    """A copy of ``base`` with W0 + sum over branches of s·B·A written into its weights, by hand."""
    out = copy.deepcopy(base)
    for name in configs:
        for path in _adapted_paths(comps[name]):
            layer = comps[name].get_submodule(path)
            weight = out[name].get_submodule(path).weight
            with torch.no_grad():
                for branch in branches:
                    pair = lora_pair(layer, branch)
                    if pair is not None:
                        weight += pair.scale * (pair.B @ pair.A).reshape(weight.shape)
    return out


def pipeline(components: dict):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> np.ndarray:
    return pipe(
        ["a red cube", "a blue ball"],
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def models_of(comps: dict, configs: dict) -> dict:
    return {name: comps[name] for name in configs}


def loaded(base: dict, file: Path):
    pipe = pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, use_safetensors=True)
    return pipe


def header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------- image references


def test_exported_files_give_the_primary_branch_only(tmp_path: Path) -> None:
    comps, base, configs = trained("dummy", te_targets=TE_TARGETS + ["fc1", "fc2"])
    written = export_lora(tmp_path, models_of(comps, configs), configs, format="both")
    assert [p.name for p in written] == [DIFFUSERS_FILE, "bilora_sdxl.safetensors"]
    diffusers_file, kohya_file = written

    expected = images(pipeline(merged(base, comps, configs)))  # W0 + s1·B1·A1, by hand
    with_aux = images(pipeline(merged(base, comps, configs, (PRIMARY, AUX))))
    from_diffusers = images(loaded(base, diffusers_file))
    from_kohya = images(loaded(base, kohya_file))

    np.testing.assert_allclose(from_diffusers, expected, atol=1e-4)
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-5)
    assert np.abs(from_diffusers - with_aux).max() > 1e-2, "the auxiliary branch must not be in the export"
    assert np.abs(from_diffusers - images(pipeline(copy.deepcopy(base)))).max() > 1e-2

    for path in written:
        assert not any(AUX in key for key in load_file(path))


def test_alpha_round_trips_in_both_formats(tmp_path: Path) -> None:
    """alpha != rank: the diffusers header carries LoraConfig(r, lora_alpha); the kohya file a 0-dim float alpha
    per module. (The image test above checks the resulting scale; this checks what is written.)"""
    comps, _, configs = trained("dummy")
    diffusers_file, kohya_file = export_lora(tmp_path, models_of(comps, configs), configs)
    meta = json.loads(header(diffusers_file)["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 6.0
    assert meta["text_encoder.r"] == 2 and meta["text_encoder_2.lora_alpha"] == 5.0
    assert meta["unet.init_lora_weights"] is True
    tensors = load_file(kohya_file)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(v.dim() == 0 and v.dtype == torch.float32 for v in alphas.values())
    assert {float(v) for k, v in alphas.items() if k.startswith("lora_unet_")} == {6.0}
    assert {float(v) for k, v in alphas.items() if k.startswith("lora_te")} == {5.0}


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_dtype(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    comps, _, configs = trained("dummy", text_encoders=False)
    for path in export_lora(tmp_path, models_of(comps, configs), configs, save_dtype=name):
        for key, value in load_file(path).items():
            assert value.dtype == (torch.float32 if key.endswith(".alpha") else dtype), key


# ------------------------------------------------------------------------------- kohya names, real SDXL


SDXL_UNET_CONFIG = {
    "layers_per_block": 2,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.parametrize(
    "module,sgm",
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
            "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        ),
        ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        (
            "up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0",
            "output_blocks.2.1.transformer_blocks.3.attn2.to_out.0",
        ),
        ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("down_blocks.2.resnets.1.time_emb_proj", "input_blocks.8.0.emb_layers.1"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
        ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_out", "out.2"),
    ],
)
def test_sgm_paths_of_sdxl_modules(module: str, sgm: str) -> None:
    """SGM names as they appear in SDXL's original checkpoint (sd_xl_base_1.0.safetensors)."""
    assert unet_sgm_path(module, SDXL_UNET_CONFIG) == sgm


@pytest.mark.parametrize(
    "module", ["time_embedding.linear_1", "add_embedding.linear_2", "mid_block.attentions.1.proj_in"]
)
def test_modules_without_an_accepted_kohya_name_are_refused(module: str) -> None:
    with pytest.raises(KeyMapError, match=module.replace(".", r"\.")):
        unet_sgm_path(module, SDXL_UNET_CONFIG)


def test_kohya_stems_for_the_real_sdxl_topology(tmp_path: Path) -> None:
    te = TE_TARGETS + ["fc1", "fc2"]
    comps, _, configs = trained("sdxl", unet_targets=ATTN_TARGETS + ["ff.net.2"], te_targets=te)
    _, kohya_file = export_lora(tmp_path, models_of(comps, configs), configs)
    tensors = load_file(kohya_file)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(tensors) == 3 * len(stems)
    counts = {p: sum(s.startswith(p) for s in stems) for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    # Every targeted module exactly once: 70 transformer blocks x (8 attention + ff.net.2); 12 and 32 CLIP
    # layers x 6 (q, k, v, out, fc1, fc2).
    targeted = {name: sum(1 for _ in bilora_layers(comps[name])) for name in MODELS}
    assert targeted == {"unet": 70 * 9, "text_encoder": 12 * 6, "text_encoder_2": 32 * 6}
    assert counts == {"lora_unet_": 70 * 9, "lora_te1_": 12 * 6, "lora_te2_": 32 * 6}
    for stem in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_q",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
    ]:
        assert stem in stems, stem
    assert not any("encoder_layers" in s and "text_model_encoder_layers" not in s for s in stems)
    # docs/lora_formats.md (kohya stems): transformer blocks per SGM attention stack.
    depth: dict[str, set[int]] = {}
    for stem in stems:
        if "_transformer_blocks_" in stem:
            prefix, rest = stem.split("_transformer_blocks_")
            depth.setdefault(prefix.removeprefix("lora_unet_"), set()).add(int(rest.split("_")[0]))
    assert {k: len(v) for k, v in depth.items()} == {
        **{f"input_blocks_{i}_1": 2 for i in (4, 5)},
        **{f"input_blocks_{i}_1": 10 for i in (7, 8)},
        "middle_block_1": 10,
        **{f"output_blocks_{i}_1": 10 for i in (0, 1, 2)},
        **{f"output_blocks_{i}_1": 2 for i in (3, 4, 5)},
    }


def _adapted_paths(model: torch.nn.Module) -> list[str]:
    adapted = set(map(id, bilora_layers(model)))
    return [path for path, m in model.named_modules() if id(m) in adapted]


# -------------------------------------------------------------------------------- folder, CLI, --fuse


def training_output(folder: Path, base_dir: str, *, options: dict | None = None, **kwargs) -> tuple:
    """A trainer-like output folder: bilora_adapters.safetensors + training_config.yaml, trained on the
    pipeline saved at ``base_dir``."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    parts = {name: getattr(pipe, name) for name in MODELS}
    comps, base, configs = trained(components={**pipe.components, **parts}, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    save_bilora_state(folder / STATE_FILE, models_of(comps, configs), configs)
    opts = {
        "pretrained_model_name_or_path": base_dir,
        "method": "bilora",
        "rank": 4,
        "lora_alpha": 6.0,
        "aux_rank": 2,
        "aux_alpha": 3.0,
        "rho": 0.05,
        "max_train_steps": 500,
        "train_text_encoder": True,
        "dataset": "3d-icons",
        "output_name": "icons",
        **(options or {}),
    }
    (folder / "training_config.yaml").write_text(yaml.safe_dump(opts))
    return comps, base, configs


def test_cli_exports_a_training_folder_like_the_trainer(tmp_path: Path, tiny_sdxl_dir: str, capsys) -> None:
    comps, _, configs = training_output(tmp_path / "run", tiny_sdxl_dir)
    assert main(["--input", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "out" / DIFFUSERS_FILE),
        str(tmp_path / "out" / "icons.safetensors"),
    ]
    in_memory = export_lora(tmp_path / "mem", models_of(comps, configs), configs, output_name="icons")
    for path in in_memory:
        from_folder = load_file(tmp_path / "out" / path.name)
        assert from_folder.keys() == load_file(path).keys()
        for key, value in load_file(path).items():
            assert torch.equal(from_folder[key], value), key
    meta = header(tmp_path / "out" / "icons.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6.0")
    assert (meta["bilora_method"], meta["bilora_rho"], meta["bilora_aux_rank"]) == ("bilora", "0.05", "2")
    assert (meta["ss_sd_model_name"], meta["ss_max_train_steps"]) == (tiny_sdxl_dir, "500")
    assert meta["bilora_dataset"] == "3d-icons" and meta["ss_network_train_unet_only"] == "False"
    assert all(isinstance(v, str) for v in meta.values())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "temporary files left"


# ------------------------------------------------------------------------------------------- refusals


def refused(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop progress bars of earlier set-up
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bilora-export: error:") and "\n" not in err
    return err


def test_pickle_state_is_refused_and_runs_no_code(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    blob = pickle.dumps({"unet.default.x.lora_A.weight": Payload()})
    pickle.loads(blob)  # the payload is live: unpickling it creates the marker ...
    assert marker.exists()
    marker.unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / STATE_FILE).write_bytes(blob)
    err = refused(["--input", str(tmp_path / "run"), "--output", str(tmp_path / "out")], capsys)
    assert STATE_FILE in err and "safetensors" in err
    assert not marker.exists()  # ... and the export never unpickled it
    assert not (tmp_path / "out").exists()


def _rewrite_state(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_wrong_shape_is_refused(tmp_path: Path, tiny_sdxl_dir: str, capsys) -> None:
    training_output(tmp_path / "run", tiny_sdxl_dir, text_encoders=False)

    def widen(tensors: dict) -> None:
        key = next(
            k for k in sorted(tensors) if k.startswith("unet.default.") and k.endswith("lora_A.weight")
        )
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)

    _rewrite_state(tmp_path / "run" / STATE_FILE, widen)
    err = refused(["--input", str(tmp_path / "run"), "--output", str(tmp_path / "out")], capsys)
    assert "shapes" in err and "unet." in err
    assert not (tmp_path / "out").exists()


def test_a_lora_for_another_topology_is_refused(tmp_path: Path, tiny_sdxl_dir: str, capsys) -> None:
    comps, _, configs = trained("sdxl", text_encoders=False)  # SGM input_blocks.7/8 do not exist in "dummy"
    (tmp_path / "run").mkdir()
    save_bilora_state(tmp_path / "run" / STATE_FILE, models_of(comps, configs), configs)
    err = refused(
        [
            "--input",
            str(tmp_path / "run"),
            "--output",
            str(tmp_path / "out"),
            "--pretrained_model_name_or_path",
            tiny_sdxl_dir,
        ],
        capsys,
    )
    assert "no such module" in err or "shapes" in err


def test_non_sdxl_component_and_missing_base_are_refused(tmp_path: Path, tiny_sdxl_dir: str, capsys) -> None:
    training_output(tmp_path / "run", tiny_sdxl_dir, text_encoders=False)
    _rewrite_state(
        tmp_path / "run" / STATE_FILE,
        lambda t: t.update({"transformer.default.x.lora_A.weight": torch.zeros(2, 2)}),
    )
    assert "transformer" in refused(["--input", str(tmp_path / "run")], capsys)

    training_output(tmp_path / "run2", tiny_sdxl_dir, text_encoders=False)
    (tmp_path / "run2" / "training_config.yaml").write_text("method: bilora\n")
    assert "--pretrained_model_name_or_path" in refused(["--input", str(tmp_path / "run2")], capsys)


def test_time_embedding_lora_is_refused_for_kohya(tmp_path: Path) -> None:
    comps, _, configs = trained(
        "dummy", text_encoders=False, unet_targets=["to_q", "time_embedding.linear_1"]
    )
    with pytest.raises(ExportError, match=r"time_embedding\.linear_1"):
        export_lora(tmp_path / "out", models_of(comps, configs), configs, format="both")
    assert not (tmp_path / "out").exists(), "nothing may be written when validation fails"
    # The diffusers format carries it fine (diffusers loads any module of its own UNet).
    assert export_lora(tmp_path / "out", models_of(comps, configs), configs, format="diffusers")


def test_nan_and_w0_rewriting_inits_are_refused(tmp_path: Path) -> None:
    comps, _, configs = trained("dummy", text_encoders=False)
    layer = next(iter(bilora_layers(comps["unet"])))
    with torch.no_grad():
        lora_pair(layer, PRIMARY).B_param[0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        export_lora(tmp_path, models_of(comps, configs), configs)

    unet = tiny_sdxl_components("dummy")["unet"]
    config = BiLoRAConfig(rank=2, alpha=2.0, init="pissa")
    attach_bilora(unet, config)
    with pytest.raises(ExportError, match="pissa"):
        export_lora(tmp_path, {"unet": unet}, {"unet": config})


def test_bad_options_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path), "--format", "ckpt"])
    assert exit_info.value.code == 2
    assert "--format" in capsys.readouterr().err
    assert "missing: no such folder" in refused(["--input", str(tmp_path / "missing")], capsys)
    assert "--input is required" in refused(["--format", "kohya"], capsys)
    assert "unknown option 'fromat'" in refused(["--input", str(tmp_path), "--fromat", "kohya"], capsys)


def test_cli_options_keep_every_flag_and_default() -> None:
    """bilora-export's typed options: the flags and defaults its argparse parser had, in the typed parser."""
    from bilora_diffusion.options import format_help, parse_options
    from bilora_diffusion.sdxl.export import ExportOptions

    o = parse_options(ExportOptions, ["--input", "run", "--fuse", "--overwrite", "--save_dtype", "fp16"])
    assert (o.input, o.fuse, o.overwrite, o.save_dtype, o.format, o.output) == (
        "run",
        True,
        True,
        "fp16",
        "both",
        None,
    )
    flags = ["--input", "--output", "--overwrite", "--format", "--save_dtype", "--fuse", "--output_name",
             "--pretrained_model_name_or_path"]  # fmt: skip
    help_text = format_help(ExportOptions)
    assert help_text.startswith("usage: bilora-export") and all(f"  {f} " in help_text for f in flags)
