"""Packed storage (`bilora_diffusion.packed`): PEFT's tensors are views of one [A1; A2] and one [B1, B2] leaf per
Linear layer; state dicts, loads, gradients, casts and copies behave as with PEFT's own tensors; the flat
update reads the packed tensors block by block."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_core import linear_config, mlp, randomize
from test_fused import twin_models

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora, bilora_layers, build_optimizer
from bilora_diffusion.methods import FLAT_KEY, _FlatGroup
from bilora_diffusion.packed import PACKED_A, PACKED_B, is_packed, sync
from bilora_diffusion.training import cast_trainable_to_fp32


def peft_tensors(layer) -> list[torch.Tensor]:
    return [m[name].weight for name in (PRIMARY, AUX) for m in (layer.lora_A, layer.lora_B)]


def assert_aliased(model) -> None:
    """PEFT's A1, B1, A2, B2 are the packed tensors' rows and columns, in place."""
    for layer in bilora_layers(model):
        pa, pb = layer._parameters[PACKED_A], layer._parameters[PACKED_B]
        a1, b1, a2, b2 = peft_tensors(layer)
        r1 = a1.shape[0]
        assert a1.data_ptr() == pa.data_ptr() and a2.data_ptr() == pa[r1:].data_ptr()
        assert b1.data_ptr() == pb.data_ptr() and b2.data_ptr() == pb[:, r1:].data_ptr()
        assert torch.equal(pa, torch.cat([a1, a2])) and torch.equal(pb, torch.cat([b1, b2], 1))
        assert pa.requires_grad and pb.requires_grad and not a1.requires_grad


def test_linear_layers_are_packed_and_their_state_dict_is_peft_format(tmp_path):
    reference, packed = twin_models(mlp, linear_config())
    assert all(is_packed(layer) for layer in bilora_layers(packed))
    assert_aliased(packed)
    state = packed.state_dict()
    assert state.keys() == reference.state_dict().keys()  # no packed key
    storages = {t.untyped_storage().data_ptr() for k, t in state.items() if "lora_" in k}
    assert len(storages) == sum("lora_" in k for k in state)  # every tensor its own (contiguous) copy
    save_file(state, tmp_path / "model.safetensors")  # safetensors refuses shared or strided tensors
    fresh = attach_bilora(mlp(), linear_config(fused=False))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = torch.randn(5, 6)
    torch.testing.assert_close(fresh(x), packed(x), rtol=1e-5, atol=1e-6)
    # Loads write into the packed tensors (strict: the packed keys are not required).
    other = attach_bilora(mlp(), linear_config())
    other.load_state_dict(reference.state_dict(), strict=True)
    assert_aliased(other)
    torch.testing.assert_close(other(x), reference(x), rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_packed_tensors_and_accumulate():
    reference, packed = twin_models(mlp, linear_config())
    xs = [torch.randn(4, 6) for _ in range(2)]
    for model in (reference, packed):
        for x in xs:  # two backwards without zeroing: accumulation
            model(x).pow(2).sum().backward()
    for layer, ref in zip(bilora_layers(packed), bilora_layers(reference)):
        a1, b1, a2, b2 = peft_tensors(ref)
        assert all(
            t.grad is None for t in peft_tensors(layer)
        )  # requires_grad=False: the packed ones get them
        torch.testing.assert_close(layer._parameters[PACKED_A].grad, torch.cat([a1.grad, a2.grad]))
        torch.testing.assert_close(layer._parameters[PACKED_B].grad, torch.cat([b1.grad, b2.grad], 1))
    # The optimizer lists the trained tensors: its zero_grad clears them, GradScaler would unscale them.
    opt = build_optimizer(packed, linear_config(), lr=0.0)
    listed = {id(p) for g in opt.param_groups for p in g["params"]}
    assert listed == {id(p) for p in packed.parameters() if p.requires_grad}
    opt.zero_grad()
    assert all(p.grad is None for p in packed.parameters())


def test_views_follow_casts_copies_and_loads_that_assign():
    model = attach_bilora(mlp(), linear_config())
    randomize(model)
    x = torch.randn(3, 6)
    out = model(x).detach()
    model.to(torch.float64)  # every tensor gets storage of its own: the next use re-aliases
    cast_trainable_to_fp32(model)  # the trainers' cast: only the packed (trainable) tensors, to float32
    sync(model)
    assert_aliased(model)
    assert all(t.dtype == torch.float32 for layer in bilora_layers(model) for t in peft_tensors(layer))
    model.to(torch.float32)
    torch.testing.assert_close(model(x), out)

    clone = copy.deepcopy(model)  # a copy is aliased like its original
    assert_aliased(clone)
    with torch.no_grad():
        next(iter(bilora_layers(clone))).lora_B[AUX].weight.zero_()  # before the copy's first forward: kept
    assert not torch.allclose(clone(x), out)
    assert_aliased(clone)

    state = {k: v * 2 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # PEFT's tensors replaced by new ones: their values win
    assert_aliased(model)
    for layer in bilora_layers(model):
        assert torch.equal(
            layer._parameters[PACKED_A][: layer.lora_A[PRIMARY].weight.shape[0]], layer.lora_A[PRIMARY].weight
        )
    torch.testing.assert_close(
        model.state_dict()["0.lora_A.default.weight"], state["0.lora_A.default.weight"]
    )


def test_per_tensor_optimizers_get_peft_tensors_of_their_own():
    model = attach_bilora(mlp(), linear_config())
    build_optimizer(model, linear_config(), flat=False)
    assert not any(is_packed(m) for m in model.modules())
    for layer in bilora_layers(model):
        assert all(t.requires_grad and t.is_contiguous() for t in peft_tensors(layer))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in model.state_dict() if "lora_" in n
    }


def test_flat_update_moves_packed_blocks_with_strided_copies_and_matches_peft():
    """Attention-only targets: every group of the flat update reads the packed tensors block by block; several
    AdamW steps (global clip engaged, r1 != r2, s1 != s2) equal the two-adapter path's."""
    from bilora_diffusion.sdxl.tiny import tiny_sdxl_components

    config = BiLoRAConfig(rank=2, alpha=3, aux_rank=3, aux_alpha=2, rho=0.01, target_modules=["to_q", "to_k"])
    build = lambda: tiny_sdxl_components("dummy", seed=0)["unet"].to(torch.float64)  # noqa: E731
    reference, packed = twin_models(build, config, scale=0.1)
    from test_fused import unet_loss

    opts = [build_optimizer(m, config, lr=1e-3, max_grad_norm=1.0) for m in (reference, packed)]
    assert [fg.recipes is not None for fg in opts[1]._flat] == [True, True]
    assert [fg.span is not None for fg in opts[0]._flat] == [True, True]
    for _ in range(3):
        for model, opt in zip((reference, packed), opts):
            opt.zero_grad()
            opt.step(lambda model=model: unet_loss(model, torch.float64).backward())
        assert opts[1].last_aux_norm == pytest.approx(opts[0].last_aux_norm, rel=1e-9)
    assert opts[1].last_aux_norm == pytest.approx(config.rho)
    ref_state = reference.state_dict()
    for name, value in packed.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-9, atol=1e-12, msg=name)
    assert_aliased(packed)


