"""The Bi-LoRA core against references: forward math, hand-computed updates, the clip, closure counts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilora_diffusion import (
    AUX,
    PRIMARY,
    BiLoRAConfig,
    ConfigError,
    attach_bilora,
    aux_disabled,
    aux_norm,
    bilora_layers,
    build_optimizer,
    primary_state_dict,
)
from bilora_diffusion.peft_glue import lora_pair


def randomize(model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Give every adapter weight (B included, which PEFT starts at zero) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def linear_config(**kw) -> BiLoRAConfig:
    return BiLoRAConfig(
        **{"rank": 2, "alpha": 3.0, "aux_rank": 3, "aux_alpha": 5.0, "target_modules": ["0", "2"], **kw}
    )


def factors(layer, branch):
    pair = lora_pair(layer, branch)
    return pair.A.detach().clone(), pair.B.detach().clone(), pair.scale


# -- forward ------------------------------------------------------------------------------------------
def expected_linear(layer, x):
    base = layer.get_base_layer()
    a1, b1, s1 = factors(layer, PRIMARY)
    a2, b2, s2 = factors(layer, AUX)
    return F.linear(x, base.weight, base.bias) + s1 * x @ (b1 @ a1).T + s2 * x @ (b2 @ a2).T


def test_forward_linear_equals_w0_plus_both_branches():
    model = attach_bilora(nn.Sequential(nn.Linear(6, 4)), linear_config(target_modules=["0"]))
    randomize(model)
    layer = next(bilora_layers(model))
    x = torch.randn(5, 6)
    assert layer.scaling == {PRIMARY: 1.5, AUX: 5.0 / 3}
    torch.testing.assert_close(model(x), expected_linear(layer, x), rtol=1e-5, atol=1e-6)


def test_forward_unet_attention_projection(tiny_sdxl):
    unet = attach_bilora(tiny_sdxl["unet"], BiLoRAConfig(rank=2, alpha=4, aux_rank=2))
    randomize(unet)
    layer = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer in list(bilora_layers(unet))
    x = torch.randn(3, layer.get_base_layer().in_features)
    torch.testing.assert_close(layer(x), expected_linear(layer, x), rtol=1e-5, atol=1e-6)


def test_forward_clip_projection(tiny_sdxl):
    te = attach_bilora(
        tiny_sdxl["text_encoder_2"], BiLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    )
    randomize(te)
    layer = te.text_model.encoder.layers[0].self_attn.out_proj if hasattr(te, "text_model") else None
    layer = layer or te.encoder.layers[0].self_attn.out_proj
    x = torch.randn(2, 7, layer.get_base_layer().in_features)
    torch.testing.assert_close(layer(x), expected_linear(layer, x), rtol=1e-5, atol=1e-6)
    assert len(list(bilora_layers(te))) == 4 * te.config.num_hidden_layers


def test_attach_freezes_base_and_starts_b2_at_zero(tiny_sdxl):
    unfused = attach_bilora(copy.deepcopy(tiny_sdxl["unet"]), BiLoRAConfig(fused=False))
    unet = attach_bilora(tiny_sdxl["unet"], BiLoRAConfig())
    adapters = {n for n in unet.state_dict() if ".lora_" in n}
    assert any(f".{AUX}." in n for n in adapters) and any(f".{PRIMARY}." in n for n in adapters)
    for model in (unet, unfused):  # fused or not, PEFT's tensors are the trained ones
        assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    for layer in bilora_layers(unet):
        assert set(layer.active_adapters) == {PRIMARY, AUX}
        assert torch.count_nonzero(layer.lora_B[AUX].weight) == 0
        assert torch.count_nonzero(layer.lora_A[AUX].weight) > 0
    assert aux_norm(unet) == 0.0


def test_config_validation_names_the_option():
    for bad, word in [
        ({"rank": 0}, "rank"),
        ({"rho": -1}, "rho"),
        ({"clip": "x"}, "clip"),
        ({"aux_rank": -1}, "aux_rank"),
    ]:
        with pytest.raises(ConfigError, match=word):
            BiLoRAConfig(**bad)
    with pytest.raises(ConfigError, match="target_modules"):
        attach_bilora(mlp(), BiLoRAConfig(target_modules=["nope"]))


# -- one step against the hand-computed update ----------------------------------------------------------
def merged_weight(layer):
    base = layer.get_base_layer().weight.detach()
    a1, b1, s1 = factors(layer, PRIMARY)
    a2, b2, s2 = factors(layer, AUX)
    return base + s1 * b1 @ a1 + s2 * b2 @ a2


def functional_loss(model, weights, x, y):
    """The MLP's loss with its two Linear weights replaced by explicit tensors."""
    l0, l2 = model[0], model[2]
    h = torch.tanh(F.linear(x, weights[0], l0.get_base_layer().bias))
    return F.mse_loss(F.linear(h, weights[1], l2.get_base_layer().bias), y)


