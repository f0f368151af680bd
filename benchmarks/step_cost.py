"""Step cost of every method: time per optimizer step and peak memory, as ratios to LoRA (issue 8, item 1).

Each variant is the library's real training step: the SDXL denoising loss as `SDXLTrainer.loss` computes it
(noise, timesteps, ``add_noise``, the text encoders when trained, the UNet, `denoising_loss`), run by
`bilora_diffusion.training.MethodStep` on the optimizer of `make_optimizer` (AdamW with the trainer's
defaults, per-group gradient clipping at 1.0) at equal primary rank (4, alpha 8; aux rank 4).

Time: every variant has its own copy of the same model (same seed); the variants run interleaved, one step
each per round (A B C A B C ...), so slow phases of a shared machine hit all of them. Reported: the median
step time after warm-up, and the median over rounds of the per-round ratio to lora (paired, the robust one).

Memory: on a GPU, ``torch.cuda.max_memory_allocated`` over the measured steps of one variant at a time (the
others not built yet): weights, adapters, gradients, optimizer state and activations. On a CPU, the peak RSS
of a fresh subprocess per variant, with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns large blocks to
the OS, which makes peak RSS repeat instead of reflecting fragmentation): total peak, and the growth over
the RSS just before the first step (what the step adds: gradients, optimizer state, activations).

    python benchmarks/step_cost.py --model sdxl-topology-small --quick           # CPU, a few minutes
    python benchmarks/step_cost.py --model sdxl-topology-small --train_text_encoder
    python benchmarks/step_cost.py --model sdxl-widths-shallow --resolution 512  # CPU: SDXL's real widths
    python benchmarks/step_cost.py --model sdxl --resolution 1024                 # GPU: bf16, checkpointing

Also reported per variant: what its training holds (``held``, by tensor storage: the adapters, one gradient
per adapter tensor as at the end of a backward, the optimizer's state and its own buffers), and for bilora
``(held - lora's held) / (16 bytes x auxiliary parameters)``: 16 bytes (fp32 weight, gradient, two AdamW
moments) is the least an auxiliary parameter can cost, so 1.00 is the physical limit.

Outputs ``benchmarks/results/step_cost_<model>_<resolution>[_w<widths>][_te][_pertensor][_quick].{json,png}``
and a Markdown table on stdout. Results and their reading: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # "modules that should be kept in float32: []" x14

import torch
from torch import nn

from bilora_diffusion import attach_bilora, bilora_layers
from bilora_diffusion.config import AUX, PRIMARY
from bilora_diffusion.errors import OptionError
from bilora_diffusion.fused import disable_fused, enable_fused, is_fused
from bilora_diffusion.options import opt, run_cli
from bilora_diffusion.sdxl.loss import MicroBatch, draw_noise, micro_batch_loss
from bilora_diffusion.sdxl.models import encode_prompt, tokenize
from bilora_diffusion.sdxl.options import SDXLOptions
from bilora_diffusion.testing import local_clip_tokenizer
from bilora_diffusion.training import MethodStep, cast_trainable_to_fp32, make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"

VARIANTS: dict[str, tuple[str, str]] = {
    # name: (method, forward); forward "peft" = PEFT's per-adapter forward, "fused" = bilora_diffusion.fused
    "lora": ("lora", "fused"),
    "bilora": ("bilora", "fused"),
    "bilora-unfused": ("bilora", "peft"),
    "dual-descent": ("dual-descent", "fused"),
    "lora-sam": ("lora-sam", "fused"),
    "flat-lora": ("flat-lora", "fused"),
    "lora-peft": ("lora", "peft"),
}
"""Every method on the library's default, the fused forward (one low-rank product per layer; for lora the
single-LoRA fast path), so bilora is compared like-for-like. ``bilora-unfused`` and ``lora-peft`` are
references: the same methods on PEFT's own per-adapter forward."""

