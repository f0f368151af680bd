"""`BiLoRAOptimizer`: a real `torch.optim.Optimizer` that runs one method (`optim.methods`) per step.

Its param groups are PEFT's adapter tensors, tagged ``group["bilora_role"] = "primary" | "aux"`` (LR
schedulers, GradScaler, accelerate and `transformers.Trainer` take it unchanged). A step is

    loss = method.passes(closure)           forward/backward (one pass; lora-sam two; flat-lora perturbs W0)
    clip each role's gradient norm          `core.clip_grad_norms_` (max_grad_norm)
    inner optimizer step                    primary descends; aux ascends under bilora (``maximize``)
    aux clip                                `core.clip_factors` on `core.block_sq_norms`

The inner optimizer (AdamW by default) steps either one flat vector per group (`optim.flat`, for torch's AdamW,
Adam and SGD) or every tensor (any other optimizer: bitsandbytes, Prodigy, ...). Optimizer state saved by either
loads into the other (`optim.state_layout`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..config import AUX, PRIMARY, BiLoRAConfig, ConfigError
from ..core import blocks_sq_norms, clip_factors, clip_grad_norms_, clipped_norm
from ..peft_glue import ModelOrModels, branch_pairs, models_of, pair_sq_norms
from ..sharding import check_placements, full_tensor, global_view, local, local_like, shard_reduce
from . import state_layout
from .flat import FLAT_OPTIMIZERS, FlatGroup, flat_ok
from .methods import make_method
from .state_layout import FLAT_KEY, ROLE

STEP_KEY = "bilora_step"
"""Param-group entry: optimizer steps taken (it travels with the optimizer's state_dict)."""


def _supports_maximize(optimizer_cls: type) -> bool:
    try:
        return "maximize" in inspect.signature(optimizer_cls.__init__).parameters
    except (TypeError, ValueError):
        return False


class BiLoRAOptimizer(torch.optim.Optimizer):
    """Wraps an inner optimizer over the primary and auxiliary groups and runs one method per step.

    Build it with `build_optimizer`. For logging: ``last_grad_norms`` (per role, before clipping) and
    ``last_aux_norm`` (c after the step's clip)."""

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
        self.strategy = make_method(method)
        self.config = config
        self.max_grad_norm = max_grad_norm
        self.total_steps = total_steps
        self.seed = seed
        self.models = models_of(model)
        self._negate_aux = self.strategy.ascends and not _supports_maximize(optimizer_cls)
        for group in param_groups:
            if group[ROLE] == "aux" and self.strategy.ascends and not self._negate_aux:
                group["maximize"] = True
            group.setdefault(STEP_KEY, 0)
        super().__init__(param_groups, {"lr": optimizer_kwargs.get("lr", 1e-3)})
        self._reduce = shard_reduce(p for g in self.param_groups for p in g["params"])
        """Sum over the ranks holding shards (FSDP): the norms of the step are reduced with it."""
        self._rank = 0
        if self._reduce is not None:
            check_placements(self.models)
            self._rank = torch.distributed.get_rank()
            if flat is False or not flat_ok(optimizer_cls, self.param_groups):
                raise ConfigError(
                    f"sharded (FSDP) training steps each rank's shards of the adapters with an elementwise "
                    f"optimizer ({', '.join(c.__name__ for c in FLAT_OPTIMIZERS)}); got {optimizer_cls.__name__}"
                )
        if flat is None:
            flat = flat_ok(optimizer_cls, self.param_groups)
        elif flat and not flat_ok(optimizer_cls, self.param_groups):
            raise ConfigError(
                f"flat update needs one of {', '.join(c.__name__ for c in FLAT_OPTIMIZERS)} and parameters of "
                f"one device and dtype per group; got {optimizer_cls.__name__}"
            )
        self._group_params = [list(g["params"]) for g in self.param_groups]
        self._aux_pairs = branch_pairs(self.models, AUX)
        self._primary_pairs = branch_pairs(self.models, PRIMARY)
        self._flat: list[FlatGroup] | None = None
        if flat:
            self._flat = [self._flat_group(i) for i in range(len(self.param_groups))]
            for group, fg in zip(self.param_groups, self._flat):
                group[FLAT_KEY] = fg.layout
            inner_groups = [
                {**_hyper(g), "params": [fg.flat]} for g, fg in zip(self.param_groups, self._flat)
            ]
            self.inner = optimizer_cls(inner_groups, **optimizer_kwargs)
            for group, inner in zip(self.param_groups, self.inner.param_groups):
                group.update(_hyper(inner))  # the inner optimizer's defaults (betas, eps, ...)
        else:
            for group in self.param_groups:
                group[FLAT_KEY] = False
            self.inner = optimizer_cls(self.param_groups, **optimizer_kwargs)
            self.param_groups = (
                self.inner.param_groups
            )  # one set of groups: the state_dict is the inner one's
        self.state = self.inner.state
        self.defaults.update(self.inner.defaults)
        self.last_grad_norms: dict[str, float] = {}
        self.last_aux_norm = 0.0
        self._kinds = [
            (g["params"][0].device, g["params"][0].dtype) for g in self.param_groups if g["params"]
        ]
        """Each group's device and dtype (of its first tensor, as the flat update checks them): a change means
        the model was moved or cast after building."""

    def _flat_group(self, index: int) -> FlatGroup:
        """A group's flat layout: the aux group in blocks of its pairs (the clip reads them as blocks), the
        primary group in blocks too under the two-branch methods (tagged, so its fingerprint never equals the
        parameter-order layout's; fixed by the method, so checkpoints resume whatever the forward)."""
        params = self._group_params[index]
        if self.param_groups[index][ROLE] == "aux":
            return FlatGroup(params, self._aux_pairs)
        if self._aux_pairs:
            return FlatGroup(params, self._primary_pairs, "|primary blocks")
        return FlatGroup(params)

    @property
    def flat(self) -> bool:
        """Whether this optimizer runs the flat update (one vector per param group)."""
        return self._flat is not None

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (saved with the state dict; flat-lora's ramp and noise seed use it)."""
        return int(self.param_groups[0].get(STEP_KEY, 0))

    def role_params(self, role: str) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g[ROLE] == role for p in g["params"]]

    # -- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One optimizer step of the method. ``closure()`` runs forward + backward and returns the loss; the
        one-pass methods also step on gradients computed before (``closure=None``)."""
        if closure is None and self.strategy.needs_closure:
            raise RuntimeError(
                f"method {self.method!r} needs optimizer.step(closure): the closure runs forward and backward "
                "and returns the loss (lora-sam calls it twice, flat-lora perturbs W0 around it)"
            )
        loss = self.strategy.passes(self, closure)
        if self._flat is not None:
            self._flat_update()
        else:
            self._tensor_update()
        for group in self.param_groups:
            group[STEP_KEY] = group.get(STEP_KEY, 0) + 1
        return loss

    def _inner_step(self, aux_grads: list[torch.Tensor]) -> None:
        """The inner optimizer's step; ascent without native ``maximize`` (e.g. bitsandbytes) negates the aux
        gradients around it, which is what ``maximize=True`` does."""
        negate = aux_grads if self._negate_aux else []
        if negate:
            torch._foreach_neg_(negate)
        self.inner.step()
        if negate:
            torch._foreach_neg_(negate)

    def _follow_casts(self) -> None:
        """Per-tensor update: a model moved or cast after the optimizer took steps gets its state moved along
        (torch's optimizers would fail on the mismatch; the flat update does the same in `FlatGroup.load`)."""
        kinds = [(g["params"][0].device, g["params"][0].dtype) for g in self.param_groups if g["params"]]
        if kinds == self._kinds:
            return
        fused = any(g.get("fused") or g.get("capturable") for g in self.param_groups)
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in self.inner.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        self.inner.state[p][key] = value.to(device=p.device, dtype=p.dtype)
                    elif torch.is_tensor(value) and key == "step" and fused:  # kept on the params' device
                        self.inner.state[p][key] = value.to(device=p.device)
        self._kinds = kinds

    def _tensor_update(self) -> None:
        self._follow_casts()
        grads = {
            role: [p.grad for p in self.role_params(role) if p.grad is not None]
            for role in ("primary", "aux")
        }
        self.last_grad_norms = clip_grad_norms_(grads, self.max_grad_norm)
        self._inner_step(grads["aux"])
        if not self._aux_pairs:
            return
        sq = pair_sq_norms(self._aux_pairs)
        factors = clip_factors(sq, self.config.rho, self.config.clip)
        scaled = [(pair, f) for pair, f in zip(self._aux_pairs, factors.tolist()) if f != 1.0]
        if scaled:
            torch._foreach_mul_(
                [t for pair, _ in scaled for t in (pair.A_param, pair.B_param)],
                [f for _, f in scaled for _ in (0, 1)],
            )
        self.last_aux_norm = clipped_norm(sq, factors)

    def _flat_update(self) -> None:
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update(_hyper(group))  # lr set by a scheduler, step count
        states = [self.inner.state.get(fg.flat, {}) for fg in self._flat]
        loaded = [fg.load(state) for fg, state in zip(self._flat, states)]
        grads = {role: [] for role in ("primary", "aux")}
        for group, fg, has in zip(self.param_groups, self._flat, loaded):
            if has:
                grads[group[ROLE]].append(fg.flat.grad)
        self.last_grad_norms = clip_grad_norms_(grads, self.max_grad_norm, self._reduce)
        saved = [fg.save_missing(state) for fg, state in zip(self._flat, states)]
        self._inner_step(grads["aux"])
        for fg, kept in zip(self._flat, saved):
            fg.restore_missing(kept)
        aux = [fg for fg, group in zip(self._flat, self.param_groups) if group[ROLE] == "aux"]
        if aux:
            blocks = [block for fg in aux for block in fg.block_views()]
            if self._reduce is None:
                sq = blocks_sq_norms(blocks)
            else:
                sq = blocks_sq_norms([b for fg in aux for b in fg.gram_blocks(self._rank)], self._reduce)
            factors = clip_factors(sq, self.config.rho, self.config.clip)
            offset = 0
            for a, b, _ in blocks:
                f = factors[offset : offset + a.shape[0]]
                a.mul_(f.view(-1, 1, 1).to(a.dtype))
                b.mul_(f.view(-1, 1, 1).to(b.dtype))
                offset += a.shape[0]
            self.last_aux_norm = clipped_norm(sq, factors)
        for fg in self._flat:
            fg.store()

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._flat is not None:
            for group, inner in zip(self.param_groups, self.inner.param_groups):
                inner.update(_hyper(group))
        return self.inner.state_dict()

    def full_state_dict(self) -> dict:
        """`state_dict` with whole tensors: under sharding (FSDP) the per-tensor layout a one-process run would
        save, gathered from every rank (a collective: every rank must call it); else `state_dict`. Loads into
        an optimizer of any number of ranks, sharded or not."""
        state_dict = self.state_dict()
        if self._reduce is None:
            return state_dict
        state_dict = state_layout.to_tensors(state_dict, self._flat, self._group_params)
        params = [p for group in self._group_params for p in group]
        state = {
            pid: {
                k: full_tensor(global_view(v, params[pid])) if _shaped_like(v, params[pid]) else v
                for k, v in st.items()
            }
            for pid, st in sorted(state_dict["state"].items())
        }
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads state saved by either update (`optim.state_layout`), converted into this optimizer's; under
        sharding, also whole-tensor state (`full_state_dict`, or a one-process run's), cut to this rank's
        shards."""
        groups = state_dict.get("param_groups", [])
        if len(groups) == len(self.param_groups):
            state_layout.check_tensor_state(state_dict, self._group_params)
            if self._reduce is not None:
                state_dict = state_layout.localize(state_dict, self._group_params, local_like)
            if self._flat is not None:
                state_dict = state_layout.to_flat(state_dict, self._flat, self._group_params)
            elif any(g.get(FLAT_KEY, False) for g in groups):
                layouts = [self._flat_group(i) for i in range(len(self.param_groups))]
                state_dict = state_layout.to_tensors(state_dict, layouts, self._group_params)
        self.inner.load_state_dict(state_dict)
        if self._flat is None:
            self.param_groups = self.inner.param_groups
        else:
            for group, inner in zip(self.param_groups, self.inner.param_groups):
                group.update(_hyper(inner))
        self.state = self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's, with ``set_to_none`` as one plain loop (torch's costs milliseconds per call over the
        thousands of adapter tensors of an SDXL UNet)."""
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


def _shaped_like(value, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == local(param).shape and value.dim() > 0


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
