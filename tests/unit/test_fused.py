"""The fused fast path equals PEFT's two-adapter forward: outputs, every adapter gradient, one optimizer step;
and it steps aside (PEFT's forward) wherever it cannot be exact."""

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from bilora_diffusion import (
    AUX,
    PRIMARY,
    BiLoRAConfig,
    attach_bilora,
    aux_disabled,
    bilora_layers,
    build_optimizer,
)
from bilora_diffusion.config import ConfigError
from bilora_diffusion.fused import can_fuse, disable_fused, enable_fused, is_fused
from bilora_diffusion.peft_glue import adapters_disabled
from tests.unit.core.test_bilora import (  # the same tiny models and configs as the core tests
    linear_config,
    mlp,
    randomize,
)


def twin_models(
    build: Callable[[], nn.Module], config: BiLoRAConfig, scale: float = 0.3
) -> tuple[nn.Module, nn.Module]:
    """(PEFT two-adapter model, fused model) with identical weights, adapters random with std ``scale``."""
    reference = attach_bilora(build(), BiLoRAConfig(**{**config.to_dict(), "fused": False}))
    fused = attach_bilora(build(), BiLoRAConfig(**{**config.to_dict(), "fused": True}))
    randomize(reference, scale)
    fused.load_state_dict(reference.state_dict())
    assert not any(is_fused(m) for m in reference.modules())
    assert all(is_fused(layer) for layer in bilora_layers(fused))
    return reference, fused


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of every PEFT adapter tensor, by name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def assert_all_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    """Elementwise within rtol, with an absolute floor of rtol times the largest entry over all tensors (some
    gradients are all rounding noise, e.g. a last layer's k_proj in a text encoder read at the penultimate
    layer)."""
    assert set(got) == set(want)
    floor = rtol * max(float(t.detach().abs().max()) for t in want.values())
    for name, t in want.items():
        torch.testing.assert_close(got[name].detach(), t.detach(), rtol=rtol, atol=floor, msg=name)


def assert_same_output_grads_and_step(
    reference: nn.Module,
    fused: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    config: BiLoRAConfig,
    rtol: float = 1e-5,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
) -> None:
    """Forward, the gradient of every adapter tensor, and one bilora step (with the global clip).

    The step defaults to SGD, which maps gradients linearly to the update: Adam's first step is lr·sign(g),
    which turns the float32 rounding of near-zero gradients into lr-sized differences (AdamW is checked on
    the MLP and in float64)."""
    losses = [loss_fn(m) for m in (reference, fused)]
    torch.testing.assert_close(losses[1], losses[0], rtol=rtol, atol=0.0)
    for loss in losses:
        loss.backward()
    ref_grads, fused_grads = adapter_grads(reference), adapter_grads(fused)
    assert any(f".{AUX}." in n for n in ref_grads)
    assert all(float(g.abs().max()) > 0 for g in ref_grads.values())
    assert_all_close(fused_grads, ref_grads, rtol)
    for model in (reference, fused):
        model.zero_grad(set_to_none=True)
        opt = build_optimizer(model, config, method="bilora", optimizer_cls=optimizer_cls, lr=1e-2)
        opt.step(lambda model=model: loss_fn(model).backward())
        assert opt.last_aux_norm == pytest.approx(config.rho)  # the global clip engaged
    assert_all_close(fused.state_dict(), reference.state_dict(), rtol)


# -- equality with the two-adapter path -----------------------------------------------------------------
def test_fused_equals_two_adapters_on_mlp():
    config = linear_config()
    reference, fused = twin_models(mlp, config)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    loss_fn = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    assert_same_output_grads_and_step(reference, fused, loss_fn, config, optimizer_cls=torch.optim.AdamW)


def test_single_lora_fast_path_equals_peft_lora():
    """--method lora runs the same fused forward with one branch: PEFT's output, gradients and steps."""
    config = linear_config(aux_rank=0)
    reference, fused = twin_models(mlp, config)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    losses = [F.mse_loss(m(x), y) for m in (reference, fused)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0.0)
    for loss in losses:
        loss.backward()
    assert_all_close(adapter_grads(fused), adapter_grads(reference), rtol=1e-5)
    for model in (reference, fused):
        opt = build_optimizer(model, config, method="lora", lr=1e-2)
        opt.step()
    assert_all_close(fused.state_dict(), reference.state_dict(), rtol=1e-5)


