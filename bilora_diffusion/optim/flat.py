"""The flat update: each param group's adapter tensors stepped as ONE vector.

An SDXL UNet has a few thousand tiny adapter tensors (twice as many under Bi-LoRA); per-tensor clipping, AdamW
and the aux clip pay a fixed cost per tensor that dominates the update on a CPU. For torch's AdamW, Adam and
SGD, whose updates are elementwise, stepping one vector equals stepping its pieces. Per step and group:

    values in    one ``_foreach_copy_`` from PEFT's tensors into the vector (``FlatGroup.flat``)
    gradients    one C++ concatenation (``flat.grad``, freed after the step)
    update       the inner optimizer steps the vector; the aux clip reads and scales it in blocks
    values out   one ``_foreach_copy_`` back into PEFT's tensors

PEFT's tensors stay the model's only storage (nothing aliases the vector). The vector is kept between steps
on a CPU (fresh pages every step were measured to double the update's time there) and freed after each step on
CUDA, where the caching allocator makes it free to allocate again. An auxiliary group's vector is laid out in
blocks of equally shaped pairs -- every A of a block, then every B -- so the clip reads each block as one
``[n, r, in]`` and one ``[n, out, r]`` view.
"""

from __future__ import annotations

import hashlib

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import ConfigError
from ..peft_glue import LoraPair
from ..sharding import is_sharded, local, whole_rows

FLAT_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
"""Inner optimizers whose update is elementwise, so stepping one flat vector equals stepping its pieces."""


