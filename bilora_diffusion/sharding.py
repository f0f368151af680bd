"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): where the adapters' shards lie, and the
few places the step needs the ranks to agree.

Each rank holds a shard of every parameter (a `DTensor`). The adapters are placed so that every quantity the
step needs is exact from local shards plus one all-reduce of a few numbers:

- A [r, in] is sharded along ``in`` (``Shard(1)``) and B [out, r] along ``out`` (``Shard(0)``, FSDP's default).
  Both Gram matrices of the aux clip, BᵀB and A·Aᵀ, are then sums over the sharded dimension, so the sum of the
  ranks' local Grams is the full factors' Gram (`core.blocks_sq_norms`): the norms are exact, one all-reduce of
  2·r² numbers per layer, never a gather of the adapters. A rank that holds no rows of some factor contributes
  zeros and gets the same clip factor as every other rank. FSDP2 shards dims other than 0 only evenly, so an A
  whose input size the world size does not divide (rare: 320 … 14336 all divide by 8) stays on FSDP's dim 0
  and its Gram is taken from the gathered A (r×in numbers) instead (`FlatGroup.gram_blocks`).
- Gradient norms (per role, and lora-sam's ‖g‖) are sums of squares: one all-reduce per step.
- The optimizer's update (AdamW, Adam, SGD: elementwise) runs on the local shards (`optim.flat`).

`apply_fsdp` shards a model the way accelerate's FSDP2 plugin does (``fully_shard`` on each of the model's
``_no_split_modules`` blocks, then on the root) with the adapter placements above; accelerate leaves a model
that is already sharded alone, so the same call serves accelerate's FSDP configs on GPUs and plain
``torchrun`` processes on CPUs (where accelerate ignores FSDP settings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .core import Reduce
from .peft_glue import ModelOrModels, bilora_layers, models_of


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor (sharing its storage: in-place changes reach the parameter); any other
    tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(params: Iterable[torch.Tensor]) -> bool:
    return any(isinstance(p, DTensor) for p in params)


def shard_reduce(params: Iterable[torch.Tensor]) -> Reduce | None:
    """The all-reduce (sum over the ranks holding shards) of sharded ``params``; None when nothing is sharded.
    Refuses a placement the exact sharded norms do not cover (A sharded along its rank)."""
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1:
        raise ValueError("sharded Bi-LoRA supports a 1-D FSDP mesh (no HSDP / tensor parallel)")
    group = mesh.get_group()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


def adapter_placement(models: ModelOrModels, world: int) -> Callable[[nn.Parameter], Shard | None]:
    """``fully_shard``'s ``shard_placement_fn``: every LoRA A (both branches) along its input dimension where
    ``world`` divides it (FSDP2 shards other dims only evenly), everything else FSDP's default (dim 0)."""
    a_ids = set()
    for layer in bilora_layers(models):
        for name in layer.lora_A:
            a_ids.add(id(layer.lora_A[name].weight))
        for name in layer.lora_embedding_A:
            a_ids.add(id(layer.lora_embedding_A[name]))
    return lambda p: Shard(1) if id(p) in a_ids and p.shape[1] % world == 0 else None


def check_placements(models: ModelOrModels) -> None:
    """Every sharded B must be split along its output dimension (FSDP's default) and every A along either
    dimension (`adapter_placement`); a model sharded otherwise (e.g. tensor parallel) is refused, since its
    Gram norms would not be sums of local pieces."""
    for layer in bilora_layers(models):
        for name in layer.lora_A:
            for param, dims in ((layer.lora_A[name].weight, (0, 1)), (layer.lora_B[name].weight, (0,))):
                if isinstance(param, DTensor) and any(
                    not isinstance(pl, Replicate) and pl not in [Shard(d) for d in dims]
                    for pl in param.placements
                ):
                    raise ValueError(
                        f"adapter tensor of shape {tuple(param.shape)} is sharded as {param.placements}; "
                        "Bi-LoRA needs LoRA B sharded on dim 0 (use bilora_diffusion.sharding.apply_fsdp)"
                    )


def shard_units(model: nn.Module, classes: Iterable[str] | None = None) -> list[nn.Module]:
    """The blocks FSDP shards one by one: modules whose class is named in ``classes`` (default: the model's
    ``_no_split_modules``, as accelerate's transformer-based wrap policy reads them), innermost first."""
    names = set(classes if classes is not None else getattr(model, "_no_split_modules", None) or ())
    return [m for m in reversed(list(model.modules())) if m is not model and type(m).__name__ in names]


def apply_fsdp(model: nn.Module, classes: Iterable[str] | None = None, **fsdp_kwargs) -> nn.Module:
    """``fully_shard`` on every block of `shard_units`, then on the model itself, with the adapter placements of
    `adapter_placement`. ``fsdp_kwargs`` go to ``fully_shard`` (mesh, reshard_after_forward, mp_policy, ...).
    The model is sharded in place and returned."""
    from torch.distributed.fsdp import fully_shard

    mesh = fsdp_kwargs.get("mesh")
    placement = adapter_placement(model, mesh.size() if mesh is not None else dist.get_world_size())
    with _output_capture_kept(model):
        for unit in shard_units(model, classes):
            fully_shard(unit, shard_placement_fn=placement, **fsdp_kwargs)
        fully_shard(model, shard_placement_fn=placement, **fsdp_kwargs)
    return model


@contextlib.contextmanager
def _output_capture_kept(model: nn.Module) -> Iterator[None]:
    """transformers 5 finds which outputs a model can record (``output_hidden_states``: SDXL's penultimate CLIP
    layer) in a registry keyed by the model's class name; ``fully_shard`` swaps the class for ``FSDP<Name>``, so
    a sharded CLIP text encoder returned no hidden states. Register the sharded classes under the same entries."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers 4: outputs are returned by the model code itself
        yield
        return
    flags = {m: _CAN_RECORD_REGISTRY.get(m) for m in model.modules()}
    yield
    for module, entry in flags.items():
        if entry:
            _CAN_RECORD_REGISTRY[module] = entry


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank must call it); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (a tensor shaped like the whole ``param``), placed as ``param`` is; no
    communication (every rank holds ``full``)."""
    if not isinstance(param, DTensor):
        return full
    sharded = distribute_tensor(
        full.to(local(param).device), param.device_mesh, param.placements, src_data_rank=None
    )
    return sharded.to_local()


def global_view(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A local tensor shaped like ``param``'s shard as a DTensor placed as ``param`` (for `full_tensor`)."""
    if not isinstance(param, DTensor):
        return t
    return DTensor.from_local(
        t, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def row_slice(rows: int, param: torch.Tensor) -> slice:
    """The rows of a [rows, ...] tensor held by this rank when ``param`` (of that shape) is sharded on dim 0;
    every row when it is not (torch.chunk's split, as FSDP2 and DTensor use)."""
    if not isinstance(param, DTensor) or param.placements[0] != Shard(0):
        return slice(0, rows)
    mesh = param.device_mesh
    sizes = [len(c) for c in torch.arange(rows).chunk(mesh.size())]
    sizes += [0] * (mesh.size() - len(sizes))
    rank = mesh.get_local_rank()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def whole_rows(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole of a factor whose local piece ``t`` (shaped like ``param``'s shard, e.g. a view of the flat
    vector) is split along dim 0: an all-gather (every rank must call it)."""
    return global_view(t, param).full_tensor()


@contextlib.contextmanager
def whole_adapters(models: ModelOrModels) -> Iterator[None]:
    """Within this context every sharded trainable tensor (the adapters) is a whole, plain parameter on every
    rank, so PEFT's, diffusers' and the exporters' state-dict code reads and loads them as in one process; on
    exit each rank keeps its shard of the (possibly loaded) values. A collective: every rank must enter it.
    No forward may run inside (FSDP would swap its own parameters back in)."""
    from torch.distributed.fsdp import FSDPModule

    swapped = []
    for model in models_of(models):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # With reshard_after_forward=False a forward without backward (the last held-out loss) leaves
                # the gathered, possibly bf16, parameters in place: back to the fp32 shards first (local, no
                # communication), so the whole tensors below are the optimizer's values.
                module.reshard()
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and param.requires_grad:
                    whole = nn.Parameter(param.full_tensor().detach().clone())
                    module._parameters[name] = whole
                    swapped.append((module, name, param, whole))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, param, whole in swapped:
                local(param).copy_(local_like(whole.detach(), param))
                module._parameters[name] = param


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradients accumulate unreduced on each rank until the context exits (FSDP2's
    ``set_requires_gradient_sync``; the reduce-scatter then runs once, on the last micro-batch)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def fsdp_kwargs(plugin) -> dict:
    """``fully_shard`` settings from accelerate's FSDP plugin (reshard after forward, mixed precision, CPU
    offload), as accelerate's own FSDP2 preparation passes them; {} without a plugin."""
    if plugin is None:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    offload = plugin.cpu_offload
    return {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": offload if isinstance(offload, OffloadPolicy) else OffloadPolicy(),
    }