def unet_loss(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An SDXL-style denoising MSE on fixed random inputs (latents [2, 4, 16, 16], 7 text tokens)."""
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    hidden = torch.randn(2, 7, model.config.cross_attention_dim, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 32, generator=gen),
        "time_ids": torch.rand(2, 6, generator=gen) * 64,
    }
    added = {k: v.to(dtype) for k, v in added.items()}
    out = model(sample.to(dtype), torch.tensor([10, 500]), hidden.to(dtype), added_cond_kwargs=added).sample
    return F.mse_loss(out, torch.randn(out.shape, generator=gen).to(dtype))


@pytest.mark.parametrize(
    "dtype,rtol,optimizer_cls",
    [(torch.float32, 1e-5, torch.optim.SGD), (torch.float64, 1e-10, torch.optim.AdamW)],
)
def test_fused_equals_two_adapters_on_tiny_unet_linear_and_conv(dtype, rtol, optimizer_cls):
    """float32 at rtol 1e-5 and float64 at 1e-10: the two paths differ only by rounding. Adapter std 0.1: at 0.3
    this random UNet is so ill-conditioned that float32 rounding alone moves some gradients by 0.4 %."""
    from bilora_diffusion.testing import tiny_sdxl_components

    # Attention projections (Linear) and the resnets' 3x3 convolutions (Conv2d); s1 = s2 (the GEMM-alpha path).
    config = BiLoRAConfig(
        rank=2, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    )
    build = lambda: tiny_sdxl_components("dummy", seed=0)["unet"].to(dtype)  # noqa: E731
    reference, fused = twin_models(build, config, scale=0.1)
    layer_types = {type(layer.get_base_layer()) for layer in bilora_layers(fused)}
    assert layer_types == {nn.Linear, nn.Conv2d}
    assert_same_output_grads_and_step(
        reference, fused, lambda m: unet_loss(m, dtype), config, rtol, optimizer_cls
    )


def test_fused_equals_two_adapters_on_clip_text_encoder():
    from bilora_diffusion.testing import tiny_sdxl_components

    config = BiLoRAConfig(
        rank=4, alpha=4, aux_rank=2, aux_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    reference, fused = twin_models(lambda: tiny_sdxl_components("dummy", seed=0)["text_encoder_2"], config)
    ids = torch.randint(2, 40, (2, 77), generator=torch.Generator().manual_seed(0))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        out = m(ids, output_hidden_states=True)
        return out.hidden_states[-2].square().mean() + out.text_embeds.square().mean()

    assert_same_output_grads_and_step(reference, fused, loss_fn, config)


def test_half_precision_base_matches_peft_rounding():
    """bf16 frozen weights with float32 adapters (the trainer's setting), without and with autocast."""
    config = linear_config()
    reference, fused = twin_models(lambda: mlp().to(torch.bfloat16), config)
    x = torch.randn(16, 6, dtype=torch.bfloat16)
    for m in (reference, fused):
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    out, ref = fused(x), reference(x)  # adapters added in float32, then cast back to the base dtype (PEFT)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), reference(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# -- fallbacks ------------------------------------------------------------------------------------------
def test_aux_disabled_equals_primary_only_model_with_fused_on():
    model = attach_bilora(mlp(), linear_config())
    randomize(model)
    primary_only = attach_bilora(mlp(), linear_config(aux_rank=0))
    primary_only.load_state_dict({k: v for k, v in model.state_dict().items() if AUX not in k})
    assert all(is_fused(layer) for layer in bilora_layers(model))
    assert all(
        is_fused(layer) for layer in bilora_layers(primary_only)
    )  # one branch: the single-LoRA fast path
    x = torch.randn(4, 6)
    with aux_disabled(model):
        torch.testing.assert_close(model(x), primary_only(x))
    with adapters_disabled(model):
        base = nn.Sequential(*[getattr(layer, "base_layer", layer) for layer in model])
        torch.testing.assert_close(model(x), base(x))
    assert not torch.allclose(model(x), primary_only(x))


def test_dropout_falls_back_to_peft_forward():
    """Each branch draws its own dropout mask in PEFT, so with dropout > 0 the layer must not fuse: under the
    same RNG state the fused-on model reproduces the two-adapter model bitwise."""
    reference, fused = twin_models(mlp, linear_config(dropout=0.5))
    x = torch.randn(16, 6)
    outs = []
    for m in (reference, fused):
        torch.manual_seed(7)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_merged_and_dora_fall_back():
    config = linear_config()
    reference, fused = twin_models(mlp, config)
    x = torch.randn(5, 6)
    expected = reference(x).detach()
    for layer in bilora_layers(fused):
        layer.merge(adapter_names=[PRIMARY, AUX])
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)
    # A DoRA primary: the layer keeps PEFT's forward.
    model = mlp()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True), model, adapter_name=PRIMARY)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), model, adapter_name=AUX)
    assert not can_fuse(model[0]) and enable_fused(model) == 0


