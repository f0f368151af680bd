"""Users' PEFT habits keep working after `attach_bilora` and `build_optimizer` (the adapters are PEFT's own
tensors; the optimizer owns no model storage)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from bilora_diffusion import AUX, PRIMARY, BiLoRAConfig, attach_bilora, build_optimizer

CONFIG = BiLoRAConfig(rank=2, alpha=3.0, aux_rank=3, aux_alpha=5.0, target_modules=["0", "2", "4"])


def trained(
    steps: int = 2, seed: int = 0, flat: bool | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = attach_bilora(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)), CONFIG
    )
    opt = build_optimizer(model, CONFIG, lr=1e-2, flat=flat)
    run(model, opt, steps, seed)
    return model, opt


def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen, dtype=next(model.parameters()).dtype), None
        y = torch.randn(8, 3, generator=gen).to(x.dtype)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("flat", [True, False])
def test_named_trainable_parameters_are_the_adapters_and_save_with_safetensors(tmp_path, flat):
    model, _ = trained(flat=flat)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n for n in model.state_dict() if "lora_" in n}
    save_file({n: p.detach() for n, p in trainable.items()}, tmp_path / "adapters.safetensors")
    loaded = load_file(tmp_path / "adapters.safetensors")
    for name, value in model.state_dict().items():
        if "lora_" in name:
            assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("flat", [True, False])
def test_no_model_tensor_aliases_optimizer_storage_and_state_dicts_hold_only_the_model(flat):
    model, opt = trained(flat=flat)
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned = [t for group in opt.inner.param_groups for t in group["params"]]
    owned += [v for state in opt.inner.state.values() for v in state.values() if torch.is_tensor(v)]
    if flat:
        assert not model_storages & {t.untyped_storage().data_ptr() for t in owned}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert buffer.getbuffer().nbytes < nbytes + 20_000  # the tensors and pickle overhead, no foreign storage


@pytest.mark.parametrize("flat", [True, False])
def test_deepcopy_is_independent_and_two_models_never_touch_each_other(flat):
    model, opt = trained(flat=flat)
    clone = copy.deepcopy(model)
    before = adapters(clone)
    run(model, opt, 2, seed=1)  # training the original leaves the copy alone
    assert all(torch.equal(v, adapters(clone)[n]) for n, v in before.items())
    other, other_opt = trained(seed=3, flat=flat)  # a second model with its own optimizer
    mine, theirs = adapters(model), adapters(other)
    run(clone, build_optimizer(clone, CONFIG, lr=1e-2, flat=flat), 2, seed=2)
    run(other, other_opt, 1, seed=4)
    assert all(torch.equal(v, adapters(model)[n]) for n, v in mine.items())
    assert not torch.equal(adapters(other)["0.lora_A.default.weight"], theirs["0.lora_A.default.weight"])
    assert not torch.equal(adapters(clone)["0.lora_A.default.weight"], before["0.lora_A.default.weight"])


def test_peft_and_diffusers_state_dict_functions_return_the_current_values():
    model, opt = trained()
    first = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=PRIMARY).items()}
    run(model, opt, 1, seed=5)
    now = get_peft_model_state_dict(model, adapter_name=PRIMARY)
    assert now.keys() == first.keys() and not any(AUX in k for k in now)
    current = model.state_dict()
    for key, value in now.items():
        assert torch.equal(value, current[key.replace(".weight", f".{PRIMARY}.weight")]), key
    assert not torch.equal(now["0.lora_A.weight"], first["0.lora_A.weight"])
    # What diffusers' training scripts save: PEFT's state dict in diffusers' key names.
    converted = convert_state_dict_to_diffusers(now)
    assert sorted(v.sum().item() for v in converted.values()) == sorted(v.sum().item() for v in now.values())


@pytest.mark.parametrize("flat", [True, False])
def test_a_cast_after_building_trains_the_models_real_tensors(flat):
    model, opt = trained(flat=flat)
    model.double()
    before = adapters(model)
    run(model, opt, 2, seed=6)
    after = adapters(model)
    assert all(v.dtype == torch.float64 for v in after.values())
    assert all(not torch.equal(after[n], v) for n, v in before.items() if ".lora_A." in n)
