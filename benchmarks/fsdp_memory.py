"""Memory per GPU of Bi-LoRA fine-tuning of an 8B model under DDP and FSDP: an estimate from parameter counts.

The model is built on the meta device (no weights, no download) from Llama-3.1-8B's published config (or any
``--config`` config.json), the adapters attached with the preset's ranks and target modules, and the bytes
counted: base weights in bf16; per adapter parameter 4 (fp32 value) + 4 (gradient) + 8 (AdamW's two moments)
+ 8 (the flat update's vector and gradient, freed after each step on CUDA); under FSDP everything divided by
the number of GPUs, plus two gathered blocks in flight (the one computing and the one prefetched). Activations
are left out: they depend on batch size, sequence length and gradient checkpointing, not on the sharding.

    python benchmarks/fsdp_memory.py                      # Llama-3.1-8B, configs/llm_llama31_8b_instruct.yaml
    python benchmarks/fsdp_memory.py --model_config path/to/config.json --preset configs/llm_llama2_7b_math.yaml
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bilora_diffusion import BiLoRAConfig, attach_bilora  # noqa: E402
from bilora_diffusion.options import OptionError, opt, run_cli  # noqa: E402
from bilora_diffusion.sharding import shard_units  # noqa: E402

LLAMA_31_8B = dict(  # meta-llama/Llama-3.1-8B config.json
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
ADAPTER_BYTES = 4 + 4 + 8 + 8
BASE_BYTES = 2  # bf16


def counts(config, preset: dict) -> dict:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    base = sum(p.numel() for p in model.parameters())
    unit = max(sum(p.numel() for p in u.parameters()) for u in shard_units(model))
    bilora = BiLoRAConfig(
        rank=preset["rank"], alpha=preset.get("lora_alpha", preset["rank"]), aux_rank=preset.get("aux_rank", preset["rank"]),
        target_modules=preset["target_modules"],
    )  # fmt: skip
    with torch.device("meta"):
        attach_bilora(model, bilora)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"base": base, "largest_block": unit, "adapters": adapters}


def table(c: dict, gpus: list[int]) -> str:
    gib = 2**30
    rows = ["| mode | GPUs | base weights | adapters + grads + AdamW | gathered blocks | total (no activations) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    base, adapters, block = (
        c["base"] * BASE_BYTES,
        c["adapters"] * ADAPTER_BYTES,
        2 * c["largest_block"] * BASE_BYTES,
    )
    rows.append(
        f"| DDP | any | {base / gib:.1f} GiB | {adapters / gib:.2f} GiB | - | {(base + adapters) / gib:.1f} GiB |"
    )
    for n in gpus:
        total = base / n + adapters / n + block
        rows.append(
            f"| FSDP | {n} | {base / n / gib:.2f} GiB | {adapters / n / gib:.3f} GiB | {block / gib:.2f} GiB | {total / gib:.1f} GiB |"
        )
    return "\n".join(rows)


@dataclass
class MemoryOptions:
    """Options of this estimate (the project's typed options: ``--help``, ``--config FILE.yaml``)."""

    usage = (
        "usage: python benchmarks/fsdp_memory.py [--config CONFIG.json] [--preset PRESET.yaml] [--gpus N ...]"
    )

    model_config: str | None = opt(
        None, "A model's config.json (default: Llama-3.1-8B's numbers).", path=True
    )
    preset: str = opt(
        str(ROOT / "configs" / "llm_llama31_8b_instruct.yaml"), "The training preset (ranks, targets)."
    )
    gpus: list[int] = opt([2, 4, 8], "FSDP world sizes to tabulate.")

    def validate(self) -> None:
        if not Path(self.preset).is_file():
            raise OptionError(f"--preset: no such file {self.preset}")
        if not self.gpus or min(self.gpus) < 1:
            raise OptionError(f"--gpus: positive world sizes, got {self.gpus}")


def run(args: MemoryOptions) -> dict:
    config = (
        AutoConfig.from_pretrained(args.model_config) if args.model_config else LlamaConfig(**LLAMA_31_8B)
    )
    preset = yaml.safe_load(Path(args.preset).read_text())
    c = counts(config, preset)
    print(json.dumps({k: f"{v / 1e6:.1f}M" for k, v in c.items()}))
    print(table(c, args.gpus))
    return c


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, MemoryOptions, argv, prog="fsdp_memory.py")


if __name__ == "__main__":
    main()
