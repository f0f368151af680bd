"""DreamBooth prior preservation and DoRA as the primary branch (issue 16, items 2 and 3)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora, aux_disabled, build_optimizer
from bilora_diffusion.config import METHODS, ConfigError
from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.peft_glue import aux_norm, bilora_layers, branch_parameters, lora_pair
from bilora_diffusion.sdxl.export import (
    DIFFUSERS_FILE,
    ExportError,
    check_lora_file,
    export_lora,
    lora_modules,
)
from bilora_diffusion.sdxl.loss import MicroBatch, denoising_loss, draw_noise, micro_batch_loss
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.sdxl.prior import CLASS_IMAGE, missing_class_images, prior_loss
from bilora_diffusion.testing import make_image_folder

PRIOR = ["--with_prior_preservation", "--class_prompt", "a photo of a square", "--num_class_images", "3"]
PRIOR += ["--sample_batch_size", "2", "--class_inference_steps", "2"]


# ------------------------------------------------------------------------------------------- the options


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--with_prior_preservation", "--class_prompt", "x"], "--class_data_dir"),
        (["--with_prior_preservation", "--class_data_dir", "c"], "--class_prompt"),
        ([*PRIOR, "--class_data_dir", "c", "--num_class_images", "0"], "--num_class_images"),
        ([*PRIOR, "--class_data_dir", "c", "--sample_batch_size", "0"], "--sample_batch_size"),
        ([*PRIOR, "--class_data_dir", "c", "--prior_loss_weight", "-1"], "--prior_loss_weight"),
        (["--use_dora", "maybe"], "--use_dora"),
        (["--use_dora", "--init_lora_weights", "pissa"], "--init_lora_weights pissa"),
    ],
)
def test_bad_prior_and_dora_options_are_one_line_errors_naming_them(tmp_path, extra, match):
    argv = ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(OptionError, match=match) as err:
        parse_options(SDXLOptions, argv)
    assert "\n" not in str(err.value)


def test_use_dora_makes_only_the_primary_branch_dora_under_every_method(tmp_path):
    for method in METHODS:
        opts = parse_options(SDXLOptions, ["--dataset", ".", "--use_dora", "--method", method])
        assert opts.bilora_config(["to_q"]).use_dora
    with pytest.raises(ConfigError, match="use_dora"):
        BiLoRAConfig(use_dora="yes")


def test_missing_class_images_counts_the_folder_and_fills_the_gaps(tmp_path):
    folder = tmp_path / "class"
    assert missing_class_images(folder, 3) == [0, 1, 2]
    make_image_folder(folder, n=1, captions=False)  # img_000.png: a user's own class image counts
    (folder / CLASS_IMAGE.format(1)).write_bytes((folder / "img_000.png").read_bytes())
    assert missing_class_images(folder, 4) == [0, 2]
    assert missing_class_images(folder, 2) == []


# --------------------------------------------------------------------------------------------- the loss


def test_prior_loss_is_instance_mse_plus_weighted_class_mse_of_the_same_noise(tiny_sdxl):
    """One batch [instance; class] through the loss the trainer uses equals the two halves run on their own
    (same noise, same timesteps) combined by hand: instance MSE + w · class MSE."""
    from accelerate import Accelerator

    unet, scheduler = tiny_sdxl["unet"], tiny_sdxl["scheduler"]
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler.config)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise, timesteps = draw_noise(latents, 1000, 0.0, g)
    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    embeds = torch.randn(4, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(4, pooled_dim, generator=g)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 4)
    acc = Accelerator(cpu=True)

    def batch(rows, n_instance=None):
        return MicroBatch(
            latents[rows],
            time_ids[rows],
            ["x"] * len(rows),
            ["k"] * len(rows),
            noise[rows],
            timesteps[rows],
            embeds[rows],
            pooled[rows],
            n_instance=n_instance,
        )

    w = 0.7
    for snr_gamma in (None, 5.0):
        kw = dict(prediction_type="epsilon", snr_gamma=snr_gamma)
        with torch.no_grad():
            both = micro_batch_loss(
                batch([0, 1, 2, 3], 2), unet, scheduler, [], [], acc, torch.float32, **kw, prior_loss_weight=w
            )
            instance = micro_batch_loss(batch([0, 1]), unet, scheduler, [], [], acc, torch.float32, **kw)
            prior = micro_batch_loss(batch([2, 3]), unet, scheduler, [], [], acc, torch.float32, **kw)
        torch.testing.assert_close(both, instance + w * prior, rtol=1e-5, atol=1e-6)
    # and the pure function on per-sample losses
    total, i, p = prior_loss(torch.tensor([1.0, 3.0, 10.0, 20.0]), 2, 0.5)
    assert (float(total), float(i), float(p)) == (2.0 + 0.5 * 15.0, 2.0, 15.0)
    pred, target = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    by_hand = ((pred[:2] - target[:2]) ** 2).mean() + w * ((pred[2:] - target[2:]) ** 2).mean()
    got = denoising_loss(
        pred, target, scheduler, timesteps, None, "epsilon", n_instance=2, prior_loss_weight=w
    )
    torch.testing.assert_close(got, by_hand)


# ------------------------------------------------------------------------------- DoRA in the optimizer


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))


@pytest.mark.parametrize("method", METHODS)
def test_dora_primary_trains_with_every_method_and_the_clip_bounds_only_the_aux_branch(method):
    config = BiLoRAConfig(rank=2, alpha=4, rho=0.01, target_modules=["0", "2"], use_dora=True)
    config = config.for_method(method)
    model = attach_bilora(_mlp(), config)
    primary, aux = branch_parameters(model, PRIMARY), branch_parameters(model, AUX)
    magnitudes = [p for p in primary if p.dim() == 1]
    assert len(magnitudes) == 2 and not any(p.dim() == 1 for p in aux)
    assert all(not layer.use_dora.get(AUX, False) for layer in bilora_layers(model))
    before = [m.detach().clone() for m in magnitudes]
    opt = build_optimizer(model, config, method=method, lr=0.05, total_steps=5)
    x, y = torch.randn(16, 6), torch.randn(16, 5)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert any(not torch.equal(a, b) for a, b in zip(before, magnitudes))  # the magnitudes train
    if config.aux_rank:
        assert aux_norm(model) <= config.rho * (1 + 1e-5)
        assert opt.flat  # the magnitude vectors ride in the primary group's flat vector, after the pairs


def test_dora_flat_update_equals_the_per_tensor_update():
    config = BiLoRAConfig(rank=2, alpha=4, rho=0.05, target_modules=["0", "2"], use_dora=True)
    models = [attach_bilora(_mlp(), config) for _ in range(2)]
    opts = [build_optimizer(m, config, lr=0.05, flat=flat) for m, flat in zip(models, (True, False))]
    x, y = torch.randn(16, 6), torch.randn(16, 5)
    for _ in range(4):
        for m, o in zip(models, opts):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the state saved by one loads into the other
    opts[1].load_state_dict(opts[0].state_dict())


def test_export_refuses_a_magnitude_the_config_does_not_declare():
    state = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(3, 2)}
    state["m.lora_magnitude_vector"] = torch.ones(3)
    with pytest.raises(ExportError, match="use_dora=False"):
        lora_modules("unet", state, BiLoRAConfig(rank=2, target_modules=["m"]), "test")
    assert lora_modules("unet", state, BiLoRAConfig(rank=2, target_modules=["m"], use_dora=True), "t")
    del state["m.lora_magnitude_vector"]
    with pytest.raises(ExportError, match="lora_magnitude_vector"):
        lora_modules("unet", state, BiLoRAConfig(rank=2, target_modules=["m"], use_dora=True), "test")


# ------------------------------------------------------------------------------------ DoRA export files


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bilora_layers(model):
            for branch in (PRIMARY, AUX):
                pair = lora_pair(layer, branch)
                if pair is not None:
                    pair.A_param.copy_(torch.randn(pair.A_param.shape, generator=g) * 0.1)
                    pair.B_param.copy_(torch.randn(pair.B_param.shape, generator=g) * 0.1)
            m = layer.lora_magnitude_vector[PRIMARY].weight
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=g))


def _unet_inputs(unet):
    g = torch.Generator().manual_seed(1)
    cross = unet.config.cross_attention_dim
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 77, cross, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(
                2,
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim,
                generator=g,
            ),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32),
        },
    )


def _check_files(out, unet, config, pipe):
    """The diffusers file through stock load_lora_weights reproduces ``unet`` with the aux branch off; the
    kohya file carries dora_scale = the magnitudes as [out, 1] columns."""
    from bilora_diffusion.sdxl.kohya import kohya_stem

    inputs = _unet_inputs(unet)
    with torch.no_grad(), aux_disabled(unet):
        want = unet(**inputs).sample
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
    pipe.load_lora_weights(str(out), weight_name=DIFFUSERS_FILE)
    assert any(getattr(m, "use_dora", {}).get("default_0") for m in pipe.unet.modules())
    with torch.no_grad():
        got = pipe.unet(**inputs).sample
    assert float((want - base).abs().max()) > 1e-3  # the LoRA shows
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    kohya = load_file(str(Path(out) / "bilora_sdxl.safetensors"))
    scales = {k: v for k, v in kohya.items() if k.endswith(".dora_scale")}
    layers = {n: m for n, m in unet.named_modules() if m in set(bilora_layers(unet))}
    assert len(scales) == len(layers)
    for name, layer in layers.items():
        magnitude = layer.lora_magnitude_vector[PRIMARY].weight.detach()
        scale = scales[f"{kohya_stem('unet', name, unet.config)}.dora_scale"]
        assert scale.shape == (layer.base_layer.out_features, 1)
        torch.testing.assert_close(scale[:, 0], magnitude)
    # bilora-generate's checks: the diffusers DoRA file passes, the kohya one (diffusers drops dora_scale) not
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    assert check_lora_file(Path(out) / DIFFUSERS_FILE, models, pipe.unet.config)[1] == "diffusers"
    with pytest.raises(ExportError, match="dora_scale"):
        check_lora_file(Path(out) / "bilora_sdxl.safetensors", models, pipe.unet.config)


def test_dora_export_reproduces_the_model_through_stock_diffusers(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    unet = copy.deepcopy(pipe.unet)
    config = BiLoRAConfig(rank=2, alpha=4, aux_rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    config = BiLoRAConfig(**{**config.to_dict(), "use_dora": True})
    attach_bilora(unet, config)
    _randomise(unet)
    export_lora(tmp_path, {"unet": unet}, {"unet": config})
    _check_files(tmp_path, unet, config, pipe)


# -------------------------------------------------------------------------------------- end to end (slow)
