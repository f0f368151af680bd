"""The benchmarks end to end on tiny models: the generalization machinery with the landscape tool, and step_cost's variants."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("generalization", ROOT / "benchmarks" / "generalization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.mark.slow
def test_generalization_quick_machinery_and_landscape_tool_on_a_tiny_model(
    tiny_sdxl_dir, tmp_path, one_thread
):
    bench = _load_benchmark()
    out = tmp_path / "results"
    argv = ["--quick", "--model", tiny_sdxl_dir, "--steps", "2", "--methods", "lora", "bilora"]
    argv += ["--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1", "--tag", "test"]
    report = bench.main(argv)
    assert [(r["method"], r["passes"]) for r in report["runs"]] == [("lora", 2), ("bilora", 2)]
    for run in report["runs"]:
        assert set(run["loss"]) == {"train", "unseen", "taught", "held_in"}
        assert set(run["adherence"]) == {"unseen", "taught", "held_in"}
        assert run["sharpness"]["increase"] and all(math.isfinite(v) for v in run["loss"].values())
    assert run["aux_norm"] > 0  # bilora's auxiliary branch moved
    for suffix in (".json", ".md", ".png"):
        assert (out / f"generalization_test{suffix}").is_file()
    assert "| lora (n=1) | 2 | 2 |" in (out / "generalization_test.md").read_text()

    # the landscape tool on one of those training outputs: alpha = 0 gives the unperturbed loss
    from bilora_diffusion.sdxl import landscape

    trained = tmp_path / "work" / "runs" / "bilora-s0"
    png = tmp_path / "land.png"
    results = landscape.main(
        ["--output_dir", str(trained), "--points", "3", "--n_directions", "1", "--out", str(png)]
    )
    (entry,) = results.values()
    for space in ("full", "lora"):
        assert entry[space]["alphas"][1] == 0.0
        assert entry[space]["curves"][0][1] == entry["base_loss"]
    assert png.is_file() and json.loads(png.with_suffix(".json").read_text())


@pytest.mark.slow
def test_step_cost_runs_the_variants_it_names(tmp_path):
    """The step-cost benchmark's code path on the small SDXL topology (one measured round; no timing is
    asserted): each variant runs the forward it names, the flat update is the default, lora is its own
    reference, and bilora trains twice lora's adapter parameters at equal primary rank."""
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    step_cost = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = step_cost  # dataclasses look their module up there
    spec.loader.exec_module(step_cost)
    stem = tmp_path / "sc"
    argv = "--variants lora bilora bilora-unfused lora-peft --steps 1 --warmup 0".split()
    threads = torch.get_num_threads()  # the benchmark sets 1; later tests' bitwise checks need the default
    try:
        result = step_cost.main([*argv, "--no_memory", "--resolution", "64", "--out", str(stem)])
    finally:
        torch.set_num_threads(threads)
    variants = result["variants"]
    assert json.loads((tmp_path / "sc.json").read_text())["variants"].keys() == variants.keys()
    assert (tmp_path / "sc.png").stat().st_size > 0
    assert variants["lora"]["time_ratio_paired"] == 1.0
    assert variants["lora-peft"]["fused_layers"] == 0 and variants["bilora-unfused"]["fused_layers"] == 0
    assert variants["bilora"]["fused_layers"] == variants["lora"]["fused_layers"] == 560
    assert variants["bilora"]["trainable_params"] == 2 * variants["lora"]["trainable_params"]
    assert result["per_tensor_update"] is False