# -- models -------------------------------------------------------------------------------------------------
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    norm_num_groups=32,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
"""stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (non-default fields): 2,567,463,684 parameters."""
SDXL_TEXT = (
    dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        projection_dim=768,
        vocab_size=49408,
    ),
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
        vocab_size=49408,
    ),
)
"""CLIP ViT-L/14 (123,060,480 parameters) and OpenCLIP ViT-bigG/14 with projection (694,659,840)."""

SMALL_UNET = {
    **SDXL_UNET,
    "sample_size": 32,
    "block_out_channels": (64, 128, 128),
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 64 + 128,
    "addition_time_embed_dim": 16,
    "projection_class_embeddings_input_dim": 6 * 16 + 128,
}
"""SDXL's block structure (three levels, transformer depths 1/2/10 and 10 in the middle block, 2 resnets
per level) at 1/5 .. 1/10 of its widths."""
SMALL_TEXT = (
    dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=12,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        projection_dim=64,
    ),
    dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=32,
        num_attention_heads=4,
        hidden_act="gelu",
        projection_dim=128,
    ),
)

SHALLOW_UNET = {**SDXL_UNET, "transformer_layers_per_block": (1, 1, 1)}
"""SDXL's real widths (320/640/1280 channels, heads of 64, cross-attention 2048, SDXL's micro-conditioning),
with one transformer block per level and in the middle instead of 1/2/10 and 10: the per-layer costs of
the real model at a depth a CPU steps in seconds."""
SHALLOW_TEXT = tuple({**cfg, "num_hidden_layers": 1} for cfg in SDXL_TEXT)
"""Both text encoders at their real widths with one layer each: the UNet's real conditioning shapes (they
are frozen and their outputs cached in this model's runs unless --train_text_encoder)."""

MODELS = {
    "sdxl-topology-small": (SMALL_UNET, SMALL_TEXT),
    "sdxl-widths-shallow": (SHALLOW_UNET, SHALLOW_TEXT),
    "sdxl": (SDXL_UNET, SDXL_TEXT),
}