def test_enable_disable_deepcopy_and_pickle():
    model = attach_bilora(mlp(), linear_config())
    randomize(model)
    x = torch.randn(4, 6)
    fused_out = model(x).detach()
    assert enable_fused(model) == 2  # idempotent
    assert disable_fused(model) == 2 and not any(is_fused(m) for m in model.modules())
    torch.testing.assert_close(model(x), fused_out, rtol=1e-5, atol=1e-6)
    assert enable_fused(model) == 2
    clone = copy.deepcopy(model)  # the bound forward follows the copy, not the original
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if AUX in name:
                p.zero_()
    with aux_disabled(model):
        primary = model(x).detach()
    torch.testing.assert_close(clone(x), primary, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), fused_out)
    buffer = io.BytesIO()  # a whole fused model pickles and loads, still fused
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(is_fused(layer) for layer in bilora_layers(loaded))
    torch.testing.assert_close(loaded(x), fused_out)


@pytest.mark.parametrize("fused", [False, True])
def test_config_flag_controls_installation(fused):
    model = attach_bilora(mlp(), linear_config(fused=fused))
    assert all(is_fused(layer) == fused for layer in bilora_layers(model))


# -- the update side: batched clip, foreach AdamW --------------------------------------------------------
def test_batched_pair_norms_and_both_clip_paths_equal_explicit_products():
    """The Gram-matrix norms batched per shape equal ||s·B·A||² formed explicitly, and the aux clip of the
    per-tensor and of the flat update give the same tensors and norm, for every clip mode."""
    from bilora_diffusion.peft_glue import branch_pairs, pair_sq_norms
    from bilora_diffusion.testing import tiny_sdxl_components

    # Several shapes: attention projections of two widths, cross-attention keys, text-encoder projections.
    config = BiLoRAConfig(
        rank=2, alpha=4, aux_rank=3, aux_alpha=2, rho=0.05, target_modules=["to_q", "to_k", "to_v", "q_proj"]
    )
    comps = tiny_sdxl_components("dummy", seed=0)
    models = nn.ModuleList(
        [attach_bilora(comps[k], config) for k in ("unet", "text_encoder", "text_encoder_2")]
    )
    randomize(models, scale=0.1)
    pairs = branch_pairs(list(models), AUX)
    assert len({(p.A.shape, p.B.shape) for p in pairs}) > 2
    explicit = torch.stack([((p.scale * p.B @ p.A).detach() ** 2).sum() for p in pairs])
    torch.testing.assert_close(pair_sq_norms(pairs), explicit, rtol=1e-5, atol=0.0)
    for mode in ("global", "layer", "none"):
        results = []
        for flat in (False, True):
            copy_ = copy.deepcopy(models)
            opt = build_optimizer(
                list(copy_), BiLoRAConfig(**{**config.to_dict(), "clip": mode}), lr=0.0, flat=flat
            )
            for p in opt.role_params("primary") + opt.role_params("aux"):
                p.grad = torch.zeros_like(p)
            opt.step()  # lr 0: only the clip moves anything
            results.append((copy_.state_dict(), opt.last_aux_norm))
        assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
        for name, p in results[0][0].items():
            torch.testing.assert_close(results[1][0][name], p, rtol=1e-6, atol=0.0, msg=name)
        unclipped = float(explicit.sum().sqrt())
        assert (
            results[0][1] == pytest.approx(unclipped, rel=1e-6)
            if mode == "none"
            else results[0][1] < unclipped
        )


