"""Sharded training (FSDP2, `bilora_diffusion.sharding`): two CPU processes (gloo) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilora_diffusion.config import METHODS
from bilora_diffusion.testing import torchrun
from tests.unit.test_sharding import fake_accelerator

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sharded_step_equals_one_process_for_every_method(tmp_path):
    """Every method, float64, on a layout where the shards are uneven and rank 1 holds no rows of the head's
    B: the parameters, gradient norms, loss and aux norm after each step equal one process's on the whole
    batch; the clip holds globally (every rank computes the same c <= rho); the gathered optimizer state is
    the one-process state, and a fresh sharded optimizer that loads it takes the one-process next step."""
    proc = torchrun(ROOT / "tests" / "e2e" / "fsdp_core.py", str(tmp_path), *METHODS, port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads((tmp_path / "fsdp_core.json").read_text())
    whole = reports.pop("_whole_after_forward")  # saving after a forward that left bf16 copies gathered
    assert whole == {"dtypes": ["torch.float32"], "diff": 0.0}
    assert set(reports) == set(METHODS)
    for method, ranks in reports.items():
        assert ranks[1]["local_numels"]["block.head.lora_B.default.weight"] == 0  # an empty shard
        placements = ranks[0]["a_placements"]  # both Gram paths: partial sums, and the gathered A
        assert placements["block.proj.lora_A.default.weight"] == "S(1)"
        assert placements["block.head.lora_A.default.weight"] == "S(0)"
        for r in ranks:
            assert r["params"] < 1e-12, method
            assert r["grad_norms"] < 1e-12 and r["losses"] < 1e-12, method
            assert r["state"] < 1e-12 and r["state_entries"][0] == r["state_entries"][1], method
            assert r["resumed_params"] < 1e-12, method
            for sharded, reference in r["aux_norm"]:
                assert sharded == pytest.approx(reference, abs=1e-12)
                assert sharded <= 0.05 + 1e-12
        if method in ("bilora", "dual-descent"):
            assert ranks[0]["aux_norm"][-1][0] == pytest.approx(0.05)  # the clip engaged
            assert ranks[0]["aux_norm"] == ranks[1]["aux_norm"]


# -- the trainers under FSDP ----------------------------------------------------------------------------------
from safetensors.torch import load_file  # noqa: E402

from bilora_diffusion.state import STATE_FILE, read_bilora_state  # noqa: E402
from bilora_diffusion.testing import save_tiny_llama  # noqa: E402

SUMS = [(2, 3), (4, 5), (10, 7), (1, 1), (6, 2), (3, 9), (8, 8), (5, 1)]


@pytest.fixture(scope="module")
def llm_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-llm")
    rows = [{"prompt": f"what is {a} plus {b} ?", "response": f"{a} plus {b} gives {a + b}"} for a, b in SUMS]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny_llama(root / "model"), root / "sums.jsonl"


def llm_args(setup, out, *extra) -> list[str]:
    model, data = setup
    return [
        "--model", str(model), "--dataset", str(data), "--output_dir", str(out), "--report_to", "none",
        "--learning_rate", "1e-2", "--max_train_steps", "6", "--checkpointing_steps", "3", "--seed", "1",
        "--max_grad_norm", "0.5", *extra,
    ]  # fmt: skip


def one_process(args: list[str], *, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train_llm.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def adapters(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def aux_norm_of(folder: Path, rho: float) -> float:
    tensors, configs, _ = read_bilora_state(folder / STATE_FILE)
    aux = tensors["model"]["bilora_aux"]
    scale = configs["model"].aux_alpha / configs["model"].aux_rank
    sq = 0.0
    for key, a in aux.items():
        if ".lora_A." in key:
            b = aux[key.replace(".lora_A.", ".lora_B.")]
            sq += float((scale * b.double() @ a.double()).square().sum())
    return sq**0.5


@pytest.mark.slow
def test_llm_fsdp_two_processes_equal_one_process_and_resume(llm_setup, tmp_path):
    """train_llm.py: two sharded processes (torchrun, --fsdp, with gradient checkpointing, which recomputes
    through FSDP's gathers) give the adapters of one process with the same global batch; the run log names FSDP; the aux clip holds globally. A run killed (-9) after its checkpoint
    resumes, sharded optimizer state, to the uninterrupted run's adapters; the whole-state checkpoint of a
    sharded run resumes in ONE process and also ends there."""
    single = one_process(
        llm_args(llm_setup, tmp_path / "one", "--train_batch_size", "2", "--gradient_accumulation_steps", "2")
    )
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun(
        ROOT / "train_llm.py",
        *llm_args(
            llm_setup, tmp_path / "fsdp", "--train_batch_size", "2", "--fsdp", "--gradient_checkpointing"
        ),
        port=29542,
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "distributed: FSDP2 (fully_shard) over 2 processes" in sharded.stderr
    reference = adapters(tmp_path / "one")
    # Not bitwise (DDP is, here): the Gram matrices and gradient norms are sums of per-rank pieces, so their
    # last bits differ, and AdamW turns last-bit changes of near-zero gradient entries into up to ~1e-4 after
    # six steps at lr 1e-2 (values ~0.2). A wrong clip or a missing reduction moves entries by ~lr. The exact
    # (float64, 1e-16) agreement of every method is test_sharded_step_equals_one_process_for_every_method.
    assert_close(adapters(tmp_path / "fsdp"), reference, atol=2e-4)
    assert aux_norm_of(tmp_path / "fsdp", 0.05) == pytest.approx(
        aux_norm_of(tmp_path / "one", 0.05), rel=1e-4
    )
    assert aux_norm_of(tmp_path / "fsdp", 0.05) <= 0.05 * (1 + 1e-5)

    # kill -9 right after step 4 (checkpoint-3 written with per-rank optimizer shards), then resume
    killed_args = llm_args(
        llm_setup, tmp_path / "killed", "--train_batch_size", "2", "--fsdp", "--fsdp_state_dict", "sharded"
    )
    env_fault = {"FAULT_TRAINER": "llm"}
    os.environ.update(env_fault)
    try:
        killed = torchrun(ROOT / "tests" / "e2e" / "fault_run.py", "step", "4", *killed_args, port=29543)
    finally:
        os.environ.pop("FAULT_TRAINER")
    assert killed.returncode != 0
    ckpt = tmp_path / "killed" / "checkpoint-3"
    assert sorted(p.name for p in ckpt.glob("optimizer*")) == [
        "optimizer-rank0-of-2.pt",
        "optimizer-rank1-of-2.pt",
    ]
    resumed = torchrun(ROOT / "train_llm.py", *killed_args, "--resume_from_checkpoint", "latest", port=29544)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(adapters(tmp_path / "killed"), adapters(tmp_path / "fsdp"), atol=1e-6)

    # the sharded run's whole-state checkpoint, resumed in one process
    one = one_process(
        llm_args(
            llm_setup, tmp_path / "fsdp", "--train_batch_size", "2", "--gradient_accumulation_steps", "2"
        )
        + [
            "--resume_from_checkpoint",
            str(tmp_path / "fsdp" / "checkpoint-3"),
            "--output_dir",
            str(tmp_path / "back"),
        ]
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert_close(adapters(tmp_path / "back"), reference, atol=2e-4)
    # a sharded optimizer state refuses another number of processes, naming both
    refused = one_process(
        llm_args(
            llm_setup,
            tmp_path / "killed",
            "--train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--resume_from_checkpoint",
            str(ckpt),
        )
    )
    assert refused.returncode == 2 and "sharded over 2 processes, this run has 1" in refused.stderr


@pytest.mark.slow
def test_sdxl_fsdp_two_processes_equal_one_process(tiny_sdxl_dir, image_folder, tmp_path):
    """train_sdxl.py --fsdp on two processes (UNet and both text encoders sharded) exports the diffusers and
    kohya LoRA files of one process with the same global batch (batch 1 x 2 accumulation)."""
    common = [
        "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset", str(image_folder), "--resolution", "64",
        "--train_batch_size", "1", "--max_train_steps", "3", "--report_to", "none", "--learning_rate", "1e-3",
        "--save_dtype", "fp32", "--rho", "0.01", "--train_text_encoder",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(ROOT / "train_sdxl.py"), *common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun(
        ROOT / "train_sdxl.py", *common, "--fsdp", "--output_dir", str(tmp_path / "fsdp"), port=29545
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "distributed: FSDP2 (fully_shard) over 2 processes" in sharded.stderr
    for name in ("pytorch_lora_weights.safetensors", "bilora_sdxl.safetensors"):
        a, b = load_file(str(tmp_path / "fsdp" / name)), load_file(str(tmp_path / "one" / name))
        assert any("text_encoder" in k or "lora_te" in k for k in a)
        assert_close(a, b, atol=1e-5)


# -- what FSDP refuses, in one line ----------------------------------------------------------------------------

from accelerate.utils import DistributedType  # noqa: E402

from bilora_diffusion.options import OptionError, parse_options  # noqa: E402
from bilora_diffusion.sdxl.options import SDXLOptions  # noqa: E402
from bilora_diffusion.training import distributed_mode  # noqa: E402


def test_fsdp_refuses_validation_sampling_and_one_process_from_the_command_line(tiny_sdxl_dir, image_folder):
    """Through the real entry point: exit 2, one line naming the option, before any model loads."""
    sdxl = parse_options(
        SDXLOptions, ["--dataset", str(image_folder), "--fsdp", "--validation_prompt", "a cat"]
    )
    with pytest.raises(OptionError, match="--validation_prompt under FSDP"):
        distributed_mode(sdxl, fake_accelerator(DistributedType.MULTI_CPU))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--pretrained_model_name_or_path", str(tiny_sdxl_dir)]
    proc = subprocess.run(
        [*cmd, "--dataset", str(image_folder), "--fsdp", "--report_to", "none"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --fsdp shards over several processes")


@pytest.mark.slow
def test_a_nan_loss_on_one_process_skips_the_step_on_every_process(llm_setup, tmp_path):
    """A non-finite loss on rank 1 only (DDP and FSDP): every process skips that step together instead of the
    others waiting forever in the gradient reduction; the run finishes with finite adapters."""
    os.environ["FAULT_TRAINER"] = "llm"
    try:
        for mode, port in ((["--fsdp"], 29546), ([], 29547)):
            out = tmp_path / ("fsdp" if mode else "ddp")
            args = llm_args(llm_setup, out, "--train_batch_size", "2", *mode)
            script = ROOT / "tests" / "e2e" / "fault_run.py"
            proc = torchrun(script, "nan", "2", *args, port=port, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "step 1 skipped: non-finite loss" in proc.stderr
            assert all(torch.isfinite(t).all() for t in adapters(out).values())
    finally:
        os.environ.pop("FAULT_TRAINER")
