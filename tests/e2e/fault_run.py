"""Run by tests/e2e/test_faults.py (and tests/e2e/test_sharding.py under torchrun) in a subprocess: a trainer
with a kill -9 injected. The SDXL trainer, or the LLM one with FAULT_TRAINER=llm.

`python tests/e2e/fault_run.py step N ARGS...`        SIGKILL right after optimizer step N completes;
`python tests/e2e/fault_run.py checkpoint N ARGS...`  SIGKILL while checkpoint-N is being written (after its
                                                  adapter file, before its optimizer state and rename).
"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import bilora_diffusion.checkpoint as checkpoint  # noqa: E402
import bilora_diffusion.training as training  # noqa: E402
from bilora_diffusion.llm import main as llm_main  # noqa: E402
from bilora_diffusion.sdxl import main as sdxl_main  # noqa: E402


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(kind: str, n: int) -> None:
    if kind == "nan":
        from bilora_diffusion.llm.train import LLMTrainer

        original_loss, calls = LLMTrainer.loss, [0]

        def loss(self, micro_batch):
            value = original_loss(self, micro_batch)
            calls[0] += 1
            if calls[0] == n and self.rank == self.world - 1:
                return value * float("nan")
            return value

        LLMTrainer.loss = loss
        return
    if kind == "step":
        original = training.Progress.update

        def update(self, step, *args, **kwargs):
            original(self, step, *args, **kwargs)
            if step == n:
                kill()

        training.Progress.update = update
    else:
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if str(path).endswith("optimizer.pt") and f".checkpoint-{n}." in str(path):
                kill()
            return real_save(obj, path, *args, **kwargs)

        checkpoint.torch.save = save


if __name__ == "__main__":
    # Same thread count as the pytest process (conftest): float reductions, hence bits, depend on it.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    inject(sys.argv[1], int(sys.argv[2]))
    main = llm_main if os.environ.get("FAULT_TRAINER") == "llm" else sdxl_main
    main(sys.argv[3:])