def test_adamw_implementations_give_the_same_steps():
    """AdamW's foreach and fused implementations (fused is the library's default) give the same bilora steps
    as its single-tensor one, ascent (maximize) included."""
    config = linear_config()
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    models = []
    for impl in ({"flat": False}, {"flat": False, "foreach": True}, {"flat": False, "fused": True}, {}):
        model = attach_bilora(mlp(), config)
        randomize(model)
        opt = build_optimizer(model, config, lr=1e-2, max_grad_norm=1.0, **impl)
        for _ in range(3):
            opt.zero_grad()
            opt.step(lambda model=model: F.mse_loss(model(x), y).backward())
        models.append(model.state_dict())
    for other in models[1:]:
        for name, p in models[0].items():
            torch.testing.assert_close(other[name], p, rtol=1e-6, atol=1e-8, msg=name)


def _flat_run(flat: bool, steps: int, resume_at: int | None = None) -> tuple[dict, list[float], list[float]]:
    """Bilora on the tiny SDXL UNet and a text encoder (several shapes, two modules with their own lr), with
    weight decay on the primary group only, a separate aux lr, gradient clipping that engages, the global
    aux clip and a cosine schedule; optionally saved and reloaded into a fresh optimizer at ``resume_at``.
    Returns the final parameters, the per-step primary grad norms and the aux norms."""
    from bilora_diffusion.testing import tiny_sdxl_components

    config = BiLoRAConfig(
        rank=2,
        alpha=4,
        rho=0.02,
        aux_lr=3e-3,
        aux_weight_decay=0.0,
        target_modules=["to_q", "to_v", "q_proj"],
    )
    comps = tiny_sdxl_components("dummy", seed=0)
    unet, te = attach_bilora(comps["unet"], config), attach_bilora(comps["text_encoder"], config)
    randomize(nn.ModuleList([unet, te]), scale=0.1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 80, (2, 8), generator=gen)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    time_ids = torch.zeros(2, 6)

    def build():
        opt = build_optimizer(
            [(unet, 1e-2), (te, 5e-3)], config, lr=1e-2, max_grad_norm=0.02, weight_decay=0.1, flat=flat
        )
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def loss_fn():
        hidden = te(tokens, output_hidden_states=True).hidden_states[-2]
        embeds = torch.cat([hidden, hidden.new_zeros(*hidden.shape[:2], 48 - hidden.shape[-1])], dim=-1)
        added = {"text_embeds": torch.zeros(2, 32), "time_ids": time_ids}
        out = unet(latents, 10, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        return F.mse_loss(out, latents)

    opt, sched = build()
    assert opt.flat is flat
    norms, aux = [], []
    for step in range(steps):
        if step == resume_at:
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            opt, sched = build()
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
        opt.zero_grad(set_to_none=True)
        opt.step(lambda: loss_fn().backward())
        sched.step()
        norms.append(opt.last_grad_norms["primary"])
        aux.append(opt.last_aux_norm)
    params = {
        f"{i}.{n}": p.detach().clone()
        for i, m in enumerate((unet, te))
        for n, p in m.named_parameters()
        if "lora_" in n
    }
    return params, norms, aux


def test_flat_update_equals_per_tensor_update_and_resumes():
    """The flat update (one vector per group) gives the per-tensor update's steps: several groups and
    shapes, per-group lr and weight decay, ascent, clipping that engages, the aux clip, an LR schedule; and
    its state_dict reloaded into a fresh optimizer continues exactly like the uninterrupted run."""
    want, want_norms, want_aux = _flat_run(flat=False, steps=4)
    got, got_norms, got_aux = _flat_run(flat=True, steps=4)
    assert min(want_norms) > 0.02  # the gradient clip engaged at every step
    assert want_aux[-1] == pytest.approx(0.02)  # so did the aux clip
    assert got_norms == pytest.approx(want_norms, rel=1e-5)
    assert got_aux == pytest.approx(want_aux, rel=1e-5)
    assert_all_close(got, want, rtol=1e-5)
    resumed, _, _ = _flat_run(flat=True, steps=4, resume_at=2)
    for name, p in got.items():
        assert torch.equal(resumed[name], p), name


def _mlp_steps(model, opt, steps: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)
        opt.zero_grad()
        opt.step(lambda x=x, y=y: F.mse_loss(model(x), y).backward())


@pytest.mark.parametrize("saved_flat", [False, True])
def test_optimizer_state_converts_between_the_flat_and_per_tensor_layouts(saved_flat):
    """State saved by one update (e.g. a checkpoint from before the flat update) resumes in the other and
    continues like the uninterrupted run; state of other adapters is refused with a message."""
    config = linear_config()
    reference = attach_bilora(mlp(), config)
    randomize(reference)
    resumed = copy.deepcopy(reference)
    ref_opt = build_optimizer(
        reference, config, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, flat=saved_flat
    )
    _mlp_steps(reference, ref_opt, 2)
    saved, weights = copy.deepcopy(ref_opt.state_dict()), copy.deepcopy(reference.state_dict())
    _mlp_steps(reference, ref_opt, 2, seed=1)
    resumed.load_state_dict(weights)
    opt = build_optimizer(resumed, config, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0, flat=not saved_flat)
    opt.load_state_dict(saved)
    _mlp_steps(resumed, opt, 2, seed=1)
    assert_all_close(resumed.state_dict(), reference.state_dict(), rtol=1e-5)
    wider = linear_config(rank=3)
    for flat in (True, False):
        other = build_optimizer(attach_bilora(mlp(), wider), wider, flat=flat)
        with pytest.raises(ValueError, match="saved for other adapters"):
            other.load_state_dict(saved)
    with pytest.raises(ConfigError, match="flat update needs"):
        build_optimizer(attach_bilora(mlp(), config), config, optimizer_cls=torch.optim.Adagrad, flat=True)


def test_flat_update_follows_a_model_cast_after_the_optimizer_was_built():
    """torch optimizers allow moving or casting the model between building them and the first step (e.g. built
    before accelerate's prepare moves the model); so does the flat update, which rebuilds its vector (and
    moves its state, if any) where the parameters are now."""
    config = linear_config()
    models = [attach_bilora(mlp(), config) for _ in range(2)]
    randomize(models[0])
    models[1].load_state_dict(models[0].state_dict())
    for model, flat in zip(models, (True, False)):
        opt = build_optimizer(model, config, lr=1e-2, flat=flat)
        model.double()
        _mlp_steps(model, opt, 3, seed=1, dtype=torch.float64)
    assert opt.flat is False and models[0].get_submodule("0").lora_A.default.weight.dtype == torch.float64
    assert_all_close(models[0].state_dict(), models[1].state_dict(), rtol=1e-5)


def test_flat_update_leaves_params_without_a_gradient_and_their_state_alone():
    """Parameters that get no gradient on a step keep their values and momentum, as with the per-tensor
    update (SGD with momentum: no step counter involved, so the two must agree)."""
    config = linear_config()
    models = [attach_bilora(mlp(), config) for _ in range(2)]
    randomize(models[0])
    models[1].load_state_dict(models[0].state_dict())
    for model, flat in zip(models, (True, False)):
        opt = build_optimizer(model, config, optimizer_cls=torch.optim.SGD, lr=1e-2, momentum=0.9, flat=flat)
        _mlp_steps(model, opt, 1)
        # Layer "2" gets no gradient on the next step.
        frozen = [p for p in model.get_submodule("2").parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        _mlp_steps(model, opt, 1, seed=1)
        for p in frozen:
            p.requires_grad_(True)
        _mlp_steps(model, opt, 2, seed=2)
    assert_all_close(models[0].state_dict(), models[1].state_dict(), rtol=1e-5)


@pytest.mark.parametrize("flat", [True, False])
def test_grad_scaler_steps_equal_unscaled_steps_and_skip_on_inf(flat):
    """The fp16 path of `MethodStep` (GradScaler.unscale_ then scaler.step(optimizer)) gives the steps of a
    plain step() on unscaled gradients, and a step whose gradients hold an inf changes nothing."""
    config = linear_config()
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    plain, scaled = attach_bilora(mlp(), config), attach_bilora(mlp(), config)
    randomize(plain)
    scaled.load_state_dict(plain.state_dict())
    opt = build_optimizer(plain, config, lr=1e-2, max_grad_norm=1.0, flat=flat)
    sopt = build_optimizer(scaled, config, lr=1e-2, max_grad_norm=1.0, flat=flat)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(plain(x), y).backward()
        opt.step()
        sopt.zero_grad()
        scaler.scale(F.mse_loss(scaled(x), y)).backward()
        scaler.unscale_(sopt)
        scaler.step(sopt)
        scaler.update()
    assert_all_close(scaled.state_dict(), plain.state_dict(), rtol=1e-5)
    before = {n: p.clone() for n, p in scaled.state_dict().items()}
    sopt.zero_grad()
    scaler.scale(F.mse_loss(scaled(x), y) * float("inf")).backward()
    scaler.unscale_(sopt)
    scaler.step(sopt)
    for name, p in scaled.state_dict().items():
        assert torch.equal(p, before[name]), name
