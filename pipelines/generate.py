"""Render prompts with the stock StableDiffusionXLPipeline and an exported LoRA.

    python pipelines/generate.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --lora output/my_run/bilora_sdxl.safetensors --prompt "a 3d icon of a fox" --seed 0 --seed 1 --compare

Same as the ``bilora-generate`` console script; see ``bilora_diffusion.sdxl.generate``.
"""

from bilora_diffusion.sdxl.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
