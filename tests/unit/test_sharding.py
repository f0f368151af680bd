"""FSDP settings in one process: which distributed mode a run gets, what it refuses, the shipped accelerate
configs, and resumed state keeps the adapters' dtype."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from bilora_diffusion import BiLoRAConfig, attach_bilora, build_optimizer
from bilora_diffusion.llm.options import LLMOptions
from bilora_diffusion.optim.state_layout import to_tensors
from bilora_diffusion.options import OptionError, parse_options
from bilora_diffusion.testing import UnevenShards as Toy
from bilora_diffusion.testing import randomize_adapters as randomize
from bilora_diffusion.training import distributed_mode

ROOT = Path(__file__).resolve().parents[2]


def test_resumed_state_keeps_the_adapters_dtype():
    """Optimizer state loaded before the first step keeps float64 (it was cast to float32 on the way in,
    losing ~1e-9 per step of exactness); the resumed step equals the uninterrupted one bitwise."""
    torch.manual_seed(0)
    config = BiLoRAConfig(
        rank=1, alpha=3.0, aux_rank=2, aux_alpha=5.0, target_modules=["conv", "proj", "head"]
    )
    model = attach_bilora(Toy().double(), config)
    randomize(model)
    kwargs = dict(method="bilora", lr=0.05, max_grad_norm=0.5, weight_decay=0.01)
    opt = build_optimizer(model, config, **kwargs)
    x, y = torch.randn(4, 4, 6, 6).double(), torch.randn(4, 1).double()

    def step(m, o):
        o.zero_grad()
        o.step(lambda: F.mse_loss(m(x), y).backward())

    for _ in range(3):
        step(model, opt)
    resumed = copy.deepcopy(model)
    opt2 = build_optimizer(resumed, config, **kwargs)
    opt2.load_state_dict(to_tensors(opt.state_dict(), opt._flat, opt._group_params))
    step(model, opt)
    step(resumed, opt2)
    assert all(
        v.dtype == torch.float64
        for st in opt2.state_dict()["state"].values()
        for k, v in st.items()
        if k != "step"
    )
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def llm_options(*extra):
    return parse_options(LLMOptions, ["--model", "m", "--dataset", "d.jsonl", *extra])


@pytest.mark.parametrize(
    "kind, processes, argv, mode",
    [
        (DistributedType.NO, 1, [], "single"),
        (DistributedType.MULTI_CPU, 2, [], "ddp"),
        (DistributedType.MULTI_GPU, 2, [], "ddp"),
        (DistributedType.MULTI_CPU, 2, ["--fsdp"], "fsdp"),
        (DistributedType.FSDP, 2, [], "fsdp"),  # accelerate's FSDP config: sharded without --fsdp
        (DistributedType.FSDP, 2, ["--optimizer", "sgd"], "fsdp"),
    ],
)
def test_distributed_mode(kind, processes, argv, mode):
    assert distributed_mode(llm_options(*argv), fake_accelerator(kind, processes)) == mode


@pytest.mark.parametrize(
    "kind, processes, argv, version, message",
    [
        (DistributedType.DEEPSPEED, 2, [], 2, "DeepSpeed is not supported"),
        (DistributedType.FSDP, 2, [], 1, "fsdp_version: 2"),
        (DistributedType.NO, 1, ["--fsdp"], 2, "--fsdp shards over several processes"),
        (DistributedType.FSDP, 2, ["--optimizer", "adafactor"], 2, "--optimizer adafactor under FSDP"),
        (
            DistributedType.MULTI_CPU,
            2,
            ["--fsdp", "--eval_accuracy", "--eval_dataset", "e.jsonl"],
            2,
            "--eval_accuracy under FSDP",
        ),
    ],
)
def test_distributed_mode_refusals(kind, processes, argv, version, message):
    with pytest.raises(OptionError, match=message):
        distributed_mode(llm_options(*argv), fake_accelerator(kind, processes, version))


def test_fsdp_refuses_fp16():
    accelerator = fake_accelerator(DistributedType.FSDP, mixed_precision="fp16")
    with pytest.raises(OptionError, match="fp16 under FSDP.*use bf16"):
        distributed_mode(llm_options(), accelerator)
    assert (
        distributed_mode(llm_options(), fake_accelerator(DistributedType.FSDP, mixed_precision="bf16"))
        == "fsdp"
    )


def test_shipped_accelerate_configs_parse_and_give_fsdp2_settings():
    """configs/accelerate_{ddp,fsdp}.yaml load with accelerate's own reader; the FSDP one makes an FSDP2 plugin
    whose settings `fsdp_kwargs` hands to fully_shard."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import OffloadPolicy

    from bilora_diffusion.sharding import fsdp_kwargs

    ddp = load_config_from_file(str(ROOT / "configs" / "accelerate_ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU
    fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate_fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    kw = {k.removeprefix("fsdp_"): v for k, v in fsdp.fsdp_config.items()}
    kw["fsdp_version"], kw["cpu_offload"] = kw.pop("version"), kw.pop("offload_params")
    plugin = FullyShardedDataParallelPlugin(**kw)
    assert plugin.fsdp_version == 2
    settings = fsdp_kwargs(plugin)
    assert settings["reshard_after_forward"] is True and type(settings["offload_policy"]) is OffloadPolicy


def fake_accelerator(kind, processes=2, fsdp_version=2, mixed_precision="no", mesh=None):
    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(
        distributed_type=kind,
        num_processes=processes,
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=mixed_precision,
        torch_device_mesh=mesh,
    )


def test_fsdp_refuses_a_parallelism_mesh():
    accelerator = fake_accelerator(DistributedType.FSDP, mesh=object())
    with pytest.raises(OptionError, match="parallelism config .* not supported"):
        distributed_mode(llm_options(), accelerator)


def test_sharded_optimizer_files_the_main_process_cannot_see_are_a_checkpoint_error(tmp_path):
    """--fsdp_state_dict sharded on machines without a shared output folder: one CheckpointError naming the
    files, no folder that looks complete, the previous checkpoint kept."""
    from torch import nn

    from bilora_diffusion.checkpoint import CheckpointError, list_checkpoints, save_checkpoint

    config = BiLoRAConfig(rank=1, target_modules=["0"])
    model = attach_bilora(nn.Sequential(nn.Linear(2, 2)), config)
    opt = build_optimizer(model, config, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = ({"model": model}, {"model": config}, opt, sched, {"method": "bilora"}, "x: 1\n")
    save_checkpoint(tmp_path, 1, *args)
    shard = tmp_path / "shards" / "optimizer-rank0-of-2.pt"
    shard.parent.mkdir()
    torch.save({}, shard)
    files = [shard, tmp_path / "shards" / "optimizer-rank1-of-2.pt"]  # rank 1 wrote on its own disk
    with pytest.raises(CheckpointError, match="optimizer-rank1-of-2.pt not found from the main process"):
        save_checkpoint(tmp_path, 2, *args, rank_files=files)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not list(tmp_path.glob(".checkpoint-*"))
