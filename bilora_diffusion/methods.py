"""The methods as one torch optimizer: lora, bilora, dual-descent, lora-sam and flat-lora.

`build_optimizer` returns a real `torch.optim.Optimizer` (LR schedulers, accelerate and `transformers.Trainer`
take it unchanged). Its param groups are tagged ``group["bilora_role"] = "primary" | "aux"``; the inner
optimizer (AdamW by default) shares them, so its state and hyper-parameters are those of the wrapper.

One step of Bi-LoRA (DESIGN.md), from the gradient G = dL/dW of ONE forward/backward at
``W0 + s1·B1·A1 + s2·B2·A2``:

    B1 <- B1 - eta1·s1·G·A1ᵀ     A1 <- A1 - eta1·s1·B1ᵀ·G      (primary: descent)
    B2 <- B2 + eta2·s2·G·A2ᵀ     A2 <- A2 + eta2·s2·B2ᵀ·G      (auxiliary: ascent, `maximize=True`)

then the clip: c = sqrt(sum_j ||s2·B2_j·A2_j||_F²); if c > rho every B2_j and A2_j is scaled by sqrt(rho/c).

`step(closure)` runs the method with ``closure()`` doing forward + backward and returning the loss. The
one-pass methods (lora, bilora, dual-descent) also accept ``step()`` on gradients already computed, so they
drop into loops that call ``backward`` themselves (gradient accumulation, fp16 GradScaler, accelerate).

The flat update (default for torch's AdamW, Adam and SGD, whose updates are elementwise): each param group's
tensors are updated as ONE flat vector. An SDXL UNet has a few thousand tiny adapter tensors (twice as many
under Bi-LoRA); per-tensor gradient clipping and AdamW pay a fixed cost per tensor that dominates the update on
a CPU. Per step and group the gradients are flattened into one vector (one C++ concatenation), clipped there,
the inner optimizer steps the parameters' vector, the auxiliary clip runs on it, and the result is copied back
(`_FlatSource`). Packed layers (`bilora_diffusion.packed`, the fused path's storage) are read and written as
their packed tensors, a block of equally shaped layers at a time; the param groups then list the packed
tensors (the trained ones) instead of PEFT's views of them, while each group's vector and optimizer state keep
PEFT's parameters' layout. The optimizer never makes PEFT's own parameters share storage (safetensors refuses
tensors that share storage; packed tensors, which state dicts never show, live in the update's buffer on a
CPU); one buffer per device and dtype; a model moved or cast after the optimizer was built, and layers packed or
unpacked after it, are followed (the vectors are rebuilt where the tensors are). A parameter without a gradient (the last
text-encoder layer when SDXL reads the penultimate one) keeps its value and its moments, as in the per-tensor
update; only Adam's bias correction then counts the group's steps rather than the parameter's own. State saved
by either update loads into the other (converted), so older checkpoints resume.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .adapters import (
    LoraPair,
    ModelOrModels,
    _models,
    bilora_layers,
    branch_pairs,
    branch_parameters,
    lora_pair,
)
from .config import AUX, AUX_METHODS, METHODS, ONE_PASS_METHODS, PRIMARY, BiLoRAConfig, ConfigError
from .fused import block_sq_norms, clip_aux_, clip_factors, grad_norm, pair_sq_norms_batched
from .packed import packed_sources, packing_changed, sync, unpack

logger = logging.getLogger(__name__)

ROLE = "bilora_role"
STEP_KEY = "bilora_step"  # kept in the param groups, so it travels with the optimizer's state_dict
# Param-group entry: the flat vector's layout fingerprint, or False (state saved by the per-tensor update).
FLAT_KEY = "bilora_flat"
FLAT_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
"""Inner optimizers whose update is elementwise, so stepping one flat vector equals stepping its pieces."""


def _block_views(flat: torch.Tensor, by_shape: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The clip blocks of a group's vector (or of a vector in its layout): per block of n equally shaped pairs,
    the A's as [n, r, in] and the B's as [n, out, r] (they lie at the start of the vector, block by block)."""
    out, offset = [], 0
    for (a_shape, b_shape), group in by_shape.items():
        n, a_size, b_size = len(group), a_shape.numel(), b_shape.numel()
        a = flat[offset : offset + n * a_size].view(n, *a_shape)
        b = flat[offset + n * a_size : offset + n * (a_size + b_size)].view(n, *b_shape)
        out.append((a, b))
        offset += n * (a_size + b_size)
    return out