def test_flat_state_of_the_earlier_primary_layout_still_loads():
    """Optimizer state saved before the primary group was laid out in blocks (parameter order) resumes."""
    config = linear_config(target_modules=["0", "2", "4"])
    x, y = torch.randn(8, 6), torch.randn(8, 3)

    def deep_mlp() -> torch.nn.Module:  # two layers of one shape: blocks reorder the primary group
        torch.manual_seed(0)
        layers = [torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(6, 3))

    models = [attach_bilora(deep_mlp(), config) for _ in range(2)]
    randomize(models[0])
    models[1].load_state_dict(models[0].state_dict())
    opt = build_optimizer(models[0], config, lr=1e-2)
    opt.step(lambda: F.mse_loss(models[0](x), y).backward())
    saved = copy.deepcopy(opt.state_dict())
    primary = opt._flat[0]
    older = _FlatGroup(list(opt._group_params[0]))  # the earlier layout: parameter order
    assert older.layout != primary.layout
    saved["state"][0] = older.state_from_tensors(primary.state_to_tensors(saved["state"][0]))
    saved["param_groups"][0][FLAT_KEY] = older.layout
    other = build_optimizer(models[1], config, lr=1e-2)
    other.load_state_dict(saved)
    for key, value in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(other.state_dict()["state"][0][key], value)