@pytest.mark.parametrize("method", ["bilora", "dual-descent"])
def test_sgd_step_equals_hand_computed_update(method):
    model = attach_bilora(mlp(), linear_config(clip="none"))
    randomize(model)
    layers = list(bilora_layers(model))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    eta = 0.05
    # Reference: G = dL/dW at W0 + s1·B1·A1 + s2·B2·A2, then the update rules of docs/design.md.
    weights = [merged_weight(layer).requires_grad_() for layer in layers]
    ref_loss = functional_loss(model, weights, x, y)
    grads = torch.autograd.grad(ref_loss, weights)
    sign = 1.0 if method == "bilora" else -1.0
    expected = []
    for layer, g in zip(layers, grads):
        a1, b1, s1 = factors(layer, PRIMARY)
        a2, b2, s2 = factors(layer, AUX)
        expected.append(
            (
                a1 - eta * s1 * b1.T @ g,
                b1 - eta * s1 * g @ a1.T,
                a2 + sign * eta * s2 * b2.T @ g,
                b2 + sign * eta * s2 * g @ a2.T,
            )
        )
    opt = build_optimizer(
        model, linear_config(clip="none"), method=method, optimizer_cls=torch.optim.SGD, lr=eta
    )
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1
    torch.testing.assert_close(loss, ref_loss)  # the loss was taken at W0 + s1·B1·A1 + s2·B2·A2
    for layer, (ea1, eb1, ea2, eb2) in zip(layers, expected):
        a1, b1, _ = factors(layer, PRIMARY)
        a2, b2, _ = factors(layer, AUX)
        for got, want in [(a1, ea1), (b1, eb1), (a2, ea2), (b2, eb2)]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_step_without_closure_equals_step_with_closure_and_accumulation():
    """The drop-in path: backward done by the loop (here over two micro-batches) then step()."""
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    results = []
    for mode in ("closure", "accumulated"):
        model = attach_bilora(mlp(), linear_config())
        randomize(model)
        opt = build_optimizer(model, linear_config(), lr=0.01, max_grad_norm=1.0)
        for _ in range(3):
            opt.zero_grad()
            if mode == "closure":
                opt.step(lambda: F.mse_loss(model(x), y).backward())
            else:
                for half in (slice(0, 4), slice(4, 8)):
                    (F.mse_loss(model(x[half]), y[half]) / 2).backward()
                opt.step()
        results.append(primary_state_dict(model) | {k: v for k, v in model.state_dict().items() if AUX in k})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-7)


# -- the clip ---------------------------------------------------------------------------------------------
def explicit_aux_norm(model) -> float:
    total = 0.0
    for layer in bilora_layers(model):
        a, b, s = factors(layer, AUX)
        total += float(((s * b @ a) ** 2).sum())
    return total**0.5


def big_gradient_step(clip: str, rho: float = 0.05):
    model = attach_bilora(mlp(), linear_config(clip=clip, rho=rho))
    randomize(model, scale=0.5)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    opt = build_optimizer(model, linear_config(clip=clip, rho=rho), optimizer_cls=torch.optim.SGD, lr=1.0)
    x, y = torch.randn(16, 6) * 10, torch.randn(16, 3) * 10
    opt.step(lambda: F.mse_loss(model(x), y).backward())
    return model, before, opt


def test_aux_norm_matches_explicit_product():
    model = attach_bilora(mlp(), linear_config())
    randomize(model)
    assert aux_norm(model) == pytest.approx(explicit_aux_norm(model), rel=1e-5)


def test_global_clip_scales_every_aux_tensor_by_one_factor():
    # Reference: the same step with clip "none", then the clip by hand.
    unclipped, _, _ = big_gradient_step("none")
    clipped, before, opt = big_gradient_step("global")
    c = explicit_aux_norm(unclipped)
    assert c > 0.05
    assert aux_norm(clipped) == pytest.approx(0.05, rel=1e-5)
    assert opt.last_aux_norm == pytest.approx(0.05, rel=1e-5)
    factor = (0.05 / c) ** 0.5
    ref = unclipped.state_dict()
    for name, p in clipped.state_dict().items():
        if f".{AUX}." in name:
            torch.testing.assert_close(p, ref[name] * factor, rtol=1e-5, atol=1e-7)
        elif f".{PRIMARY}." in name:  # the primary is never touched by the clip
            torch.testing.assert_close(p, ref[name])
        else:
            assert torch.equal(p, before[name])


