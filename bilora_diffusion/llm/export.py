"""The primary branch as a standard PEFT adapter folder, and the merged model.

``adapter_config.json`` + ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them: keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT's names with the adapter name removed,
under the PeftModel's own prefix) and a `LoraConfig` of the primary branch, so
``PeftModel.from_pretrained(base, folder)`` loads it and ``merge_and_unload()`` merges it. Only
`primary_state_dict` is read: the auxiliary branch never leaves training.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..config import AUX, PRIMARY, BiLoRAConfig
from ..peft_glue import lora_config, primary_state_dict
from ..state import atomic_save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""Where a PeftModel keeps the wrapped model (PeftModel.base_model = LoraModel, LoraModel.model = the LM)."""
MERGED_DIR = "merged"


def peft_adapter_state(model: nn.Module) -> dict:
    """The primary branch's tensors under the key names of a saved PEFT adapter."""
    state = {PEFT_PREFIX + key: value.contiguous().cpu() for key, value in primary_state_dict(model).items()}
    if not state or any(AUX in key for key in state):
        raise RuntimeError("the model has no primary adapter to export (or auxiliary tensors leaked into it)")
    return state


def save_peft_adapter(
    model: nn.Module, config: BiLoRAConfig, folder: str | os.PathLike, base_model: str | None
) -> Path:
    """Write the primary branch of ``model`` (attached with ``config``) as a PEFT adapter folder."""
    folder = Path(folder)
    atomic_save_file(peft_adapter_state(model), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    peft_config = lora_config(config, PRIMARY)
    peft_config.base_model_name_or_path = base_model
    peft_config.task_type = "CAUSAL_LM"  # PeftModelForCausalLM / AutoPeftModelForCausalLM
    peft_config.inference_mode = True
    # The init only matters before training; the saved weights replace it on load.
    peft_config.init_lora_weights = True
    peft_config.save_pretrained(str(folder))
    return folder


def save_merged(
    base_model: str,
    adapter_folder: str | os.PathLike,
    target: str | os.PathLike,
    tokenizer=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Load the base (in its checkpoint dtype, on the CPU), apply the exported adapter with PEFT and
    ``merge_and_unload()``, then ``save_pretrained``: the merged model is built by the same path a user takes,
    so it also proves the adapter folder loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_model,
        revision=revision or "main",
        dtype="auto",
        trust_remote_code=trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()
    target = Path(target)
    merged.save_pretrained(str(target))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))
    return target