def _steps(model, opt, x, n=2) -> dict[str, torch.Tensor]:
    for _ in range(n):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("change", ["disable", "enable", "other model"])
def test_packing_changed_after_the_optimizer_was_built(change):
    """Packing or unpacking after build_optimizer (or another model being packed) is followed from the next
    step on: the steps equal those of a model that never changed."""
    from bilora_diffusion.fused import disable_fused, enable_fused

    x = torch.randn(4, 6)
    reference = attach_bilora(mlp(), linear_config(fused=False))
    randomize(reference)
    want = _steps(reference, build_optimizer(reference, linear_config(), lr=1e-2), x)
    model = attach_bilora(mlp(), linear_config(fused=change != "enable"))
    randomize(model)
    opt = build_optimizer(model, linear_config(), lr=1e-2)
    if change == "disable":
        disable_fused(model)
    elif change == "enable":
        enable_fused(model)
        assert all(is_packed(layer) for layer in bilora_layers(model))
    else:
        attach_bilora(mlp(), linear_config())
    got = _steps(model, opt, x)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_models_of_different_dtypes_in_one_optimizer_keep_theirs():
    """(No auxiliary clip: the global one couples the models, which is the point of it, not of this test.)"""
    x = torch.randn(4, 6)
    config = linear_config(clip="none")
    models = [attach_bilora(mlp(), config) for _ in range(2)]
    for m in models:
        randomize(m)
    models[1].to(torch.float64)
    references = [copy.deepcopy(m) for m in models]
    opt = build_optimizer(models, config, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (models[0](x).pow(2).sum() + models[1](x.double()).pow(2).sum()).backward()
        opt.step()
    assert {p.dtype for p in models[1].parameters() if p.requires_grad} == {torch.float64}
    for model, ref in zip(models, references):  # each model alone takes the same steps
        want = _steps(ref, build_optimizer(ref, config, lr=1e-2), x.to(ref[0].weight.dtype))
        for name, value in want.items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_layers_are_not_packed_and_train():
    """With dropout the fused forward steps aside in training (each branch draws its own mask): such layers keep
    PEFT's own tensors, which get gradients."""
    model = attach_bilora(mlp(), linear_config(dropout=0.1))
    randomize(model)
    assert not any(is_packed(m) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, linear_config(dropout=0.1), optimizer_cls=torch.optim.SGD, lr=1e-2)
    _steps(model, opt, torch.randn(4, 6), n=1)
    moved = [k for k, v in model.state_dict().items() if ".lora_" in k and not torch.equal(v, before[k])]
    assert len(moved) == 8  # SGD, no weight decay: only gradients move them


def test_enable_fused_in_another_adapter_order_repacks():
    from bilora_diffusion.fused import enable_fused

    reference, packed = twin_models(mlp, linear_config())
    x = torch.randn(4, 6)
    enable_fused(packed, (AUX, PRIMARY))
    torch.testing.assert_close(packed(x), reference(x), rtol=1e-5, atol=1e-6)
    orders = {layer.__dict__["_bilora_packed"].adapters for layer in bilora_layers(packed)}
    assert orders == {(AUX, PRIMARY)}


def test_peft_set_adapter_does_not_make_the_views_trainable_for_the_optimizer():
    model = attach_bilora(mlp(), linear_config())
    for layer in bilora_layers(model):
        layer.set_adapter([PRIMARY, AUX])  # PEFT marks lora_A/lora_B trainable
    opt = build_optimizer(model, linear_config(), lr=1e-2)  # checks the views again
    assert_aliased(model)
    listed = {id(p) for g in opt.param_groups for p in g["params"]}
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}