class FlatGroup:
    """One param group's tensors ``params`` as one vector ``flat`` (the inner optimizer's parameter).

    With ``pairs``, the vector starts with their blocks (`block_views`); ``order[i]`` is the index in the
    group's own parameter list of the vector's i-th tensor; ``layout`` fingerprints the order and shapes (saved
    with the optimizer state, so state saved for other adapters is refused).

    Sharded parameters (FSDP2 DTensors, `sharding`) are stepped through their local shards: the vector holds
    this rank's pieces (``shapes``, ``numels``), blocks are keyed by the whole tensors' shapes (the same on
    every rank, so the ranks' Gram matrices line up) and ``layout`` fingerprints the whole shapes."""

    def __init__(self, params: list[torch.Tensor], pairs: list[LoraPair] = (), tag: str = "") -> None:
        index = {id(p): i for i, p in enumerate(params)}
        self.by_shape: dict[tuple, list[LoraPair]] = {}
        self.block_shapes: dict[tuple, tuple[tuple, tuple]] = {}
        for pair in pairs:
            if id(pair.A_param) in index and id(pair.B_param) in index:
                key = (
                    _rows_by_rest(pair.A_param, pair.embedding),
                    _rows_by_rest(pair.B_param, pair.embedding),
                )
                self.by_shape.setdefault(key, []).append(pair)
                self.block_shapes[key] = (
                    _rows_by_rest(local(pair.A_param), pair.embedding),
                    _rows_by_rest(local(pair.B_param), pair.embedding),
                )
        ordered = [
            t
            for group in self.by_shape.values()
            for t in [q.A_param for q in group] + [q.B_param for q in group]
        ]
        placed = {id(t) for t in ordered}
        self.params = ordered + [p for p in params if id(p) not in placed]
        self.order = [index[id(p)] for p in self.params]
        self.sharded = is_sharded(self.params)
        self.shapes = [local(p).shape for p in self.params]
        self.numels = [shape.numel() for shape in self.shapes]
        self.total = sum(self.numels)
        shapes = repr([tuple(p.shape) for p in self.params]) + tag
        self.layout = hashlib.sha1(shapes.encode()).hexdigest()[:16]
        self.sq_scales = [
            torch.tensor([q.scale**2 for q in group], dtype=torch.float64) for group in self.by_shape.values()
        ]
        first = local(self.params[0]) if self.params else torch.empty(0)
        # the adapters' device and dtype from the start: a state loaded before the first step is cast to them
        # (torch casts it to the parameter's), not to float32 on the CPU
        self.flat = torch.empty(0, device=first.device, dtype=first.dtype)
        self.views: list[torch.Tensor] = []
        self.has_grad: list[bool] = []
        self.missing: list[int] = []

    def local_params(self) -> list[torch.Tensor]:
        """The tensors the vector steps: PEFT's parameters, or this rank's shards of them (taken each step:
        FSDP may replace a shard's storage; one process pays no per-tensor call)."""
        return [p.to_local() for p in self.params] if self.sharded else self.params

    # -- one step ------------------------------------------------------------------------------------------
    def load(self, state: dict) -> bool:
        """Values and gradients into the vector (zeros where a tensor has no gradient); moves ``state`` (the
        inner optimizer's for this vector) along when the model was moved or cast since. Returns whether any
        tensor has a gradient. (Runs under no_grad, inside the optimizer's step.)"""
        params = self.local_params()
        device, dtype = params[0].device, params[0].dtype
        if self.views and self.flat.device == device and self.flat.dtype == dtype:
            torch._foreach_copy_(self.views, params)
        else:
            if len({(p.device, p.dtype) for p in params}) != 1:
                raise ConfigError(
                    "the flat update needs one device and dtype per param group, but the adapters were moved or "
                    "cast to several after the optimizer was built: build it after moving the model, or with "
                    "flat=False"
                )
            self.flat.data = _flatten_dense_tensors([p.detach() for p in params])
            self.views = _unflatten_dense_tensors(self.flat.data, params)
            for key, value in state.items():  # a model moved or cast after building: its state follows
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self.total:
                    state[key] = value.to(device=device, dtype=dtype)
        grads = [local(p.grad) for p in self.params] if self.sharded else [p.grad for p in self.params]
        self.has_grad = [g is not None for g in grads]
        if all(self.has_grad):
            self.missing = []
        else:
            self.missing = [i for i, has in enumerate(self.has_grad) if not has]
            if len(self.missing) == len(params):
                self.flat.grad = None
                return False
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        flat_grad = _flatten_dense_tensors(grads)  # one C++ concatenation
        self.flat.grad = flat_grad if flat_grad.dtype == dtype else flat_grad.to(dtype)
        return True

    def restore_missing(self, saved: list[tuple[torch.Tensor, slice, torch.Tensor]]) -> None:
        """After the inner step: the tensors without a gradient, and their optimizer state (``saved``, from
        `save_missing`), back as they were -- the per-tensor update leaves them alone (the aux clip, which
        follows, scales them like every other pair)."""
        for i in self.missing:
            self.views[i].copy_(local(self.params[i]))
        for value, part, old in saved:
            value[part].copy_(old)

    def store(self) -> None:
        """Values out to PEFT's tensors; the gradient vector freed, and on CUDA the vector too."""
        torch._foreach_copy_(self.local_params(), self.views)
        self.flat.grad = None
        if self.flat.device.type == "cuda":
            self.flat.data, self.views = self.flat.data.new_empty(0), []

    def save_missing(self, state: dict) -> list[tuple[torch.Tensor, slice, torch.Tensor]]:
        """The optimizer-state slices (moments, momentum) of the tensors without a gradient, to be put back by
        `restore_missing`."""
        missing = self.missing
        if not missing:
            return []
        starts = [0]
        for n in self.numels:
            starts.append(starts[-1] + n)
        saved = []
        for value in state.values():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self.total:
                for i in missing:
                    part = slice(starts[i], starts[i + 1])
                    saved.append((value, part, value[part].clone()))
        return saved

    def block_views(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block of n equally shaped pairs: their A's [n, r, in] and B's [n, out, r] as views of the vector,
        and their s² [n]."""
        out, offset = [], 0
        if self.sq_scales and self.sq_scales[0].device != self.flat.device:
            self.sq_scales = [sq.to(self.flat.device) for sq in self.sq_scales]
        for (key, group), sq in zip(self.by_shape.items(), self.sq_scales):
            a_shape, b_shape = self.block_shapes[key]
            n, a_size, b_size = len(group), a_shape.numel(), b_shape.numel()
            a = self.flat.data[offset : offset + n * a_size].view(n, *a_shape)
            b = self.flat.data[offset + n * a_size : offset + n * (a_size + b_size)].view(n, *b_shape)
            out.append((a, b, sq))
            offset += n * (a_size + b_size)
        return out

    def gram_blocks(self, rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`block_views` for the sharded Gram norms (`core.blocks_sq_norms` with a reduce): every local Gram
        must be a partial sum over the ranks. It is where A is split along its input dimension; a block whose A
        is split along its rank (FSDP keeps dims other than 0 whole unless evenly divisible) has its A gathered
        whole, counted on rank 0 only (zeros elsewhere)."""
        out = []
        for (a, b, sq), group in zip(self.block_views(), self.by_shape.values()):
            param = group[0].A_param
            if getattr(param, "placements", None) and param.placements[0].is_shard(0):
                whole = torch.stack(
                    [whole_rows(piece.view(local(q.A_param).shape), q.A_param) for piece, q in zip(a, group)]
                )
                a = whole.reshape(len(group), whole.shape[1], -1)
                a = a if rank == 0 else torch.zeros_like(a)
            out.append((a, b, sq))
        return out


def _rows_by_rest(t: torch.Tensor, embedding: bool) -> torch.Size:
    """A factor's 2-D shape (a Conv2d's [r, in, kh, kw] as [r, in·kh·kw]; an embedding's factors are 2-D)."""
    return t.shape if embedding else torch.Size([t.shape[0], t.shape[1:].numel()])


def flat_ok(optimizer_cls: type, param_groups: list[dict]) -> bool:
    """The flat update needs an elementwise torch optimizer and one device and dtype per group."""
    if optimizer_cls not in FLAT_OPTIMIZERS:
        return False
    for group in param_groups:
        params = list(group["params"])
        kinds = {(p.device, p.dtype) for p in params}
        if len(kinds) != 1 or not all(p.is_floating_point() for p in params):
            return False
    return True
