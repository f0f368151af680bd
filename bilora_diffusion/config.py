"""Typed options of the Bi-LoRA core.

`BiLoRAConfig` is the single source of truth for the adapter and method hyper-parameters: the SDXL and LLM
trainers' options take every one of its fields under the same name, default and help text
(`bilora_diffusion.options.TrainOptions`), so a field documented here is documented everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

METHODS = ("lora", "bilora", "dual-descent", "lora-sam", "flat-lora")
"""Training methods of the toolkit (`bilora_diffusion.optim.methods`): one-pass methods first, then the two baselines that need a
closure (lora-sam: two passes; flat-lora: perturbs W0 before its one pass)."""

ONE_PASS_METHODS = ("lora", "bilora", "dual-descent")
AUX_METHODS = ("bilora", "dual-descent")
"""Methods that train an auxiliary branch; the others run with aux_rank = 0."""

CLIP_MODES = ("global", "layer", "none")
INIT_MODES = ("default", "gaussian", "pissa", "olora", "orthogonal")

PRIMARY = "default"
"""PEFT adapter name of the primary branch: every stock PEFT/diffusers save path exports exactly this one."""
AUX = "bilora_aux"
"""PEFT adapter name of the auxiliary (ascending) branch; it never leaves training."""


def _option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A field with its help text, as the trainers' options read it (their --help, choices checks and README
    come from here: `bilora_diffusion.options.TrainOptions` takes every field of `BiLoRAConfig`)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BiLoRAConfig:
    """Adapter and method hyper-parameters of Bi-LoRA (Liu et al., ICLR 2026, arXiv 2508.19564).

    The model trains ``W = W0 + s1·B1·A1 + s2·B2·A2`` with ``s1 = alpha / rank`` and
    ``s2 = aux_alpha / aux_rank``; (B1, A1) descends, (B2, A2) ascends and is kept inside
    ``sqrt(sum_j ||s2·B2_j·A2_j||_F²) <= rho``.
    """

    rank: int = _option(4, "Rank r1 of the primary LoRA (the one exported). Paper: 4 for SDXL, 8 for LLMs.")
    alpha: float = _option(8.0, "LoRA alpha of the primary branch; its scale is s1 = alpha / rank.")
    aux_rank: int | None = _option(
        None,
        "Rank r2 of the auxiliary (perturbation) branch. None = same as rank (the paper's default); 0 = no "
        "auxiliary branch (plain LoRA and the lora-sam / flat-lora baselines).",
    )
    aux_alpha: float | None = _option(
        None, "LoRA alpha of the auxiliary branch (s2 = aux_alpha / aux_rank). None = alpha."
    )
    target_modules: Sequence[str] | str = _option(
        ["to_q", "to_k", "to_v", "to_out.0"],
        "Module names (suffix match, as in PEFT) or one regular expression (full match) to adapt.",
    )
    dropout: float = _option(0.0, "LoRA dropout on the adapters' input (paper: 0).")
    init: str = _option(
        "default",
        "Initialisation of the primary branch: PEFT's init_lora_weights (default = Kaiming-uniform A and zero "
        "B). The auxiliary B2 always starts at zero.",
        choices=INIT_MODES,
    )
    rho: float = _option(
        0.05,
        "Radius of the auxiliary perturbation (paper: 0.05). Also the SAM radius of lora-sam and the noise "
        "scale of flat-lora.",
    )
    clip: str = _option(
        "global",
        "How the auxiliary branch is kept inside rho: global (one norm over all modules, the paper's method), "
        "layer (each module on its own, an ablation) or none.",
        choices=CLIP_MODES,
    )
    aux_lr: float | None = _option(
        None,
        "Learning rate of the auxiliary (ascent) group. None = the primary learning rate (paper: eta2 = eta1).",
    )
    aux_weight_decay: float = _option(
        0.0, "Weight decay of the auxiliary group (the primary group uses the optimizer's own weight decay)."
    )
    fused: bool = _option(
        True,
        "Compute the branches of a layer in one low-rank product (bilora_diffusion.fused): "
        "y = W0·x + ((x·[A1; A2]ᵀ) ⊙ v)·[B1, B2]ᵀ with v = [s1]*r1 + [s2]*r2 (for plain LoRA the same single "
        "product): the same parameters, gradients, optimizer and export as PEFT's per-adapter forward, at about "
        "the cost of one adapter. PEFT's own forward runs whenever the fused one would not be exact (a branch "
        "disabled, adapters disabled or merged, DoRA, dropout > 0, a LoRA bias, layers other than Linear and "
        "Conv2d). False = always PEFT's forward.",
    )
    use_dora: bool = _option(
        False,
        "The primary branch is DoRA (PEFT's use_dora=True: W0 + s1·B1·A1 renormalised per output row to a "
        "trained magnitude vector); the auxiliary branch stays plain LoRA, so the global clip bounds the same "
        "perturbation. The magnitudes train with the primary group and are exported with it.",
    )

    def __post_init__(self) -> None:
        if self.aux_rank is None:
            self.aux_rank = self.rank
        if self.aux_alpha is None:
            self.aux_alpha = self.alpha
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first out-of-range option."""
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.aux_rank, int) or self.aux_rank < 0:
            raise ConfigError(f"aux_rank must be an integer >= 0, got {self.aux_rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if not self.aux_alpha > 0:
            raise ConfigError(f"aux_alpha must be > 0, got {self.aux_alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.rho >= 0:
            raise ConfigError(f"rho must be >= 0, got {self.rho!r}")
        if self.clip not in CLIP_MODES:
            raise ConfigError(f"clip must be one of {', '.join(CLIP_MODES)}, got {self.clip!r}")
        if self.init not in INIT_MODES:
            raise ConfigError(f"init must be one of {', '.join(INIT_MODES)}, got {self.init!r}")
        if self.aux_lr is not None and not self.aux_lr > 0:
            raise ConfigError(f"aux_lr must be > 0 (or None for the primary lr), got {self.aux_lr!r}")
        if not self.aux_weight_decay >= 0:
            raise ConfigError(f"aux_weight_decay must be >= 0, got {self.aux_weight_decay!r}")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora and self.init in ("pissa", "olora"):
            raise ConfigError(f"use_dora does not combine with init={self.init!r}")

    @property
    def scale(self) -> float:
        """s1 = alpha / rank."""
        return self.alpha / self.rank

    @property
    def aux_scale(self) -> float:
        """s2 = aux_alpha / aux_rank (0 when there is no auxiliary branch)."""
        return self.aux_alpha / self.aux_rank if self.aux_rank else 0.0

    def for_method(self, method: str) -> BiLoRAConfig:
        """The config a method actually trains with: lora, lora-sam and flat-lora have no auxiliary branch."""
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if method in AUX_METHODS:
            if self.aux_rank == 0:
                raise ConfigError(f"method {method!r} needs an auxiliary branch: aux_rank must be > 0")
            return self
        return BiLoRAConfig(**{**asdict(self), "aux_rank": 0})

    def to_dict(self) -> dict:
        return asdict(self)
