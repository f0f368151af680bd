"""The benchmark measures: filter normalization, sharpness, the landscape tool, the generalization machinery."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bilora_diffusion import attach_bilora
from bilora_diffusion.config import PRIMARY, BiLoRAConfig
from bilora_diffusion.peft_glue import lora_pair
from bilora_diffusion.sdxl.landscape import (
    adapted_layers,
    curve_1d,
    filter_normalize,
    merged_weight,
    random_direction,
    sharpness,
)

ROOT = Path(__file__).resolve().parents[2]


def tiny_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 2-layer MLP with Bi-LoRA on both Linear layers, B1 moved off zero, and data it fits exactly
    (targets = its own outputs), so W' is a minimum of the loss."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    attach_bilora(model, BiLoRAConfig(rank=2, alpha=4.0, target_modules=["0", "2"], fused=False))
    with torch.no_grad():
        for layer in adapted_layers({"m": model}).values():
            lora_pair(layer, PRIMARY).B_param.normal_(0, 0.1)
    x = torch.randn(32, 8)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def mlp_loss(model, x, y):
    def loss() -> float:
        with torch.no_grad():
            return float(((model(x) - y) ** 2).mean())

    return loss


def test_filter_normalize_matches_hand_computation():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1
    d = torch.tensor([[1.0, 0.0], [2.0, 2.0]])  # row norms 1 and 2·sqrt(2)
    expected = torch.tensor([[5.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    assert torch.allclose(filter_normalize(d, w), expected, atol=1e-6)
    # a conv weight [out, in, kh, kw]: one filter per output channel
    wc, dc = w.reshape(2, 1, 1, 2), d.reshape(2, 1, 1, 2)
    assert torch.allclose(filter_normalize(dc, wc), expected.reshape(2, 1, 1, 2), atol=1e-6)


def test_full_direction_is_filter_normalized_against_the_merged_weight_of_one_layer():
    model, _, _ = tiny_mlp()
    layers = adapted_layers({"m": model})
    first = next(iter(layers.values()))
    pair = lora_pair(first, PRIMARY)
    # by hand: W' = W0 + s·B·A, d = N(0, I) from the seed, d_i <- d_i · ||W'_i|| / ||d_i||
    w_merged = first.get_base_layer().weight + pair.scale * pair.B @ pair.A
    assert torch.allclose(merged_weight(first), w_merged, atol=1e-6)
    raw = torch.randn(w_merged.shape, generator=torch.Generator().manual_seed(5))
    by_hand = torch.stack([raw[i] * w_merged[i].norm() / raw[i].norm() for i in range(raw.shape[0])])
    direction = random_direction(layers, "full", seed=5)
    assert direction.targets[0] is first.get_base_layer().weight
    assert torch.allclose(direction.deltas[0], by_hand.detach(), atol=1e-5)
    assert torch.allclose(direction.deltas[0].norm(dim=1), w_merged.norm(dim=1).detach(), rtol=1e-5)


def test_sharpness_is_zero_at_radius_zero_grows_with_radius_and_restores_weights():
    model, x, y = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = adapted_layers({"m": model})
    result = sharpness(mlp_loss(model, x, y), layers, [0.0, 0.05, 0.2, 0.5], n_directions=3, seed=1)
    mean = result["mean"]
    assert result["increase"]["0.0"] == [0.0, 0.0, 0.0]  # exactly: the weights are restored bitwise
    assert 0.0 < mean["0.05"] < mean["0.2"] < mean["0.5"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_curve_at_zero_equals_the_unperturbed_loss_in_both_spaces():
    model, x, y = tiny_mlp()
    with torch.no_grad():
        y = y + 0.1 * torch.randn_like(y)  # away from the minimum: a non-zero loss
    loss = mlp_loss(model, x, y)
    layers = adapted_layers({"m": model})
    for space in ("full", "lora"):
        curve = curve_1d(loss, random_direction(layers, space, seed=3), [-0.3, 0.0, 0.3])
        assert curve[1] == loss()
        assert curve[0] != curve[1] and curve[2] != curve[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_options_keep_their_argparse_spellings():
    """Both benchmarks read the flags their argparse parsers took, through the typed parser: lists in a row,
    --unet_widths 160,320,320, --no-gradient_checkpointing (argparse's BooleanOptionalAction), choices."""
    from bilora_diffusion.errors import OptionError
    from bilora_diffusion.options import parse_options

    step_cost = _load("step_cost")
    argv = "--model sdxl --variants bilora lora-peft --unet_widths 160,320,320 --quick --device cpu".split()
    o = parse_options(step_cost.StepCostOptions, argv).resolve()
    assert (o.variants, o.widths, o.gradient_checkpointing) == (
        ["lora", "bilora", "lora-peft"],
        (160, 320, 320),
        True,
    )
    assert (o.steps, o.warmup, o.threads, o.dtype, o.resolution) == (6, 2, 1, "float32", 1024)
    o = parse_options(step_cost.StepCostOptions, [*argv, "--no-gradient_checkpointing"]).resolve()
    assert o.gradient_checkpointing is False
    for bad in (["--variants", "nope"], ["--unet_widths", "a,b"], ["--model", "sd15"]):
        with pytest.raises(OptionError, match=bad[0]):
            parse_options(step_cost.StepCostOptions, bad)

    generalization = _load("generalization")
    argv = "--quick --methods lora bilora --rho bilora=0.01 lora-sam=0.05 --aux_lr_grid 0.01 --aux_lr_factors 1 3"
    s = generalization.settings_from(parse_options(generalization.GeneralizationOptions, argv.split()))
    assert s.methods == ["lora", "bilora"] and (s.rho["bilora"], s.rho["lora-sam"]) == (0.01, 0.05)
    assert list(s.grid) == ["bilora rho=0.01 aux_lr 1x", "bilora rho=0.01 aux_lr 3x"]
    for bad in (["--methods", "nope"], ["--rho", "0.01"]):
        with pytest.raises(OptionError, match=bad[0]):
            parse_options(generalization.GeneralizationOptions, bad)


def test_fsdp_memory_counts_llama_31_8b_by_hand():
    """benchmarks/fsdp_memory.py's parameter counts (the README's FSDP memory table) equal Llama-3.1-8B's, worked
    out by hand: base = embeddings + head + 32 layers (attention 4096·(4096+1024+1024+4096), MLP 3·4096·14336,
    two norms) + final norm; adapters = 2 branches · rank 8 · 32 layers · sum of (in + out) of the 7 projections."""
    import yaml
    from transformers import LlamaConfig

    spec = importlib.util.spec_from_file_location("fsdp_memory", ROOT / "benchmarks" / "fsdp_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fsdp_memory"] = module
    spec.loader.exec_module(module)
    preset = yaml.safe_load((ROOT / "configs" / "llm_llama31_8b_instruct.yaml").read_text())
    counts = module.counts(LlamaConfig(**module.LLAMA_31_8B), preset)
    layer = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
    assert counts["largest_block"] == layer
    assert counts["base"] == 2 * 128256 * 4096 + 32 * layer + 4096
    in_out = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336)
    assert counts["adapters"] == 2 * 8 * 32 * in_out
    table = module.table(counts, [8])
    assert "| FSDP | 8 | 1.87 GiB |" in table