def test_layer_clip_bounds_each_module_and_none_does_nothing():
    model, _, _ = big_gradient_step("layer", rho=0.01)
    for layer in bilora_layers(model):
        a, b, s = factors(layer, AUX)
        assert float((s * b @ a).norm()) == pytest.approx(0.01, rel=1e-4)
    unclipped, _, _ = big_gradient_step("none", rho=0.01)
    assert aux_norm(unclipped) > 0.05


# -- closure calls and bitwise restoration --------------------------------------------------------------
@pytest.mark.parametrize(
    "method,calls", [("lora", 1), ("bilora", 1), ("dual-descent", 1), ("lora-sam", 2), ("flat-lora", 1)]
)
def test_closure_calls_per_step(method, calls):
    cfg = linear_config().for_method(method)
    model = attach_bilora(mlp(), cfg)
    randomize(model)
    opt = build_optimizer(model, cfg, method=method, lr=0.01, total_steps=4)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    counter = []

    def closure():
        counter.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert len(counter) == 3 * calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_lora_perturbs_w0_during_the_pass_and_restores_it_bitwise(dtype):
    cfg = linear_config(rho=0.5).for_method("flat-lora")
    model = attach_bilora(mlp().to(dtype), cfg)
    randomize(model)
    model.to(dtype)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    opt = build_optimizer(
        model, cfg, method="flat-lora", optimizer_cls=torch.optim.SGD, lr=0.01, total_steps=4
    )
    x, y = torch.randn(8, 6, dtype=dtype), torch.randn(8, 3, dtype=dtype)
    seen = []

    def closure():
        params = dict(model.named_parameters())
        seen.append({n: (params[n].detach() - w0[n]).float() for n in w0 if n.endswith("weight")})
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
        for n, p in model.named_parameters():
            if "base_layer" in n:
                assert torch.equal(p, w0[n]), n  # bitwise, also in bf16
    assert all(float(d.abs().max()) == 0 for d in seen[0].values())  # f_0 = 0: no noise at step 0
    # At t = 2 of T = 4, f_t = 1/2: the per-row std is f_t·rho/sqrt(n_in)·||W'_i||.
    layer = model[2]
    merged = (layer.get_base_layer().weight.float() + layer.get_delta_weight(PRIMARY).float()).detach()
    noise = seen[2]["2.base_layer.weight"]
    assert float(noise.abs().max()) > 0
    expected_sigma = 0.5 * 0.5 / merged.shape[1] ** 0.5 * merged.norm(dim=1)
    ratio = noise.std() / expected_sigma.mean()
    assert 0.3 < float(ratio) < 3.0


def test_lora_sam_equals_hand_computed_sam_step():
    cfg = linear_config(rho=0.1).for_method("lora-sam")
    model = attach_bilora(mlp(), cfg)
    randomize(model)
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # Reference SAM on the LoRA tensors: g at w, w + rho·g/||g||, g' there, w - lr·g'.
    params = [p for p in ref.parameters() if p.requires_grad]
    g = torch.autograd.grad(F.mse_loss(ref(x), y), params)
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi * 0.1 / norm)
    g2 = torch.autograd.grad(F.mse_loss(ref(x), y), params)
    with torch.no_grad():
        for p, gi, g2i in zip(params, g, g2):
            p.sub_(gi * 0.1 / norm).sub_(0.05 * g2i)
    opt = build_optimizer(model, cfg, method="lora-sam", optimizer_cls=torch.optim.SGD, lr=0.05)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        if n in w0:
            assert torch.equal(p, w0[n])


def test_two_pass_methods_refuse_step_without_closure():
    cfg = linear_config().for_method("lora-sam")
    model = attach_bilora(mlp(), cfg)
    opt = build_optimizer(model, cfg, method="lora-sam")
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_method_and_adapters_must_agree():
    model = attach_bilora(mlp(), linear_config())
    with pytest.raises(ConfigError, match="aux_rank = 0"):
        build_optimizer(model, linear_config(), method="lora")
    plain = attach_bilora(mlp(), linear_config(aux_rank=0))
    with pytest.raises(ConfigError, match="auxiliary"):
        build_optimizer(plain, linear_config(aux_rank=0), method="bilora")
    with pytest.raises(ConfigError, match="total_steps"):
        build_optimizer(plain, linear_config(aux_rank=0), method="flat-lora")


