"""Fine-tune SDXL with Bi-LoRA (or a baseline method): `accelerate launch train_sdxl.py --dataset PATH ...`.

With no arguments it runs the embedded demo (configs/demo.yaml): the tiny SDXL shipped in the package learns a
new concept on a CPU in a few minutes. Options: `python train_sdxl.py --help`; presets in configs/.
"""

import sys
from pathlib import Path

from bilora_diffusion.sdxl import main

if __name__ == "__main__":
    argv = sys.argv[1:] or ["--config", str(Path(__file__).resolve().parent / "configs" / "demo.yaml")]
    main(argv)
