"""The training methods as small strategies: what each does around the optimizer's update.

Every method's step is "forward/backward pass(es), then the update" (`BiLoRAOptimizer.step`). A method decides
the passes and which branches exist and in which direction they move; the update (`BiLoRAOptimizer`'s, `optim.optimizer`) is shared:

- ``lora``: one pass, the primary branch descends.
- ``bilora``: one pass, the primary descends and the auxiliary ascends, then the aux clip (the paper).
- ``dual-descent``: ablation: both branches descend, same clip.
- ``lora-sam``: SAM on the LoRA tensors: pass, move to w + rho·g/||g||, pass again on the same batch, restore w
  bitwise; the update uses the second pass's gradients (2 passes).
- ``flat-lora``: random perturbation of the merged weight in full weight space, per-row sigma ramped over
  training, one pass, W0 restored bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..config import METHODS, PRIMARY
from ..core import total_norms
from ..peft_glue import bilora_layers, lora_pair
from ..sharding import full_tensor, is_sharded, local, row_slice

if TYPE_CHECKING:
    from .optimizer import BiLoRAOptimizer

Closure = Callable[[], torch.Tensor]


class Method:
    """Plain LoRA: one pass (the closure, or gradients the caller computed), the primary branch descends."""

    name = "lora"
    ascends = False
    """Whether the auxiliary branch steps along +gradient."""
    needs_closure = False
    """Whether ``step()`` needs the closure (the method runs the passes itself)."""

    def passes(self, opt: BiLoRAOptimizer, closure: Closure | None) -> torch.Tensor | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class BiLoRA(Method):
    name, ascends = "bilora", True


class DualDescent(Method):
    name = "dual-descent"


class LoRASAM(Method):
    """SAM on the LoRA parameters (global gradient norm over all of them)."""

    name, needs_closure = "lora-sam", True

    def passes(self, opt: BiLoRAOptimizer, closure: Closure) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        params = [p for p in opt.role_params("primary") if p.grad is not None]
        if not params:
            return loss
        grads = [local(p.grad) for p in params]
        params = [local(p) for p in params]  # sharded (FSDP): this rank's shards; ||g|| summed over the ranks
        (norm,) = total_norms([grads], opt._reduce)
        scale = opt.config.rho / (norm + 1e-12)
        saved = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.add_(g * scale.to(g.dtype))
        opt.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                closure()
        finally:
            for p, w in zip(params, saved):
                p.copy_(w)
        return loss


class FlatLoRA(Method):
    """For each adapted layer and output row i, eps_ij ~ N(0, sigma_i²) added to W0 with
    sigma_i = f_t·rho/sqrt(n_in)·||W'_i||, W' = W0 + s1·B1·A1, f_t = (1 - cos(pi·t/T))/2; the pass; W0 put back
    bitwise (from a copy: adding and subtracting in bf16 would drift). Noise seeded by (seed, step): the same on
    every rank and after a resume."""

    name, needs_closure = "flat-lora", True

    def __init__(self) -> None:
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    def passes(self, opt: BiLoRAOptimizer, closure: Closure) -> torch.Tensor:
        t, total = opt.step_count, opt.total_steps
        f_t = 0.5 * (1.0 - math.cos(math.pi * min(t, total) / total))
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if f_t > 0 and opt.config.rho > 0:
            for layer in bilora_layers(opt.models):
                param = layer.get_base_layer().weight
                weight = local(param)  # sharded (FSDP): this rank's rows, whole
                rows = slice(None)
                if is_sharded([param]):
                    rows = row_slice(param.shape[0], param)
                    delta = _sharded_delta(layer)[rows]
                else:
                    delta = layer.get_delta_weight(PRIMARY)
                shape2d = (weight.shape[0], param.shape[1:].numel())  # explicit: a rank may hold no rows
                merged = weight.detach().float().reshape(shape2d) + delta.float().reshape(shape2d)
                sigma = f_t * opt.config.rho / math.sqrt(merged.shape[1]) * merged.norm(dim=1, keepdim=True)
                gen = self._generator(weight.device, opt.seed * 1_000_003 + t)
                # the whole weight's noise, then this rank's rows: the same draw as one process makes
                noise = torch.randn(param.shape[0], merged.shape[1], generator=gen, device=weight.device)[
                    rows
                ]
                saved.append((weight, weight.detach().clone()))
                weight.add_((noise * sigma).reshape(weight.shape).to(weight.dtype))
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for weight, original in saved:
                weight.copy_(original)
        return loss


def _sharded_delta(layer) -> torch.Tensor:
    """The primary branch's s1·B1·A1 of a layer whose factors are sharded, as [out, in·kh·kw] (an embedding's
    [num_embeddings, dim]): from the whole factors (one all-gather of each; they are small)."""
    pair = lora_pair(layer, PRIMARY)
    a, b = full_tensor(pair.A_param.detach()), full_tensor(pair.B_param.detach())
    if pair.embedding:
        return (b @ a).T * pair.scale
    return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * pair.scale


REGISTRY: dict[str, type[Method]] = {m.name: m for m in (Method, BiLoRA, DualDescent, LoRASAM, FlatLoRA)}
"""Method name -> strategy class (the names of `config.METHODS`)."""
assert tuple(REGISTRY) == METHODS, "config.METHODS and the registry must name the same methods"


def make_method(name: str) -> Method:
    return REGISTRY[name]()