def build_components(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    unet_widths: tuple[int, ...] | None = None,
) -> dict:
    """UNet and both text encoders with random weights (same seed = same weights), built on ``device``.
    ``unet_widths`` overrides the UNet's block_out_channels (heads of 32 channels)."""
    from diffusers import DDPMScheduler

    unet_cfg, text_cfgs = MODELS[model]
    if unet_widths:
        heads = tuple(max(1, w // 32) for w in unet_widths)
        unet_cfg = {**unet_cfg, "block_out_channels": tuple(unet_widths), "attention_head_dim": heads}
    tokenizer = local_clip_tokenizer()
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    # Built directly in the weights' dtype: SDXL's UNet in float32 would be a 10 GB transient per copy.
    torch.set_default_dtype(dtype)
    try:
        unet, encoders = _build_models(unet_cfg, text_cfgs, len(tokenizer), device)
    finally:
        torch.set_default_dtype(default_dtype)
    for m in (unet, *encoders):
        m.requires_grad_(False)
        m.to(dtype)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return {
        "unet": unet,
        "text_encoders": encoders,
        "tokenizers": [tokenizer, tokenizer],
        "scheduler": scheduler,
    }


def _build_models(unet_cfg: dict, text_cfgs: tuple, vocab_size: int, device: torch.device) -> tuple:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        encoders = []
        for cls, cfg in zip((CLIPTextModel, CLIPTextModelWithProjection), text_cfgs):
            # Token ids come from a local tokenizer (no download): bos 0, eos 1, all < vocab_size.
            config = CLIPTextConfig(
                **{"vocab_size": vocab_size, **cfg},
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
            encoders.append(cls(config))
    return unet, encoders


# -- one variant's training step ------------------------------------------------------------------------------
CLOCK = time.perf_counter
"""The step clock: wall time on a GPU (after a synchronize); on a CPU the process's CPU time (one torch
thread: the step's own compute, not the time other jobs held the core), set by `main`."""


class TimedMethodStep(MethodStep):
    """`MethodStep` that also times its forward/backward passes (``passes_time``, seconds, summed)."""

    passes_time = 0.0

    def _passes(self, loss_fn, micro_batches, keys):
        start = CLOCK()
        try:
            return super()._passes(loss_fn, micro_batches, keys)
        finally:
            _sync()
            self.passes_time += CLOCK() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Runner:
    """A model with one variant's adapters, its optimizer and the trainer's loss; ``step()`` = one step."""

    def __init__(self, args: StepCostOptions, variant: str, comps: dict, accelerator) -> None:
        method, forward = VARIANTS[variant]
        self.args, self.variant, self.accelerator = args, variant, accelerator
        self.unet = comps["unet"]
        self.encoders = comps["text_encoders"]
        self.tokenizers = comps["tokenizers"]
        self.scheduler = comps["scheduler"]
        options = SDXLOptions(
            method=method,
            rank=4,
            alpha=8.0,
            train_text_encoder=args.train_text_encoder,
            report_to="none",
        )
        trained: dict[str, nn.Module] = {"unet": self.unet}
        if args.train_text_encoder:
            trained |= {"text_encoder": self.encoders[0], "text_encoder_2": self.encoders[1]}
        for name, model in trained.items():
            targets = options.target_modules if name == "unet" else options.text_encoder_target_modules
            attach_bilora(model, options.bilora_config(targets))
            disable_fused(model)  # the variant decides: fused pair, fused single LoRA, or PEFT's forward
            if forward == "fused":
                enable_fused(model, (PRIMARY, AUX) if method != "lora" else (PRIMARY,))
        cast_trainable_to_fp32(*trained.values())
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if args.train_text_encoder:
                for te in self.encoders:
                    te.gradient_checkpointing_enable()
        self.fused_layers = sum(is_fused(layer) for layer in bilora_layers(list(trained.values())))
        model_lrs = [(m, options.learning_rate) for m in trained.values()]
        config = options.bilora_config(options.target_modules)  # the trainer passes the UNet's config
        self.optimizer = make_optimizer(
            options, model_lrs, config, total_steps=1000, world_size=1, flat=not args.per_tensor_update
        )
        self.step_fn = TimedMethodStep(accelerator, self.optimizer, list(trained.values()))
        self.dtype = next(self.unet.parameters()).dtype

    def loss(self, mb: MicroBatch) -> torch.Tensor:
        """The trainer's own SDXL loss (`bilora_diffusion.sdxl.loss.micro_batch_loss`) on this device."""
        return micro_batch_loss(
            mb, self.unet, self.scheduler, self.encoders, self.tokenizers, self.accelerator, self.dtype
        )

    def step(self, mb: MicroBatch) -> tuple[float, float]:
        """One optimizer step; returns (time by `CLOCK`, wall time) in seconds."""
        _sync()
        start, wall = CLOCK(), time.perf_counter()
        loss = self.step_fn(self.loss, [mb], lambda _: ["benchmark"])
        _sync()
        elapsed, wall = CLOCK() - start, time.perf_counter() - wall
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.variant}: non-finite loss")
        return elapsed, wall


def make_batches(args: StepCostOptions, comps: dict, count: int) -> list[MicroBatch]:
    """``count`` micro-batches, deterministic; text embeddings cached when the text encoders are frozen."""
    side = args.resolution // 8
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        latents = torch.randn(args.batch_size, 4, side, side, generator=gen)
        noise, timesteps = draw_noise(latents, 1000, 0.0, gen)
        r = args.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * args.batch_size, dtype=torch.float32)
        captions = ["a photo of a small red cube on a table"] * args.batch_size
        batches.append(
            MicroBatch(latents, time_ids, captions, ["benchmark"] * args.batch_size, noise, timesteps)
        )
    if not args.train_text_encoder:
        with torch.no_grad():
            embeds, pooled = encode_prompt(
                comps["text_encoders"], tokenize(comps["tokenizers"], batches[0].captions)
            )
        for mb in batches:
            mb.prompt_embeds, mb.pooled = embeds.float().cpu(), pooled.float().cpu()
    return batches


# -- time -----------------------------------------------------------------------------------------------------
def make_accelerator(args: StepCostOptions):
    from accelerate import Accelerator

    if args.device == "cpu":
        return Accelerator(cpu=True, mixed_precision="no")
    return Accelerator(mixed_precision="bf16" if args.dtype == "bfloat16" else "no")


def time_variants(args: StepCostOptions, accelerator) -> dict:
    """Interleaved rounds (A B C A B C ...); per variant: step times, forward/backward time, paired ratios."""
    dtype = getattr(torch, args.dtype)
    runners = {}
    for variant in args.variants:
        comps = build_components(args.model, accelerator.device, dtype, args.seed, args.widths)
        runners[variant] = Runner(args, variant, comps, accelerator)
    first = next(iter(runners.values()))
    batches = make_batches(args, {"text_encoders": first.encoders, "tokenizers": first.tokenizers}, 4)
    times: dict[str, list[float]] = {v: [] for v in runners}
    walls: dict[str, list[float]] = {v: [] for v in runners}
    passes: dict[str, list[float]] = {v: [] for v in runners}
    for round_index in range(args.warmup + args.steps):
        mb = batches[round_index % len(batches)]
        for variant, runner in runners.items():
            before = runner.step_fn.passes_time
            elapsed, wall = runner.step(mb)
            if round_index >= args.warmup:
                times[variant].append(elapsed)
                walls[variant].append(wall)
                passes[variant].append(runner.step_fn.passes_time - before)
        if args.verbose:
            print(f"round {round_index}: " + " ".join(f"{v}={times[v][-1]:.3f}" for v in times if times[v]))
    return {v: summarize(v, times[v], walls[v], passes[v], times["lora"], runners[v]) for v in runners}


def summarize(
    variant: str, t: list[float], wall: list[float], passes: list[float], lora: list[float], runner: Runner
) -> dict:
    """Median step time with quartiles, forward/backward vs update split, ratios to lora (paired per round
    and of medians), and the raw times."""
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
    return {
        "method": VARIANTS[variant][0],
        "forward": VARIANTS[variant][1],
        "fused_layers": runner.fused_layers,
        "trainable_params": sum(p.numel() for g in runner.optimizer.param_groups for p in g["params"]),
        "step_s_median": statistics.median(t),
        "step_s_q1": q[0],
        "step_s_q3": q[2],
        "passes_s_median": statistics.median(passes),
        "update_s_median": statistics.median([a - b for a, b in zip(t, passes)]),
        "time_ratio_paired": statistics.median([a / b for a, b in zip(t, lora)]),
        "time_ratio_of_medians": statistics.median(t) / statistics.median(lora),
        "wall_s_median": statistics.median(wall),
        "step_times_s": t,
        "wall_times_s": wall,
    }


# -- memory ---------------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_one(args: StepCostOptions, variant: str, accelerator) -> dict:
    """Peak memory of ``variant`` alone in this process (the caller makes sure nothing else is resident)."""
    comps = build_components(
        args.model, accelerator.device, getattr(torch, args.dtype), args.seed, args.widths
    )
    runner = Runner(args, variant, comps, accelerator)
    batches = make_batches(args, {"text_encoders": runner.encoders, "tokenizers": runner.tokenizers}, 2)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        before = _proc_status_kb("VmRSS") * 1024
    for i in range(args.memory_steps):
        runner.step(batches[i % len(batches)])
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        kind = "cuda max_memory_allocated"
    else:
        peak = _proc_status_kb("VmHWM") * 1024
        kind = "peak RSS (VmHWM), MALLOC_MMAP_THRESHOLD_=65536, fresh process"
    return {
        "peak_bytes": peak,
        "before_step_bytes": before,
        "growth_bytes": peak - before,
        "kind": kind,
        **held_bytes(runner.optimizer),
    }


def held_bytes(optimizer) -> dict:
    """What the training holds for its adapters, by unique tensor storage: the trained tensors, a gradient per
    trained tensor (as at the end of a backward; the step frees them), the optimizer's state and its own
    buffers (e.g. the flat update's vectors kept between steps); and the number of auxiliary parameters."""
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if t.numel():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        add(p)
    for group in optimizer.inner.param_groups:
        for t in group["params"]:
            add(t)
    for state in optimizer.inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                add(value)
    grads = sum(p.numel() * p.element_size() for p in params)
    aux = sum(p.numel() for g in optimizer.param_groups if g.get("bilora_role") == "aux" for p in g["params"])
    return {"held_bytes": sum(storages.values()) + grads, "aux_params": aux}


def measure_memory(args: StepCostOptions, accelerator) -> dict:
    """Per variant: in this process, one at a time, on a GPU; in a fresh subprocess each on a CPU."""
    out = {}
    for variant in args.variants:
        if accelerator.device.type == "cuda":
            gc.collect()  # the models of earlier runs hold reference cycles (bound forwards)
            torch.cuda.empty_cache()
            out[variant] = memory_one(args, variant, accelerator)
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_memory_child", variant]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory run of {variant} failed:\n{done.stderr[-3000:]}")
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- the update, piece by piece -------------------------------------------------------------------------------
def update_breakdown(args: StepCostOptions, accelerator) -> dict:
    """Median time of the whole update after one forward/backward, for lora and bilora: the per-tensor update
    (``flat=False``: fused AdamW over every adapter tensor, per-role gradient clip, batched aux clip) and the
    library's default, the flat update (`bilora_diffusion.optim.flat`). Milliseconds by the run's clock."""
    dtype = getattr(torch, args.dtype)
    out: dict[str, dict[str, float]] = {}
    for variant in ("lora", "bilora"):
        row: dict[str, float] = {}
        for flat in (False, True):
            args.per_tensor_update = not flat
            comps = build_components(args.model, accelerator.device, dtype, args.seed, args.widths)
            runner = Runner(args, variant, comps, accelerator)
            mb = make_batches(args, {"text_encoders": runner.encoders, "tokenizers": runner.tokenizers}, 1)[0]
            runner.step(mb)
            runner.optimizer.zero_grad(set_to_none=True)
            runner.accelerator.backward(runner.loss(mb))
            row["tensors"] = sum(len(g["params"]) for g in runner.optimizer.param_groups)
            update = runner.optimizer.step  # on the gradients already there: the update alone
            values = []
            for _ in range(9):
                _sync()
                start = CLOCK()
                with torch.no_grad():
                    update()
                _sync()
                values.append((CLOCK() - start) * 1e3)
            row["flat_update_ms" if flat else "per_tensor_update_ms"] = statistics.median(values)
            del runner, comps
            gc.collect()
        out[variant] = row
    args.per_tensor_update = False
    return out


