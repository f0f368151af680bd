"""Export a Bi-LoRA training output as a standard SDXL LoRA (diffusers and/or kohya format).

    python pipelines/export_lora.py --input output/my_run --format both [--save_dtype fp16] [--fuse]

Same as the ``bilora-export`` console script; see ``bilora_diffusion.sdxl.export``.
"""

from bilora_diffusion.sdxl.export import main

if __name__ == "__main__":
    raise SystemExit(main())