# -- aux_disabled, primary_state_dict ---------------------------------------------------------------------
def test_aux_disabled_equals_primary_only_model():
    model = attach_bilora(mlp(), linear_config())
    randomize(model)
    primary_only = attach_bilora(mlp(), linear_config(aux_rank=0))
    primary_only.load_state_dict({k: v for k, v in model.state_dict().items() if AUX not in k})
    x = torch.randn(4, 6)
    with aux_disabled(model):
        torch.testing.assert_close(model(x), primary_only(x))
    assert not torch.allclose(model(x), primary_only(x))  # restored afterwards
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # trainable again


def test_primary_state_dict_has_no_auxiliary_key():
    model = attach_bilora(mlp(), linear_config())
    state = primary_state_dict(model)
    assert sorted(state) == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    assert state["0.lora_A.weight"].shape == (2, 6)
    assert not any(AUX in k for k in state)


# -- the sign ---------------------------------------------------------------------------------------------
def test_ascent_raises_the_loss_and_descent_lowers_it():
    """With lr only on one group at a time, the auxiliary step raises the loss and the primary one lowers it."""
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for role, direction in (("aux", 1), ("primary", -1)):
        model = attach_bilora(mlp(), linear_config(clip="none"))
        randomize(model, scale=0.2)
        opt = build_optimizer(model, linear_config(clip="none"), optimizer_cls=torch.optim.SGD, lr=1e-2)
        for group in opt.param_groups:
            if group["bilora_role"] != role:
                group["lr"] = 0.0
        before = float(F.mse_loss(model(x), y))
        opt.step(lambda: F.mse_loss(model(x), y).backward())
        after = float(F.mse_loss(model(x), y))
        assert (after - before) * direction > 0, (role, before, after)


# -- integration with the ecosystem ----------------------------------------------------------------------
def test_optimizer_is_a_torch_optimizer_for_schedulers_and_state_dicts():
    cfg = linear_config(aux_lr=3e-3)
    model = attach_bilora(mlp(), cfg)
    opt = build_optimizer(model, cfg, lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    roles = {g["bilora_role"]: g for g in opt.param_groups}
    assert roles["aux"]["lr"] == 3e-3 and roles["aux"]["maximize"] and roles["aux"]["weight_decay"] == 0.0
    assert roles["primary"]["weight_decay"] == 0.1 and not roles["primary"].get("maximize", False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    opt.step(lambda: F.mse_loss(model(x), y).backward())
    sched.step()
    assert roles["primary"]["lr"] == pytest.approx(5e-3)
    # state_dict round trip continues identically
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone, cfg, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.step_count == opt.step_count == 1
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        o.step(lambda m=m: F.mse_loss(m(x), y).backward())
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_optimizer_without_native_maximize_negates_gradients():
    """An inner optimizer without `maximize` (like bitsandbytes' 8-bit Adam) still ascends on the aux group."""

    class PlainSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(group["lr"] * p.grad)

    results = []
    for cls in (torch.optim.SGD, PlainSGD):
        model = attach_bilora(mlp(), linear_config(clip="none"))
        randomize(model)
        opt = build_optimizer(model, linear_config(clip="none"), optimizer_cls=cls, lr=0.05)
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        opt.step(lambda m=model: F.mse_loss(m(x), y).backward())
        results.append(list(model.state_dict().values()))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("flat", [True, False])
def test_separate_gradient_clipping_per_group(flat):
    """max_grad_norm clips each role's gradient on its own: with SGD (lr 0.5) each role moves by exactly
    lr * max_grad_norm, whichever of the two update paths runs."""
    cfg = linear_config(clip="none")
    model = attach_bilora(mlp(), cfg)
    randomize(model)
    opt = build_optimizer(model, cfg, optimizer_cls=torch.optim.SGD, lr=0.5, max_grad_norm=1e-3, flat=flat)
    assert opt.flat is flat
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x, y = torch.randn(8, 6) * 5, torch.randn(8, 3) * 5
    opt.step(lambda: F.mse_loss(model(x), y).backward())
    for role, branch in (("primary", PRIMARY), ("aux", AUX)):
        moves = [(t - before[n]).norm() for n, t in model.state_dict().items() if f".{branch}." in n]
        moved = torch.linalg.vector_norm(torch.stack(moves))
        # each role clipped to the bound on its own
        assert float(moved) == pytest.approx(0.5 * 1e-3, rel=1e-3)
        assert opt.last_grad_norms[role] > 1e-3