def breakdown_table(rows: dict) -> str:
    keys = list(rows["bilora"])
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[k]:.1f}" if k in row and k != "tensors" else str(row.get(k, "-")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- report ---------------------------------------------------------------------------------------------------
def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({platform.machine()}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def markdown_table(result: dict) -> str:
    """One row per variant: step time (the run's clock) with quartiles, ratios to lora, the forward/backward
    vs update split, wall time, and the memory ratios."""
    rows = result["variants"]
    mem = result.get("memory", {})
    lines = [
        "| variant | method | forward | step s, median [q1, q3] | time / lora (paired) | fwd+bwd s | "
        "update s | wall s | peak mem / lora | step mem growth / lora | held beyond lora / (16 B x aux params) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = mem.get("lora")
    for name, r in rows.items():
        m = mem.get(name)
        peak = f"{m['peak_bytes'] / base['peak_bytes']:.3f}" if m and base else "-"
        growth = f"{m['growth_bytes'] / base['growth_bytes']:.3f}" if m and base else "-"
        held = "-"
        if m and base and m.get("aux_params"):
            held = f"{(m['held_bytes'] - base['held_bytes']) / (16 * m['aux_params']):.3f}"
        lines.append(
            f"| {name} | {r['method']} | {r['forward']} | {r['step_s_median']:.3f} "
            f"[{r['step_s_q1']:.3f}, {r['step_s_q3']:.3f}] | {r['time_ratio_paired']:.3f} | "
            f"{r['passes_s_median']:.3f} | {r['update_s_median']:.3f} | {r['wall_s_median']:.3f} | "
            f"{peak} | {growth} | {held} |"
        )
    if base:
        lines.append(
            f"\nlora: peak {base['peak_bytes'] / 2**20:.0f} MiB, step growth {base['growth_bytes'] / 2**20:.0f} "
            f"MiB ({base['kind']})"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bar charts of the time ratios to lora and (when measured) the memory ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    names = list(rows)
    mem = result.get("memory", {})
    ncols = 2 if mem.get("lora") else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    axes = list(axes[0])
    ratios = [rows[n]["time_ratio_paired"] for n in names]
    bars = axes[0].bar(names, ratios, color=["#888" if n == "lora" else "#3a7" for n in names])
    axes[0].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel(f"step time / lora (median paired ratio, {result.get('clock', 'time')})", fontsize=8)
    if mem.get("lora"):
        for key, offset, label in (("peak_bytes", -0.2, "peak"), ("growth_bytes", 0.2, "step growth")):
            vals = [mem[n][key] / mem["lora"][key] if n in mem else 0 for n in names]
            bars = axes[1].bar([i + offset for i in range(len(names))], vals, width=0.4, label=label)
            axes[1].bar_label(bars, fmt="%.2f", fontsize=7)
        axes[1].set_xticks(range(len(names)), names)
        axes[1].axhline(1.0, color="k", lw=0.8)
        axes[1].set_ylabel("memory / lora")
        axes[1].legend(loc="lower right")
    for ax in axes:
        ax.tick_params(axis="x", rotation=35)
    widths = "/".join(map(str, result.get("unet_widths", [])))
    extra = ", per-tensor update" if result.get("per_tensor_update") else ""
    fig.suptitle(
        f"{result['model']} (UNet {widths}) {result['resolution']}px, train_text_encoder="
        f"{result['train_text_encoder']}{extra}\n{result['machine']}, {result['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------------
@dataclass
class StepCostOptions:
    """Options of this benchmark (the project's typed options: ``--help``, ``--config FILE.yaml``)."""

    usage = "usage: python benchmarks/step_cost.py [--model M] [--resolution N] [--variants V ...] [--quick] [...]"

    model: str = opt("sdxl-topology-small", "Model topology.", choices=tuple(sorted(MODELS)))
    resolution: int | None = opt(None, "Pixels; default 1024 (sdxl), 256 (small).")
    batch_size: int = opt(1, "Batch size.")
    unet_widths: str | None = opt(
        None, "Override the UNet's block_out_channels, e.g. 160,320,320 (default: the model's)."
    )
    train_text_encoder: bool = opt(False, "LoRA on both text encoders too.")
    variants: list[str] = opt(list(VARIANTS), f"Variants to measure (of {', '.join(VARIANTS)}); lora always.")
    steps: int | None = opt(None, "Measured rounds (default 20, --quick 6).")
    warmup: int | None = opt(None, "Unmeasured rounds (default 3, --quick 2).")
    memory_steps: int = opt(2, "Steps of each memory run.")
    no_memory: bool = opt(False, "Skip the memory runs.")
    per_tensor_update: bool = opt(
        False,
        "Every variant steps each adapter tensor (build_optimizer(flat=False)) instead of the default flat "
        "update, for comparison.",
    )
    quick: bool = opt(False, "Short CPU run: fewer rounds.")
    update_breakdown: bool = opt(False, "Only time the pieces of the update (lora, bilora).")
    device: str | None = opt(None, "Default: cuda if available, else cpu.")
    dtype: str | None = opt(None, "Weights dtype; default bfloat16 on cuda, float32 on cpu.")
    gradient_checkpointing: bool | None = opt(
        None, "Default: on for sdxl, off for sdxl-topology-small (--no-gradient_checkpointing: off)."
    )
    threads: int | None = opt(None, "torch threads (default on CPU: 1; see RESULTS.md for why).")
    seed: int = opt(0, "Seed of the models and batches.")
    out: str | None = opt(None, "Output stem (default benchmarks/results/step_cost_<...>).")
    verbose: bool = opt(False, "Print every round.")
    _memory_child: str | None = opt(None, "Internal: the variant a memory-measuring child process runs.")

    def validate(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise OptionError(f"--variants: must be some of {', '.join(VARIANTS)}, got {bad[0]!r}")
        try:
            self.widths  # noqa: B018 (the check)
        except ValueError:
            raise OptionError(
                f"--unet_widths: expected integers like 160,320,320, got {self.unet_widths!r}"
            ) from None

    @property
    def widths(self) -> tuple[int, ...] | None:
        """--unet_widths as a tuple."""
        return tuple(int(w) for w in self.unet_widths.split(",")) if self.unet_widths else None

    def resolve(self) -> StepCostOptions:
        """The defaults that depend on the device and model, filled in."""
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        self.resolution = self.resolution or (1024 if self.model == "sdxl" else 256)
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.model == "sdxl"
        if self.device == "cpu" and self.threads is None:
            # On a shared CPU, OpenMP teams of 2+ threads wait on each other's preempted threads: steps measured
            # 5-50x slower and erratic here at load 6 on 2 cores; one thread per process keeps them repeatable.
            self.threads = 1
        self.steps = self.steps or (6 if self.quick else 20)
        self.warmup = self.warmup if self.warmup is not None else (2 if self.quick else 3)
        if "lora" not in self.variants:
            self.variants = ["lora", *self.variants]
        return self


StepCostOptions.usage += "\n\n" + __doc__.split("\n\n")[0]


def run_breakdown(args: StepCostOptions, accelerator) -> dict:
    """``--update_breakdown``: the table on stdout and ``step_cost_<model>_<resolution>_update.json``."""
    suffix = "_w" + "-".join(map(str, args.widths)) if args.widths else ""
    suffix += "_te" if args.train_text_encoder else ""
    stem = args.out or str(RESULTS / f"step_cost_{args.model}_{args.resolution}{suffix}_update")
    result = {
        "command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "clock": "process CPU time" if accelerator.device.type == "cpu" else "wall time (cuda synchronized)",
        "update_ms": update_breakdown(args, accelerator),
    }
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(stem + ".json").write_text(json.dumps(result, indent=1))
    print(f"{result['command']}\n{result['date']} — {result['machine']}\n")
    print(breakdown_table(result["update_ms"]))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; a bad option exits with code 2 and one line."""
    return run_cli(lambda args: run(args.resolve(), argv), StepCostOptions, argv, prog="step_cost.py")


def run(args: StepCostOptions, argv: list[str] | None) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator(args)
    global CLOCK
    CLOCK = time.process_time if accelerator.device.type == "cpu" else time.perf_counter
    if args._memory_child:
        print(json.dumps(memory_one(args, args._memory_child, accelerator)))
        return {}
    if args.update_breakdown:
        return run_breakdown(args, accelerator)
    suffix = "_w" + "-".join(map(str, args.widths)) if args.widths else ""
    suffix += ("_te" if args.train_text_encoder else "") + ("_pertensor" if args.per_tensor_update else "")
    suffix += "_quick" if args.quick else ""
    stem = args.out or str(RESULTS / f"step_cost_{args.model}_{args.resolution}{suffix}")
    result = {
        "command": "python benchmarks/step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": args.model,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "unet_widths": list(args.widths or MODELS[args.model][0]["block_out_channels"]),
        "train_text_encoder": args.train_text_encoder,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "rank": 4,
        "aux_rank": 4,
        "per_tensor_update": args.per_tensor_update,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if accelerator.device.type == "cpu" else "wall time (cuda synchronized)",
        "warmup": args.warmup,
        "steps": args.steps,
        "load_average_start": os.getloadavg(),
    }
    result["variants"] = time_variants(args, accelerator)
    result["load_average_end"] = os.getloadavg()
    if not args.no_memory:
        result["memory"] = measure_memory(args, accelerator)
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    Path(stem + ".json").write_text(json.dumps(result, indent=1))
    plot(result, Path(stem + ".png"))
    print(f"{result['command']}\n{result['date']} — {result['machine']}\n")
    print(markdown_table(result))
    print(f"\nwrote {stem}.json and {stem}.png")
    return result


if __name__ == "__main__":
    main()
