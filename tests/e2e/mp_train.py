"""Run by test_two_processes_*: `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/e2e/mp_train.py OUT ARGS...`.

Trains with the SDXL trainer, then checks across ranks that the adapters (auxiliary included) are identical,
and every rank writes what it saw to OUT/mp_report_<rank>.json.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bilora_diffusion.options import parse_options  # noqa: E402
from bilora_diffusion.peft_glue import unwrap  # noqa: E402
from bilora_diffusion.sdxl.options import SDXLOptions  # noqa: E402
from bilora_diffusion.sdxl.train import SDXLTrainer  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    trainer = SDXLTrainer(parse_options(SDXLOptions, argv))
    trainer.setup()
    result = trainer.train()
    unet = unwrap(trainer.models["unet"])
    digest = hashlib.sha256()
    for name, p in sorted(unet.named_parameters()):
        if "lora_" in name:
            digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    # accelerate's end_training() has destroyed the process group: each rank writes its own report.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    files = sorted(p.name for p in Path(trainer.opt.output_dir).iterdir())
    report = {"world": world, "digest": digest.hexdigest(), "losses": result.losses, "files": files}
    (report_dir / f"mp_report_{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
