"""The Bi-LoRA algorithm: `bilora` (each rule once, used by every fast path) and `reference` (one step written
plainly, the specification the fast paths are tested against)."""

from .bilora import (
    Reduce,
    block_grams,
    block_sq_norms,
    blocks_sq_norms,
    clip_factors,
    clip_grad_norms_,
    clipped_norm,
    lora_delta,
    lora_delta_conv2d,
    total_norms,
)
from .reference import reference_step

__all__ = [
    "Reduce",
    "block_grams",
    "block_sq_norms",
    "blocks_sq_norms",
    "clip_factors",
    "clip_grad_norms_",
    "clipped_norm",
    "lora_delta",
    "lora_delta_conv2d",
    "reference_step",
    "total_norms",
]