class _FlatSource:
    """Where the flat vectors' values live: the tensors the model trains -- each packed tensor of a packed layer
    (`bilora_diffusion.packed`; PEFT's parameters of both branches are views of it) and every other parameter --
    flattened into one buffer ``buffer``, in the order the groups' vectors first need them. Per group:

    - span: its tensors lie in the buffer in its own order (every group without packed layers): the vector is a
      slice of the buffer, nothing is copied;
    - blocks: a group of packed pairs only (every attention projection of an SDXL UNet): per clip block of n
      equally shaped layers, the n packed_A [n, R, in] and n packed_B [n, out, R] lie next to each other in the
      buffer, and this role's rows / columns of them are one strided view, moved with one ``copy_``;
    - index: anything else (packed and unpacked pairs of one shape): one ``index_select`` / ``index_copy_``.

    On a CPU the packed tensors are views of the buffer itself (they are hidden from state dicts, so sharing
    storage is safe), and only the other tensors are copied in (``gather``) and out (``scatter``), one
    ``_foreach_copy_`` each; the gradients are flattened with one C++ concatenation. On CUDA the buffers exist
    only during the step (``release``; the caching allocator makes the next step's allocation free), so they add
    nothing to the forward/backward's peak memory; on a CPU they are kept (rebuilding them per step -- fresh
    pages, thousands of views -- was measured to double the update's time)."""

    def __init__(self, groups: list[_FlatGroup], models: list[nn.Module], packed: dict, packing: int) -> None:
        self.groups = groups
        self.models = models
        self.packing = packing
        self.tensors: list[torch.Tensor] = []
        self.source_of: dict[int, torch.Tensor] = {}
        """id(PEFT parameter) -> the tensor holding its values (its packed tensor, or itself)."""
        self.packed: list[int] = []
        """Indices of the packed tensors: hidden from state dicts, so on a CPU they live in the buffer itself."""
        where: dict[int, int] = {}
        pieces: list[list[tuple]] = []  # per group: (source index, slice or None) of every parameter
        for fg in groups:
            fg.sources, positions = [], []
            for p in fg.params:
                tensor, part = packed.get(id(p), (p, None))
                self.source_of[id(p)] = tensor
                if id(tensor) not in where:
                    where[id(tensor)] = len(self.tensors)
                    self.tensors.append(tensor)
                    if part is not None:
                        self.packed.append(where[id(tensor)])
                fg.sources.append(where[id(tensor)])
                positions.append((where[id(tensor)], part))
            pieces.append(positions)
        starts = [0, *itertools.accumulate(t.numel() for t in self.tensors)]
        for fg, positions in zip(groups, pieces):
            fg.span, fg.index, fg.recipes = None, None, None
            first = starts[positions[0][0]] if positions else 0
            if all(part is None for _, part in positions) and [starts[k] for k, _ in positions] == [
                first + o for o in itertools.accumulate([0, *fg.numels[:-1]])
            ]:
                fg.span = (first, first + fg.total)  # the group's tensors lie in the buffer in its order
                continue
            fg.recipes = self._block_recipes(fg, positions, starts)
            if fg.recipes is None:  # irregular (e.g. packed and unpacked pairs of one shape): element indices
                fg.index = torch.cat(
                    [
                        torch.arange(starts[k], starts[k + 1]).view(self.tensors[k].shape)[part].reshape(-1)
                        if part is not None
                        else torch.arange(starts[k], starts[k + 1])
                        for k, part in positions
                    ]
                )
        self.buffer = torch.empty(0)
        self.views: list[torch.Tensor] = []
        self.relayout()

    def _block_recipes(self, fg: _FlatGroup, positions: list, starts: list[int]) -> list[tuple] | None:
        """For a group of packed pairs only, per clip block of n pairs: where the block's A's and B's are in the
        buffer -- n consecutive packed_A [n, R, in] and n consecutive packed_B [n, out, R], this role's rows
        and columns ``s:e`` of them -- so a block moves with one strided copy per factor. None when the group
        is not made of such blocks."""
        recipes, i = [], 0
        for (a_shape, _), pairs in fg.by_shape.items():
            n = len(pairs)
            a_pos, b_pos = positions[i : i + n], positions[i + n : i + 2 * n]
            i += 2 * n
            ks, ms = [k for k, _ in a_pos], [m for m, _ in b_pos]
            parts = {(part.start, part.stop) if isinstance(part, slice) else None for _, part in a_pos}
            parts |= {(part[1].start, part[1].stop) if isinstance(part, tuple) else None for _, part in b_pos}
            if None in parts or len(parts) != 1 or len(a_shape) != 2:
                return None
            packed_a, packed_b = self.tensors[ks[0]].shape, self.tensors[ms[0]].shape
            if ks != list(range(ks[0], ks[0] + n)) or ms != list(range(ms[0], ms[0] + n)):
                return None
            if any(self.tensors[k].shape != packed_a for k in ks) or any(
                self.tensors[m].shape != packed_b for m in ms
            ):
                return None
            ((start, stop),) = parts
            recipes.append((starts[ks[0]], packed_a, starts[ms[0]], packed_b, n, start, stop))
        return recipes if i == len(positions) else None

    @staticmethod
    def _block_sources(flat: torch.Tensor, recipes: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The strided views of ``flat`` (the buffer or the flattened gradients) that hold each block's A's
        [n, r, in] and B's [n, out, r]."""
        out = []
        for a_at, a_shape, b_at, b_shape, n, start, stop in recipes:
            a = flat[a_at : a_at + n * a_shape.numel()].view(n, *a_shape)[:, start:stop]
            b = flat[b_at : b_at + n * b_shape.numel()].view(n, *b_shape)[:, :, start:stop]
            out.append((a, b))
        return out

    def relayout(self) -> None:
        """Empty buffers on the trained tensors' device and dtype (the vectors keep the tensor objects the inner
        optimizer holds); made again at the next `gather`."""
        first = self.tensors[0].detach()
        self.buffer = first.new_empty(0)
        self.views = []
        self.copied: list[int] = []
        self.aliased_ptrs: list[int] = []
        self.keep = first.device.type != "cuda"
        for fg in self.groups:
            fg.flat.data = first.new_empty(0)
            fg.views, fg.blocks = [], []
            if fg.index is not None:
                fg.index = fg.index.to(first.device)

    def stale(self) -> bool:
        """Whether a layer was packed or unpacked since (`bilora_diffusion.packed`): the source is rebuilt (the
        groups' vectors and state keep their layout)."""
        return packing_changed(self.packing)

    def moved(self) -> bool:
        """Whether the trained tensors now live on another device or in another dtype than the buffers (the
        model was moved or cast after the optimizer was built)."""
        device, dtype = self.buffer.device, self.buffer.dtype
        if all(t.dtype == dtype and t.device == device for t in self.tensors):
            return False
        if len({(t.device, t.dtype) for t in self.tensors}) != 1:
            raise ConfigError(
                "the flat update needs one device and dtype for the adapters, but they were moved or cast to "
                "several after the optimizer was built: build it after moving the model, or with flat=False"
            )
        return True

    def gather(self) -> None:
        """The trained tensors into the buffer, and every group's vector from it. On a CPU the packed tensors
        are views of the buffer (their values are there already; PEFT's views follow them), so only the other
        tensors are copied."""
        fresh = not self.views or (self.keep and not self._aliased())
        if fresh:
            self.buffer = _flatten_dense_tensors(self.tensors)
            self.views = _unflatten_dense_tensors(self.buffer, self.tensors)
            aliased = set(self.packed) if self.keep else set()
            self.copied = [k for k in range(len(self.tensors)) if k not in aliased]
            if self.keep and self.packed:
                for k in self.packed:
                    self.tensors[k].data = self.views[k]
                sync(self.models)  # PEFT's views onto the packed tensors' new storage
                self.aliased_ptrs = [self.tensors[k].data_ptr() for k in self.packed]
        elif self.copied:
            torch._foreach_copy_([self.views[k] for k in self.copied], [self.tensors[k] for k in self.copied])
        for fg in self.groups:
            if fresh:
                if fg.span is not None:
                    fg.flat.data = self.buffer[fg.span[0] : fg.span[1]]
                else:
                    fg.flat.data = self.buffer.new_empty(fg.total)
                fg.build_views()
                fg.sources_of_blocks = self._block_sources(self.buffer, fg.recipes) if fg.recipes else []
            if fg.recipes is not None:
                for (a, b, _), (src_a, src_b) in zip(fg.blocks, fg.sources_of_blocks):
                    a.copy_(src_a)
                    b.copy_(src_b)
            elif fg.index is not None:
                torch.index_select(self.buffer, 0, fg.index, out=fg.flat.data)

    def _aliased(self) -> bool:
        """Whether the packed tensors are still the buffer's views (a move or cast gives them new storage)."""
        return [self.tensors[k].data_ptr() for k in self.packed] == self.aliased_ptrs

    def load_grads(self) -> list[bool]:
        """Every group's ``flat_grad`` (in the vectors' dtype) and ``missing`` (its parameters whose tensor has
        no gradient: they get zeros here and are put back by `restore_missing` after the step); per group,
        whether any of its parameters has a gradient."""
        grads = [t.grad for t in self.tensors]
        missing = {k for k, g in enumerate(grads) if g is None}
        for k in missing:
            grads[k] = torch.zeros_like(self.tensors[k])
        dtype = self.buffer.dtype
        # One C++ concatenation (what DDP and apex use) instead of a Python loop over thousands of tensors.
        flat = _flatten_dense_tensors([g if g.dtype == dtype else g.to(dtype) for g in grads])
        has_grad = []
        for fg in self.groups:
            fg.missing = [i for i, k in enumerate(fg.sources) if k in missing] if missing else []
            has = len(fg.missing) < len(fg.params)
            has_grad.append(has)
            if not has:
                fg.flat_grad = None
            elif fg.span is not None:
                fg.flat_grad = flat[fg.span[0] : fg.span[1]]
            elif fg.recipes is not None:
                fg.flat_grad = flat.new_empty(fg.total)
                blocks = _block_views(fg.flat_grad, fg.by_shape)
                for (a, b), (src_a, src_b) in zip(blocks, self._block_sources(flat, fg.recipes)):
                    a.copy_(src_a)
                    b.copy_(src_b)
            else:
                fg.flat_grad = flat.index_select(0, fg.index)
        return has_grad

    def scatter(self) -> None:
        """Every group's vector into the buffer, the buffer into the trained tensors (the packed ones are the
        buffer on a CPU)."""
        for fg in self.groups:
            if fg.recipes is not None:
                for (a, b, _), (src_a, src_b) in zip(fg.blocks, fg.sources_of_blocks):
                    src_a.copy_(a)
                    src_b.copy_(b)
            elif fg.index is not None:
                self.buffer.index_copy_(0, fg.index, fg.flat)
        if self.copied:
            torch._foreach_copy_([self.tensors[k] for k in self.copied], [self.views[k] for k in self.copied])

    def release(self) -> None:
        for fg in self.groups:
            fg.flat_grad = None
        if not self.keep:
            self.buffer, self.views = self.buffer.new_empty(0), []
            for fg in self.groups:
                fg.flat.data = self.buffer.new_empty(0)
                fg.views, fg.blocks = [], []


class _FlatGroup:
    """One param group's tensors as one flat vector ``flat`` (the inner optimizer's parameter), with views of it
    shaped like the parameters. The values come from and go back to the optimizer's `_FlatSource` (the
    parameters, or the packed tensors PEFT's parameters are views of); ``flat`` is a slice of the source's
    buffer when the group's tensors lie there in order (no copy), else gathered with one ``index_select``.
    The gradient vector ``flat_grad`` exists only during the step.

    With ``pairs`` (the auxiliary branch's factor pairs), the vector is laid out in blocks of equally shaped
    pairs -- every A of a block, then every B in the same order -- so the clip reads each block as one
    ``[n, r, in]`` and one ``[n, out, r]`` tensor without stacking copies. ``order[i]`` is the index in the
    group's own parameter list of the i-th tensor of the vector."""

    def __init__(self, params: list[torch.Tensor], pairs: list[LoraPair] = (), tag: str = "") -> None:
        index = {id(p): i for i, p in enumerate(params)}
        self.by_shape: dict[tuple, list[LoraPair]] = {}
        for pair in pairs:
            if id(pair.A_param) in index and id(pair.B_param) in index:
                self.by_shape.setdefault((pair.A.shape, pair.B.shape), []).append(pair)
        ordered = [
            t
            for group in self.by_shape.values()
            for t in [q.A_param for q in group] + [q.B_param for q in group]
        ]
        placed = {id(t) for t in ordered}
        self.params = ordered + [p for p in params if id(p) not in placed]
        self.order = [index[id(p)] for p in self.params]
        self.numels = [p.numel() for p in self.params]
        shapes = repr([tuple(p.shape) for p in self.params]) + tag
        self.layout = hashlib.sha1(shapes.encode()).hexdigest()[:16]
        """Fingerprint of the vector's layout (shapes in order, and ``tag``), saved in the param group: state
        saved for other adapters with the same total size is refused too."""
        self.total = sum(self.numels)
        self.flat = torch.empty(0)
        self.flat_grad: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.missing: list[int] = []
        self.sources: list[int] = []
        """Index in the source of each parameter's tensor (set by `_FlatSource`)."""
        self.span: tuple[int, int] | None = None
        """(start, end) in the source buffer when the vector is that slice of it."""
        self.recipes: list[tuple] | None = None
        """Otherwise, for a group of packed blocks: where each block lies in the source buffer."""
        self.sources_of_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        """The strided views of the source buffer the recipes describe (made with the buffer)."""
        self.index: torch.Tensor | None = None
        """Otherwise the position in the source buffer of each of the vector's elements."""

    def build_views(self) -> None:
        """Views of the vector shaped like the parameters, and the clip blocks (A as [n, r, in], B as
        [n, out, r], s² per pair)."""
        self.views = _unflatten_dense_tensors(self.flat, self.params)
        self.blocks = []
        for (a, b), group in zip(_block_views(self.flat, self.by_shape), self.by_shape.values()):
            scales = torch.tensor([q.scale**2 for q in group], dtype=torch.float32, device=self.flat.device)
            self.blocks.append((a, b, scales))

    def save_missing(self, state: dict) -> list[tuple[torch.Tensor, slice, torch.Tensor]]:
        """The optimizer-state slices (moments, momentum) of the parameters without a gradient, to be put back
        after the step: the per-tensor update does not touch a parameter's state when it has no gradient."""
        saved = []
        if not self.missing:
            return saved
        starts = [0]
        for n in self.numels:
            starts.append(starts[-1] + n)
        for value in state.values():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self.total:
                for i in self.missing:
                    part = slice(starts[i], starts[i + 1])
                    saved.append((value, part, value[part].clone()))
        return saved

    def restore_missing(self, saved: list[tuple[torch.Tensor, slice, torch.Tensor]]) -> None:
        """Parameters without a gradient keep their values and state (as the per-tensor update leaves them)."""
        for i in self.missing:
            self.views[i].copy_(self.params[i])
        for value, part, old in saved:
            value[part].copy_(old)

    def pair_sq_norms(self) -> torch.Tensor:
        """``||s·B·A||_F²`` of every pair of the clip blocks (as `adapters.pair_sq_norms`), in block order."""
        norms = [block_sq_norms(a, b, scales) for a, b, scales in self.blocks]
        return torch.cat(norms) if norms else self.flat.new_zeros(0, dtype=torch.float32)

    # -- optimizer state of the per-tensor layout <-> this vector -------------------------------------------
    def state_from_tensors(self, states: list[dict]) -> dict:
        """One flat state from the per-tensor states of the group's parameters (in the group's own order).
        Elementwise entries are concatenated in the vector's order (zeros where a parameter has none yet); the
        step count must be the same for every parameter that has one."""
        present = [states[i] for i in self.order if states[i]]
        if not present:
            return {}
        steps = {float(st["step"]) for st in present if "step" in st}
        if len(steps) > 1:
            raise ValueError(
                "per-tensor optimizer state with different step counts per parameter cannot become one flat "
                "vector: build the optimizer with flat=False to resume it"
            )
        out = {}
        for key, value in present[0].items():
            if key == "step":
                out[key] = value
            elif torch.is_tensor(value):
                pieces = []
                for i, p in zip(self.order, self.params):
                    v = states[i].get(key)
                    pieces.append((v if v is not None else torch.zeros_like(p)).reshape(-1).to(value))
                out[key] = torch.cat(pieces)
        return out

    def state_to_tensors(self, state: dict) -> list[dict]:
        """The per-tensor states (in the group's own order) of one flat state."""
        out: list[dict] = [{} for _ in self.params]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == sum(self.numels):
                for i, piece, p in zip(self.order, value.split(self.numels), self.params):
                    out[i][key] = piece.view(p.shape).clone()
            else:
                for i in self.order:
                    out[i][key] = value.clone() if torch.is_tensor(value) else value
        return out


def _flat_ok(optimizer_cls: type, param_groups: list[dict]) -> bool:
    """The flat update needs an elementwise torch optimizer and one device and dtype per group."""
    if optimizer_cls not in FLAT_OPTIMIZERS:
        return False
    for group in param_groups:
        params = list(group["params"])
        kinds = {(p.device, p.dtype) for p in params}
        if len(kinds) != 1 or not all(p.is_floating_point() for p in params):
            return False
    return True


def _supports_maximize(optimizer_cls: type) -> bool:
    try:
        return "maximize" in inspect.signature(optimizer_cls.__init__).parameters
    except (TypeError, ValueError):
        return False


class BiLoRAOptimizer(torch.optim.Optimizer):
    """Wraps an inner optimizer over the primary and auxiliary groups and carries out one method per step.

    Build it with `build_optimizer`. Attributes for logging: ``last_grad_norms`` (per role, before clipping)
    and ``last_aux_norm`` (c after the step's clip).
    """

    def __init__(
        self,
        param_groups: list[dict],
        model: ModelOrModels,
        config: BiLoRAConfig,
        method: str,
        optimizer_cls: type[torch.optim.Optimizer],
        max_grad_norm: float | None = None,
        total_steps: int | None = None,
        seed: int = 0,
        flat: bool | None = None,
        **optimizer_kwargs,
    ) -> None:
        self.method = method
        self.config = config
        self.max_grad_norm = max_grad_norm
        self.total_steps = total_steps
        self.seed = seed
        self._models = _models(model)
        sync(self._models)  # packed views re-aliased after a cast, so the groups' dtypes are the real ones
        self._native_maximize = _supports_maximize(optimizer_cls)
        ascend = method == "bilora"
        for group in param_groups:
            if group[ROLE] == "aux" and ascend and self._native_maximize:
                group["maximize"] = True
            group.setdefault(STEP_KEY, 0)
        defaults = {"lr": optimizer_kwargs.get("lr", 1e-3)}
        super().__init__(param_groups, defaults)
        if flat is None:
            flat = _flat_ok(optimizer_cls, self.param_groups)
        elif flat and not _flat_ok(optimizer_cls, self.param_groups):
            raise ConfigError(
                f"flat update needs one of {', '.join(c.__name__ for c in FLAT_OPTIMIZERS)} and parameters of "
                f"one device and dtype per group; got {optimizer_cls.__name__}"
            )
        if not flat and unpack(self._models):
            # Packed storage makes PEFT's B's column views; per-tensor optimizers (bitsandbytes' kernels) want
            # parameters of their own. The fused forward then concatenates per call.
            logger.info("per-tensor optimizer update: packed adapter storage unpacked")
        self._group_params = [list(g["params"]) for g in self.param_groups]
        """Each group's PEFT parameters (its flat vector's tensors; ``param_groups`` lists the trained ones)."""
        self._aux_pairs = branch_pairs(self._models, AUX)
        self._primary_pairs = branch_pairs(self._models, PRIMARY)
        self._flat: list[_FlatGroup] | None = None
        if flat:
            # The wrapper lists the tensors autograd trains (schedulers, GradScaler and accelerate see them);
            # the inner optimizer steps one flat vector per group, with the same hyper-parameters (synced at
            # each step).
            self._flat = [
                _FlatGroup(params, *self._layout(g))
                for g, params in zip(self.param_groups, self._group_params)
            ]
            self._set_source()
            for group, fg in zip(self.param_groups, self._flat):
                group[FLAT_KEY] = fg.layout
            inner_groups = [
                {**self._hyper(g), "params": [fg.flat]} for g, fg in zip(self.param_groups, self._flat)
            ]
            self.inner = optimizer_cls(inner_groups, **optimizer_kwargs)
            for group, inner in zip(self.param_groups, self.inner.param_groups):
                group.update(self._hyper(inner))  # the inner optimizer's defaults (betas, eps, ...)
        else:
            for group in self.param_groups:
                group[FLAT_KEY] = False
            self.inner = optimizer_cls(self.param_groups, **optimizer_kwargs)
            # One set of groups: the wrapper's state_dict is the inner optimizer's.
            self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self.defaults.update(self.inner.defaults)
        self.last_grad_norms: dict[str, float] = {}
        self.last_aux_norm = 0.0
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- state --------------------------------------------------------------------------------------
    @staticmethod
    def _hyper(group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params"}

    def _sync_inner(self) -> None:
        """Flat update: copy the wrapper's hyper-parameters (lr set by a scheduler, step count) to the inner
        optimizer's groups."""
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update(self._hyper(group))

    def _layout(self, group: dict) -> tuple[list[LoraPair], str]:
        """The pairs a group's flat vector is laid out in blocks of, and the tag of that layout: the auxiliary
        branch's (its clip reads them as blocks) and, under the two-branch methods, the primary branch's (so that
        a block of packed layers moves with one strided copy per factor; tagged, so that its fingerprint never
        equals the earlier parameter-order layout's, even where every shape is the same). Fixed by the method,
        not by packing, so a checkpoint resumes with the fused path on or off."""
        if group[ROLE] == "aux":
            return self._aux_pairs, ""
        return (self._primary_pairs, "|primary blocks") if self._aux_pairs else ([], "")

    @property
    def flat(self) -> bool:
        """Whether this optimizer runs the flat update (one vector per param group)."""
        return self._flat is not None

    def state_dict(self) -> dict:
        if self._flat is not None:
            self._sync_inner()
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads state saved by either update: per-tensor state (e.g. a checkpoint from before the flat update)
        is converted into the flat layout and back, so a run resumes whichever way it was saved."""
        groups = state_dict.get("param_groups", [])
        if len(groups) == len(self.param_groups):
            self._check_tensor_state(state_dict)
            if self._flat is not None:
                state_dict = self._to_flat_state(state_dict)
            elif any(g.get(FLAT_KEY, False) for g in groups):
                state_dict = self._to_tensor_state(state_dict)
        self.inner.load_state_dict(state_dict)
        if self._flat is None:
            self.param_groups = self.inner.param_groups
        else:
            for group, inner in zip(self.param_groups, self.inner.param_groups):
                group.update(self._hyper(inner))
        self.state = self.inner.state

    @staticmethod
    def _other_adapters(index: int, group: dict) -> ValueError:
        return ValueError(
            f"optimizer state of param group {index} ({group.get(ROLE)}) was saved for other adapters "
            "(another rank or other target modules)"
        )

    def _to_flat_state(self, state_dict: dict) -> dict:
        """``state_dict`` in the flat layout of this optimizer, checked against its adapters."""
        state, groups = state_dict.get("state", {}), []
        new_state: dict = {}
        for index, (group, fg) in enumerate(zip(state_dict["param_groups"], self._flat)):
            flag = group.get(FLAT_KEY, False)
            if flag:  # flat already: same layout, or at least (older files) the same size
                saved_as = self._saved_layout(index, group, fg)
                for pid in group["params"]:
                    for value in state.get(pid, {}).values():
                        if torch.is_tensor(value) and value.dim() == 1 and value.numel() != fg.total:
                            raise self._other_adapters(index, group)
                    if pid in state:
                        new_state[index] = state[pid]
                        if saved_as is not fg:  # an older layout of the same tensors: reorder
                            new_state[index] = fg.state_from_tensors(saved_as.state_to_tensors(state[pid]))
            else:  # per-tensor (checked by _check_tensor_state): one state per parameter, in the group's order
                flat_state = fg.state_from_tensors([state.get(pid, {}) for pid in group["params"]])
                if flat_state:
                    new_state[index] = flat_state
            groups.append({**group, "params": [index], FLAT_KEY: fg.layout})
        return {**state_dict, "state": new_state, "param_groups": groups}

    def _saved_layout(self, index: int, group: dict, fg: _FlatGroup) -> _FlatGroup:
        """The layout a saved flat group was written in: ``fg`` (this optimizer's), or the layout before the
        primary group was laid out in blocks (same tensors, parameter order); anything else is refused."""
        flag = group.get(FLAT_KEY)
        if not isinstance(flag, str) or flag == fg.layout:
            return fg
        older = _FlatGroup(list(self._group_params[index]))
        if flag == older.layout:
            return older
        raise self._other_adapters(index, group)

    def _check_tensor_state(self, state_dict: dict) -> None:
        """The groups saved by the per-tensor update, against this optimizer's parameters: torch does not
        compare saved state with the parameters' shapes, and a mismatch would fail later with a bare shape
        error (or not at all), so say it here."""
        state = state_dict.get("state", {})
        for index, (group, mine) in enumerate(zip(state_dict["param_groups"], self._group_params)):
            if group.get(FLAT_KEY, False):
                continue
            if len(group["params"]) != len(mine):
                raise self._other_adapters(index, group)
            for pid, param in zip(group["params"], mine):
                for value in state.get(pid, {}).values():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                        raise self._other_adapters(index, group)

    def _to_tensor_state(self, state_dict: dict) -> dict:
        """Flat ``state_dict`` in the per-tensor layout of this optimizer."""
        state, groups = state_dict.get("state", {}), []
        new_state: dict = {}
        next_id = 0
        for index, (group, mine) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            params = self._group_params[index]
            fg = self._saved_layout(index, group, _FlatGroup(list(params), *self._layout(mine)))
            ids = list(range(next_id, next_id + len(fg.params)))
            next_id += len(ids)
            flat_state = state.get(group["params"][0], {}) if group["params"] else {}
            if flat_state:
                for pid, st in zip(ids, fg.state_to_tensors(flat_state)):
                    new_state[pid] = st
            groups.append({**group, "params": ids, FLAT_KEY: False})
        return {**state_dict, "state": new_state, "param_groups": groups}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's, with ``set_to_none`` as one plain loop (torch's costs milliseconds per call over the
        thousands of adapter tensors of an SDXL UNet, and the trainers call it twice a step)."""
        if not set_to_none:
            super().zero_grad(set_to_none)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_flat", None) is not None:
            raise NotImplementedError(
                "the flat update cannot add param groups: build_optimizer(..., flat=False)"
            )
        super().add_param_group(param_group)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (saved with the state dict; flat-lora's ramp and noise seed use it)."""
        return int(self.param_groups[0].get(STEP_KEY, 0))

    def _groups(self, role: str) -> list[dict]:
        return [g for g in self.param_groups if g[ROLE] == role]

    def _params(self, role: str) -> list[torch.Tensor]:
        return [p for g in self._groups(role) for p in g["params"]]

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One optimizer step of the method. ``closure()`` runs forward + backward and returns the loss."""
        if closure is None and self.method not in ONE_PASS_METHODS:
            raise RuntimeError(
                f"method {self.method!r} needs optimizer.step(closure): the closure runs forward and backward "
                "and returns the loss (lora-sam calls it twice, flat-lora perturbs W0 around it)"
            )
        loss = None
        if self.method == "lora-sam":
            loss = self._sam_passes(closure)
        elif self.method == "flat-lora":
            loss = self._flat_lora_pass(closure)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._flat is not None:
            self._flat_step()
        else:
            self._clip_grads()
            self._inner_step()
            if self._aux_pairs and self.config.clip != "none":
                self._clip_aux()
            elif self._aux_pairs:
                self.last_aux_norm = float(pair_sq_norms_batched(self._aux_pairs).sum().sqrt())
        for group in self.param_groups:
            group[STEP_KEY] = group.get(STEP_KEY, 0) + 1
        return loss

    def _inner_step(self) -> None:
        # Ascent without native `maximize` support (e.g. bitsandbytes): negate the auxiliary gradients, which
        # is what torch's `maximize=True` does, and restore them so logged gradients keep their sign.
        negate = self.method == "bilora" and not self._native_maximize
        aux_grads = [p.grad for p in self._params("aux") if p.grad is not None] if negate else []
        for g in aux_grads:
            g.neg_()
        self.inner.step()
        for g in aux_grads:
            g.neg_()

    def _clip_grads(self) -> None:
        """Gradient norms per role; with max_grad_norm, each role is clipped on its own, so the ascent's
        gradient never shrinks the descent's."""
        self.last_grad_norms = {}
        for role in ("primary", "aux"):
            params = [p for p in self._params(role) if p.grad is not None]
            if not params:
                continue
            if self.max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            else:
                norm = grad_norm(params)
            self.last_grad_norms[role] = float(norm)

    def _flat_step(self) -> None:
        """Clip per role, step the inner optimizer on one flat vector per group, clip the auxiliary branch on
        the vectors and copy the result into the trained tensors (module docstring)."""
        sources = self._current_sources()
        loaded = {id(fg): has for source in sources for fg, has in zip(source.groups, source.load_grads())}
        has_grad = [loaded[id(fg)] for fg in self._flat]
        self.last_grad_norms = {}
        for role in ("primary", "aux"):
            grads = [
                fg.flat_grad
                for fg, has, group in zip(self._flat, has_grad, self.param_groups)
                if has and group[ROLE] == role
            ]
            if not grads:
                continue
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if self.max_grad_norm:
                # What clip_grad_norm_ does: coef = max_norm / (norm + 1e-6), clamped to 1.
                coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(coef.to(g.dtype))
            self.last_grad_norms[role] = float(norm)
        self._sync_inner()
        for source in sources:
            source.gather()
        for fg, has in zip(self._flat, has_grad):
            fg.flat.grad = fg.flat_grad if has else None
        saved = [fg.save_missing(self.inner.state.get(fg.flat, {})) for fg in self._flat]
        try:
            self.inner.step()
        finally:
            for fg, kept in zip(self._flat, saved):
                fg.flat.grad = None
                fg.restore_missing(kept)
        if self._aux_pairs:
            self._flat_clip_aux()
        for source in sources:
            source.scatter()
            source.release()
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            group.update(self._hyper(inner))

    def _set_source(self) -> None:
        """Where the flat vectors are read from and written to (one `_FlatSource` per device and dtype of the
        groups' tensors), and the tensors each param group lists: the trained ones -- a packed layer's packed
        tensors (in the first group that has one of its branches: they carry both) instead of PEFT's views of
        them, whose ``requires_grad`` is False."""
        packed, packing = packed_sources(self._models)
        kinds: dict[tuple, list[_FlatGroup]] = {}
        for fg in self._flat:
            kinds.setdefault((fg.params[0].device, fg.params[0].dtype), []).append(fg)
        self._sources = [_FlatSource(groups, self._models, packed, packing) for groups in kinds.values()]
        source_of = {k: v for source in self._sources for k, v in source.source_of.items()}
        seen: set[int] = set()
        for group, params in zip(self.param_groups, self._group_params):
            trained = []
            for p in params:
                tensor = source_of[id(p)]
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    trained.append(tensor)
            group["params"] = trained

    def _current_sources(self) -> list[_FlatSource]:
        """The sources, rebuilt when layers were packed or unpacked after the optimizer was built (the vectors,
        and so the state, keep their layout; the inner optimizer keeps their objects), and their buffers moved
        when the model was moved or cast (as torch optimizers allow; the state moves along)."""
        if any(source.stale() for source in self._sources):
            self._set_source()
        fused = any(g.get("fused") or g.get("capturable") for g in self.inner.param_groups)
        for source in self._sources:
            if not source.moved():
                continue
            source.relayout()
            for fg in source.groups:
                state = self.inner.state.get(fg.flat, {})
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    if key != "step":
                        state[key] = value.to(device=fg.flat.device, dtype=fg.flat.dtype)
                    elif fused:  # fused/capturable AdamW keeps its step count on the parameters' device
                        state[key] = value.to(device=fg.flat.device)
        return self._sources

    def _flat_clip_aux(self) -> None:
        """The auxiliary clip of `fused.clip_aux_` on the flat vectors' pair blocks (no copies): the norms from
        one batched Gram computation per block, the scaling one multiplication per block."""
        groups = [fg for fg, group in zip(self._flat, self.param_groups) if group[ROLE] == "aux"]
        per_group = [fg.pair_sq_norms() for fg in groups]
        sq = torch.cat(per_group)
        if self.config.clip == "none":
            self.last_aux_norm = float(sq.sum().sqrt())
            return
        factors = clip_factors(sq, self.config.rho, self.config.clip)
        offset = 0
        for fg in groups:
            for a, b, _ in fg.blocks:
                f = factors[offset : offset + a.shape[0]]
                a.mul_(f.view(-1, *([1] * (a.dim() - 1))).to(a.dtype))
                b.mul_(f.view(-1, *([1] * (b.dim() - 1))).to(b.dtype))
                offset += a.shape[0]
        self.last_aux_norm = float((sq * factors.pow(4)).sum().sqrt())

    def _clip_aux(self) -> None:
        """Keep the auxiliary perturbation inside rho: one global factor (paper) or one per layer, with the
        norms of all pairs batched and one scaling per block of equally shaped pairs (thousands of tiny tensors
        on SDXL)."""
        if self._flat is None:
            self.last_aux_norm = clip_aux_(self._aux_pairs, self.config.rho, self.config.clip)
            return
        sources = self._current_sources()
        for source in sources:
            source.gather()
        self._flat_clip_aux()
        for source in sources:
            source.scatter()
            source.release()

    # -- lora-sam -----------------------------------------------------------------------------------
    def _sam_passes(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """SAM on the LoRA parameters: pass at w, move to w + rho·g/||g|| (global norm over all LoRA tensors),
        pass again on the same batch, restore w bitwise; the step then uses the second pass's gradients."""
        with torch.enable_grad():
            loss = closure()
        params = [p for p in self._params("primary") if p.grad is not None]
        if not params:
            return loss
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
        scale = self.config.rho / (grad_norm + 1e-12)
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.add_(p.grad * scale.to(p.grad.dtype))
        self.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                closure()
        finally:
            for p, w in zip(params, saved):
                p.copy_(w)
        return loss

    # -- flat-lora ----------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        # Seeded by (seed, step): the same noise on every rank and after a resume.
        gen.manual_seed(self.seed * 1_000_003 + self.step_count)
        return gen

    def _flat_lora_pass(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Flat-LoRA: for each adapted layer and output row i, add eps_ij ~ N(0, sigma_i²) to W0 with
        sigma_i = f_t·rho/sqrt(n_in)·||W'_i||, W' = W0 + s1·B1·A1, f_t = (1 - cos(pi·t/T))/2; run the pass;
        put W0 back bitwise (from a copy: adding and subtracting in bf16 would drift)."""
        t, total = self.step_count, self.total_steps
        f_t = 0.5 * (1.0 - math.cos(math.pi * min(t, total) / total))
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if f_t > 0 and self.config.rho > 0:
            for layer in bilora_layers(self._models):
                weight = layer.get_base_layer().weight
                merged = weight.detach().float() + layer.get_delta_weight(PRIMARY).float()
                rows = merged.reshape(merged.shape[0], -1)
                sigma = f_t * self.config.rho / math.sqrt(rows.shape[1]) * rows.norm(dim=1, keepdim=True)
                noise = torch.randn(
                    rows.shape, generator=self._generator(weight.device), device=weight.device
                )
                saved.append((weight, weight.detach().clone()))
                weight.add_((noise * sigma).reshape(weight.shape).to(weight.dtype))
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for weight, original in saved:
                weight.copy_(original)
        return loss


def build_optimizer(
    model: ModelOrModels | list[tuple[nn.Module, float]],
    config: BiLoRAConfig,
    method: str = "bilora",
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-4,
    *,
    max_grad_norm: float | None = None,
    total_steps: int | None = None,
    seed: int = 0,
    flat: bool | None = None,
    **kwargs,
) -> BiLoRAOptimizer:
    """A torch optimizer that trains the adapters of ``model`` with ``method``.

    Args:
        model: an attached model, several (e.g. UNet and text encoders), or ``(model, lr)`` pairs to give a
            model its own learning rate (diffusers' ``--text_encoder_lr``).
        config: the adapters' config; its rho, clip, aux_lr and aux_weight_decay are used here.
        method: one of lora, bilora, dual-descent, lora-sam, flat-lora.
        optimizer_cls: the inner optimizer class for both groups (the auxiliary one with ``maximize=True``
            under bilora).
        lr: learning rate of the primary group (the auxiliary group uses ``config.aux_lr`` or this).
        max_grad_norm: clip each group's gradient norm separately before the update.
        total_steps: number of optimizer steps T (flat-lora's ramp needs it).
        seed: seed of flat-lora's noise.
        flat: the flat update (module docstring): None = on wherever it gives the same steps (torch's AdamW,
            Adam, SGD; one device and dtype per group), False = the inner optimizer steps every tensor.
        kwargs: passed to ``optimizer_cls`` (betas, eps, weight_decay, ...); weight_decay applies to the
            primary group, ``config.aux_weight_decay`` to the auxiliary one.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    entries = [model] if isinstance(model, nn.Module) else list(model)
    pairs = [e if isinstance(e, tuple) else (e, lr) for e in entries]
    modules = [m for m, _ in pairs]
    has_aux = bool(branch_pairs(modules, AUX))
    if method in AUX_METHODS and not has_aux:
        raise ConfigError(f"method {method!r} needs the auxiliary adapter: attach with aux_rank > 0")
    if method not in AUX_METHODS and has_aux:
        raise ConfigError(
            f"method {method!r} trains no auxiliary branch: attach with aux_rank = 0 "
            f"(BiLoRAConfig.for_method({method!r}) does that)"
        )
    if method == "flat-lora" and not total_steps:
        raise ConfigError("method 'flat-lora' needs total_steps (max_train_steps) for its noise ramp")
    if not any(True for _ in bilora_layers(modules)):
        raise ConfigError("the model has no Bi-LoRA adapters: call attach_bilora(model, config) first")
    groups = []
    for module, module_lr in pairs:
        groups.append({"params": branch_parameters(module, PRIMARY), "lr": module_lr, ROLE: "primary"})
        if has_aux:
            aux = {"params": branch_parameters(module, AUX), "lr": config.aux_lr or module_lr, ROLE: "aux"}
            aux["weight_decay"] = config.aux_weight_decay
            groups.append(aux)
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if (
        optimizer_cls is torch.optim.AdamW
        and "foreach" not in kwargs
        and "fused" not in kwargs
        and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    ):
        # torch's fused AdamW: one kernel for all the tiny adapter tensors (4x faster on CPU here, same result).
        kwargs["fused"] = True
    return BiLoRAOptimizer(
        groups,
        modules,
        config,
        method,
        optimizer_cls,
        max_grad_norm=max_grad_norm,
        total_steps=total_steps,
        seed=seed,
        flat=flat,
        lr=lr,
        **kwargs,
    )


__all__ = ["BiLoRAOptimizer", "build_optimizer", "lora_pair"]
