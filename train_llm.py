"""Fine-tune a causal LM with Bi-LoRA (or a baseline method):
`accelerate launch train_llm.py --model NAME_OR_PATH --dataset FILE_OR_HUB_ID --method bilora ...`.

Writes a standard PEFT adapter (the primary branch) to --output_dir. Options: `python train_llm.py --help`;
presets in configs/llm_*.yaml; evaluation: `python -m bilora_diffusion.llm.evaluate --help`.
"""

import sys

from bilora_diffusion.llm import main

if __name__ == "__main__":
    main(sys.argv[1:])
