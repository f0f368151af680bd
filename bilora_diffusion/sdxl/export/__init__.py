"""Export the primary branch of a Bi-LoRA training (W0 + s1·B1·A1) as a standard SDXL LoRA.

Two files, both loadable by stock tools:

- ``pytorch_lora_weights.safetensors`` (`diffusers`): written by ``StableDiffusionXLPipeline.save_lora_weights``
  with the LoRA adapter metadata in the header, so that alpha != rank reloads at the right scale.
- ``<output_name>.safetensors`` (`kohya`): kohya's SDXL format, the one ComfyUI, A1111 and Forge users load.

By role: `collect` (the primary LoRA out of in-memory models or a training folder), `validate` (every check
before a byte is written), `diffusers` and `kohya` (the writers; `diffusers` also fuses into a pipeline),
`write` (the entry points `export_lora` and `export_from_folder`), `verify` (untrusted LoRA files, for
``bilora-generate``) and `cli` (``bilora-export``). The auxiliary branch never leaves training.
"""

from ...errors import ExportError
from .cli import ExportOptions, main
from .collect import LoraModule, LoraSet, collect_primary, lora_modules, read_training_output
from .diffusers import DIFFUSERS_FILE, FUSED_DIR, fuse_into_pipeline, write_diffusers
from .kohya import DEFAULT_OUTPUT_NAME, kohya_metadata, kohya_state_dict, training_metadata, write_kohya
from .validate import FORMATS, SAVE_DTYPES, validate
from .verify import check_lora_file, lora_file
from .write import default_output, export_from_folder, export_lora, write_lora

__all__ = [
    "DEFAULT_OUTPUT_NAME",
    "DIFFUSERS_FILE",
    "FORMATS",
    "FUSED_DIR",
    "SAVE_DTYPES",
    "ExportError",
    "ExportOptions",
    "LoraModule",
    "LoraSet",
    "check_lora_file",
    "collect_primary",
    "default_output",
    "export_from_folder",
    "export_lora",
    "fuse_into_pipeline",
    "kohya_metadata",
    "kohya_state_dict",
    "lora_file",
    "lora_modules",
    "main",
    "read_training_output",
    "training_metadata",
    "validate",
    "write_diffusers",
    "write_kohya",
    "write_lora",
]
