"""Fine-tune a causal LM with Bi-LoRA (or a baseline method):
`accelerate launch train_llm.py --model NAME_OR_PATH --dataset FILE_OR_HUB_ID --method bilora ...`.

With no arguments it runs the offline demo (configs/llm_demo.yaml): the tiny causal LM shipped in the package
learns to subtract in word problems on a CPU in about a minute, and the held-out accuracy is logged without and
with the LoRA. Writes a standard PEFT adapter (the primary branch) to --output_dir. Options:
`python train_llm.py --help`; presets in configs/llm_*.yaml; evaluation: `python -m bilora_diffusion.llm.evaluate
--help`.
"""

import sys
from pathlib import Path

from bilora_diffusion.llm import main

if __name__ == "__main__":
    argv = sys.argv[1:] or ["--config", str(Path(__file__).resolve().parent / "configs" / "llm_demo.yaml")]
    main(argv)
