"""Pretrain the tiny SDXL of the toy shapes world (the embedded default model), reproducibly, on a CPU.

    python scripts/pretrain_toy.py --seed 0

Phases, each resumable from its last checkpoint in --work-dir (rerun the same command to resume):

1. VAE: an AutoencoderKL trained on generator images of every palette color (a generic image codec, as
   SDXL's VAE is), until the analyzer reads its reconstructions of held-out images >= --vae-target.
   The latent scaling factor is then set to 1 / std of the latents, as SDXL's 0.13025 was.
2. UNet + both text encoders: epsilon-prediction diffusion on cached latents of HELD-IN images only (the new
   concept, ``purple``, never appears), min-SNR-5 loss weights, 10 % caption dropout to zero embeddings
   (what the SDXL pipeline feeds as the unconditional branch), and an EMA of the weights. The text
   encoders train too: random frozen CLIP encoders give nearly identical pooled embeddings for all captions.
3. Export: the EMA weights with the best held-in analyzer score, as a StableDiffusionXLPipeline folder
   (UNet and VAE in fp16, text encoders in fp32), plus a model card with the measured scores.

Every batch, its noise and its timesteps are functions of (seed, step), so a resumed run sees the same data
as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from bilora_diffusion.testing import ToyModelConfig, build_toy_components
from bilora_diffusion.toy.analyzer import score
from bilora_diffusion.toy.evaluate import held_in_score, new_concept_score
from bilora_diffusion.toy.model import TOY_MODEL_DIR, add_time_ids, encode_prompt_ids
from bilora_diffusion.toy.world import COLORS, make_samples


@dataclass
class Options:
    seed: int = 0
    work_dir: str = str(Path.home() / ".cache" / "bilora_diffusion" / "pretrain_toy")
    output: str = str(TOY_MODEL_DIR)
    threads: int = 2
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_max_steps: int = 3000
    vae_target: float = 0.97
    vae_eval_every: int = 250
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_steps: int = 6000
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    dataset_size: int = 20000
    eval_every: int = 500
    eval_n: int = 90
    export_n: int = 180
    export_only: bool = False
    """Skip training: re-export the best EMA found in --work-dir (and rewrite the model card)."""
    unet_stop: int = 0
    """Stop the UNet phase after this step (0: at unet_steps), keeping the lr schedule of unet_steps: the
    clock-free way to reproduce a run that --max-minutes stopped."""
    max_minutes: float = 0.0
    """Stop the UNet phase after this many minutes of this process (0: no limit) and export the best."""


def parse_options() -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in asdict(Options()).items():
        if isinstance(value, bool):
            parser.add_argument("--" + name.replace("_", "-"), action="store_true")
        else:
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return Options(**vars(parser.parse_args()))


def log(work: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(work / "log.txt", "a") as f:
        f.write(line + "\n")


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# ----------------------------------------------------------------------------- phase 1: VAE


def vae_batch(opts: Options, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of VAE training (all palette colors) and its foreground weights (5 on the shape)."""
    samples = make_samples(opts.vae_batch, seed=opts.seed * 100_000 + step + 1, colors=COLORS)
    x = to_pixels([s[0] for s in samples])
    background = x[:, :, :1, :1]
    foreground = (x - background).abs().amax(dim=1, keepdim=True) > 0.05
    # Shapes cover ~10 % of the image: without weights the loss is background and colors wash out.
    return x, 1.0 + 4.0 * foreground.float()


@torch.no_grad()
def vae_score(vae: AutoencoderKL, opts: Options, n: int = 300) -> tuple[float, float]:
    """Analyzer (color, shape) accuracy on reconstructions of held-out images of every color."""
    vae.eval()
    samples = make_samples(n, seed=opts.seed * 100_000 + 99_999, colors=COLORS)
    x = to_pixels([s[0] for s in samples])
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    vae.train()
    images = ((recon.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    result = score(list(images), [s[2] for s in samples])
    return result.color, result.shape


def train_vae(vae: AutoencoderKL, opts: Options, work: Path) -> AutoencoderKL:
    """Phase 1; returns the trained VAE with its scaling factor set. Skipped when ``work/vae`` exists."""
    final = work / "vae"
    if (final / "config.json").exists():
        log(work, "VAE: found trained VAE, skipping phase 1")
        return AutoencoderKL.from_pretrained(final)
    ckpt = work / "vae_ckpt.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0)
    step, done = 0, False
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(work, f"VAE: resumed at step {step}")
        color, shape = vae_score(vae, opts)
        log(work, f"VAE step {step}: analyzer on reconstructions color {color:.1%} shape {shape:.1%}")
        done = min(color, shape) >= opts.vae_target  # e.g. reached at the last checkpoint
    vae.train()
    start = time.time()
    while not done and step < opts.vae_max_steps:
        x, weight = vae_batch(opts, step)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (weight * (recon - x) ** 2).mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(work, f"VAE step {step} loss {loss.item():.4f} ({(time.time() - start) / 60:.1f} min)")
        if step % opts.vae_eval_every == 0 or step == opts.vae_max_steps:
            color, shape = vae_score(vae, opts)
            log(work, f"VAE step {step}: analyzer on reconstructions color {color:.1%} shape {shape:.1%}")
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            done = min(color, shape) >= opts.vae_target
    with torch.no_grad():
        x = to_pixels([s[0] for s in make_samples(512, seed=opts.seed * 100_000 + 77_777)])
        std = vae.encode(x).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    color, shape = vae_score(vae, opts)
    vae.save_pretrained(final)
    (work / "vae_report.json").write_text(
        json.dumps({"steps": step, "color": color, "shape": shape, "scaling_factor": 1.0 / std}, indent=2)
    )
    log(work, f"VAE done at step {step}: color {color:.1%} shape {shape:.1%}, scaling factor {1 / std:.4f}")
    return vae


# ----------------------------------------------------------------------------- phase 2: UNet


@torch.no_grad()
def cache_dataset(vae: AutoencoderKL, components: dict, opts: Options, work: Path) -> dict[str, torch.Tensor]:
    """Latent distributions (mean, std) and token ids of ``dataset_size`` held-in images, computed once."""
    path = work / "dataset.safetensors"
    if path.exists():
        return load_file(path)
    vae.eval()
    samples = make_samples(opts.dataset_size, seed=opts.seed * 100_000 + 50_000)
    means, stds = [], []
    for i in range(0, len(samples), 256):
        dist = vae.encode(to_pixels([s[0] for s in samples[i : i + 256]])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    captions = [s[1] for s in samples]
    tok = components["tokenizer"]
    tok2 = components["tokenizer_2"]
    kw = {
        "padding": "max_length",
        "max_length": tok.model_max_length,
        "truncation": True,
        "return_tensors": "pt",
    }
    data = {
        "mean": torch.cat(means).contiguous(),
        "std": torch.cat(stds).contiguous(),
        "ids": tok(captions, **kw).input_ids,
        "ids_2": tok2(captions, **kw).input_ids,
    }
    save_file(data, path)
    log(work, f"cached {len(samples)} held-in latents")
    return data


def make_pipeline(components: dict, vae: AutoencoderKL) -> StableDiffusionXLPipeline:
    parts = dict(components, vae=vae)
    pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Trainables:
    """The modules phase 2 trains, and the EMA copy of their parameters that gets exported."""

    modules: dict[str, torch.nn.Module]
    ema: dict[str, torch.Tensor]

    def params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    def named(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": p for k, m in self.modules.items() for n, p in m.state_dict().items()}

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for name, value in self.named().items():
            if value.is_floating_point():
                self.ema[name].lerp_(value, 1.0 - decay)

    @torch.no_grad()
    def swap_ema(self) -> None:
        """Exchange live and EMA weights (call twice to undo): evaluation and export use the EMA."""
        for name, value in self.named().items():
            if value.is_floating_point():
                tmp = value.clone()
                value.copy_(self.ema[name])
                self.ema[name].copy_(tmp)


def unet_loss(
    tr: Trainables, data: dict, opts: Options, step: int, noise_sched: DDPMScheduler, scale: float
) -> torch.Tensor:
    """One batch of SDXL's epsilon loss with min-SNR weights; data, noise and timesteps from (seed, step).

    ``scale`` is the VAE's scaling factor: the UNet learns on scaled latents, as in SDXL.
    """
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
    idx = torch.randint(0, data["mean"].shape[0], (opts.unet_batch,), generator=gen)
    latents = (
        data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)
    ) * scale
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (opts.unet_batch,), generator=gen)
    noisy = noise_sched.add_noise(latents, noise, t)
    embeds, pooled = encode_prompt_ids(
        tr.modules["text_encoder"], tr.modules["text_encoder_2"], data["ids"][idx], data["ids_2"][idx]
    )
    keep = (torch.rand(opts.unet_batch, generator=gen) >= opts.caption_dropout).float()
    embeds = embeds * keep[:, None, None]
    pooled = pooled * keep[:, None]
    cond = {"text_embeds": pooled, "time_ids": add_time_ids(opts.unet_batch)}
    pred = tr.modules["unet"](noisy, t, embeds, added_cond_kwargs=cond).sample
    alphas = noise_sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=opts.min_snr_gamma) / snr
    return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


def save_checkpoint(tr: Trainables, opt: torch.optim.Optimizer, step: int, best: dict, work: Path) -> None:
    folder = work / "ckpt" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tr.named().items()}, folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in tr.ema.items()}, folder / "ema.safetensors")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, "best": best}, indent=2))
    for old in sorted((work / "ckpt").glob("step_*"))[:-2]:
        shutil.rmtree(old)


def load_checkpoint(tr: Trainables, opt: torch.optim.Optimizer, work: Path) -> tuple[int, dict]:
    folders = sorted((work / "ckpt").glob("step_*"))
    if not folders:
        return 0, {}
    folder = folders[-1]
    weights = load_file(folder / "model.safetensors")
    for key, module in tr.modules.items():
        module.load_state_dict({n[len(key) + 1 :]: v for n, v in weights.items() if n.startswith(key + ".")})
    tr.ema.update(load_file(folder / "ema.safetensors"))
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "state.json").read_text())
    return state["step"], state["best"]


def evaluate_ema(tr: Trainables, pipe: StableDiffusionXLPipeline, opts: Options) -> dict:
    tr.swap_ema()
    for m in tr.modules.values():
        m.eval()
    result = held_in_score(pipe, n=opts.eval_n, seed=opts.seed)
    for m in tr.modules.values():
        m.train()
    tr.swap_ema()
    return {"color": result.color, "shape": result.shape, "both": result.both}


def train_unet(components: dict, vae: AutoencoderKL, opts: Options, work: Path) -> None:
    """Phase 2: train UNet and text encoders; keeps the best EMA (by held-in 'both' score) in work/best."""
    data = cache_dataset(vae, components, opts, work)
    modules = {k: components[k] for k in ("unet", "text_encoder", "text_encoder_2")}
    tr = Trainables(modules, {})
    tr.ema = {k: v.detach().clone() for k, v in tr.named().items()}
    # No weight decay: the never-trained "purple" token embedding must stay as initialised, not shrink.
    opt = torch.optim.AdamW(tr.params(), lr=opts.unet_lr, weight_decay=0.0)
    noise_sched = DDPMScheduler.from_config(components["scheduler"].config)
    step, best = load_checkpoint(tr, opt, work)
    if step:
        log(work, f"UNet: resumed at step {step}, best so far {best}")
    pipe = make_pipeline(components, vae)
    for m in modules.values():
        m.train()
    start, losses = time.time(), []
    while step < opts.unet_steps:
        for group in opt.param_groups:
            group["lr"] = opts.unet_lr * lr_factor(step, opts)
        loss = unet_loss(tr, data, opts, step, noise_sched, vae.config.scaling_factor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.params(), 1.0)
        opt.step()
        step += 1
        tr.update_ema(min(opts.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 50 == 0:
            log(
                work,
                f"UNet step {step} loss {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({(time.time() - start) / 60:.1f} min)",
            )
        out_of_time = (opts.max_minutes > 0 and time.time() - start > 60 * opts.max_minutes) or (
            0 < opts.unet_stop <= step
        )
        if step % opts.eval_every == 0 or step == opts.unet_steps or out_of_time:
            result = evaluate_ema(tr, pipe, opts)
            log(work, f"UNet step {step}: EMA held-in analyzer {result}")
            if not best or result["both"] >= best["both"]:
                best = dict(result, step=step)
                save_file({k: v.contiguous() for k, v in tr.ema.items()}, work / "best_ema.safetensors")
            save_checkpoint(tr, opt, step, best, work)
        if out_of_time:
            log(work, f"UNet: stopping at step {step} (--max-minutes or --unet-stop)")
            break


def lr_factor(step: int, opts: Options) -> float:
    """Linear warmup, then cosine decay to 10 % at ``unet_steps``."""
    if step < opts.warmup:
        return (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(1, opts.unet_steps - opts.warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- phase 3: export

SWEEP = [(15, 5.0), (25, 3.0), (25, 5.0), (25, 7.5), (40, 5.0)]
"""(steps, guidance) pairs measured at export; the card reports all of them."""


def _load_weights(components: dict, weights: dict[str, torch.Tensor]) -> None:
    for key in ("unet", "text_encoder", "text_encoder_2"):
        components[key].load_state_dict(
            {n[len(key) + 1 :]: v for n, v in weights.items() if n.startswith(key + ".")}
        )


def select_export_weights(components: dict, vae: AutoencoderKL, opts: Options, work: Path) -> int:
    """Load the better of the best-scored EMA and the last EMA into ``components``; return its step.

    Both are scored again now, with the current analyzer, on prompts the training evaluations did not use:
    the best-scored EMA was picked by the analyzer of the training run, which may since have changed.
    """
    last = sorted((work / "ckpt").glob("step_*"))[-1]
    best_step = json.loads((last / "state.json").read_text())["best"]["step"]
    candidates = {best_step: work / "best_ema.safetensors", int(last.name[5:]): last / "ema.safetensors"}
    scores = {}
    for step, path in candidates.items():
        _load_weights(components, load_file(path))
        pipe = make_pipeline(components, vae)
        scores[step] = held_in_score(pipe, n=opts.eval_n, seed=opts.seed + 500).both
        log(work, f"export: EMA at step {step} scores {scores[step]:.1%} (held-in, both)")
    chosen = max(scores, key=lambda k: (scores[k], k))
    _load_weights(components, load_file(candidates[chosen]))
    return chosen


def export(
    components: dict, vae: AutoencoderKL, opts: Options, work: Path, command: str, train_opts: dict
) -> None:
    """Phase 3: save the best EMA as the shipped pipeline, reload it as users will, and measure it.

    ``command`` and ``train_opts`` describe the training run (not an --export-only rerun) for the card.
    """
    vae_recon = vae_score(vae, opts)  # measured again: the analyzer may have changed since phase 1
    best_step = select_export_weights(components, vae, opts, work)
    pipe = make_pipeline(components, vae)
    # fp16 halves the UNet and VAE on disk (the 20 MB budget); diffusers loads them back as float32.
    # The text encoders stay float32: transformers 5 would otherwise load them as fp16, slow on CPUs.
    pipe.unet.half()
    pipe.vae.half()
    out = Path(opts.output)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    shipped = StableDiffusionXLPipeline.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    shipped.set_progress_bar_config(disable=True)
    rows = []
    for steps, guidance in SWEEP:
        held = held_in_score(shipped, n=opts.export_n, seed=1000, steps=steps, guidance=guidance)
        new = new_concept_score(shipped, n=opts.export_n // 2, seed=1000, steps=steps, guidance=guidance)
        rows.append(
            {"steps": steps, "guidance": guidance, "held_in": asdict(held), "new_concept": asdict(new)}
        )
        log(work, f"export: steps {steps} guidance {guidance}: held-in {held}; purple prompts {new}")
    report = {
        "command": command,
        "options": train_opts,
        "vae": dict(
            json.loads((work / "vae_report.json").read_text()), **dict(zip(("color", "shape"), vae_recon))
        ),
        "best": {"step": best_step},
        "last_step": int(sorted((work / "ckpt").glob("step_*"))[-1].name[5:]),
        "sweep": rows,
        "size_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6,
    }
    (work / "export_report.json").write_text(json.dumps(report, indent=2))
    (out / "README.md").write_text(model_card(report, work))
    log(work, f"exported to {out} ({report['size_mb']:.1f} MB)")


def _wall_minutes(work: Path) -> float:
    """Minutes from the first to the last line of the run's log (all resumed segments included)."""
    stamps = [line[1:9] for line in (work / "log.txt").read_text().splitlines() if line.startswith("[")]
    to_s = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (t.split(":") for t in stamps)]
    total = 0
    for a, b in zip(to_s, to_s[1:], strict=False):
        total += (b - a) % 86400
    return total / 60


def model_card(report: dict, work: Path) -> str:
    """The shipped README.md: how the model was made and what the analyzer measured on it."""
    samples = make_samples(2000, seed=424242, colors=COLORS)
    generator = score([s[0] for s in samples], [s[2] for s in samples])
    vae, best = report["vae"], report["best"]
    rows = "\n".join(
        f"| {r['steps']} | {r['guidance']} | {r['held_in']['color']:.1%} | {r['held_in']['shape']:.1%} "
        f"| {r['held_in']['both']:.1%} | {r['new_concept']['color']:.1%} |"
        for r in report["sweep"]
    )
    opts = report["options"]
    return f"""# sdxl-tiny: the toy shapes world's pretrained SDXL

A {report["size_mb"]:.1f} MB `StableDiffusionXLPipeline` folder with SDXL's architecture at toy size, the
embedded default model of bilora-diffusion: a trainer run with no arguments fine-tunes it, offline, on a
CPU, on `bilora_diffusion/toy/demo_data/` (24 images of a **purple** shape, a color it has never seen).

It draws 32x32 images of one circle, square or triangle from captions such as
`a large red circle on a white background, top left` (vocabulary: `bilora_diffusion.toy.world.VOCABULARY`,
one token per word). Held-in colors: red, orange, yellow, green, cyan, blue. `purple` is in the tokenizers
but no pretraining caption or image of the UNet and text encoders contains it.

```python
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("bilora_diffusion/toy/sdxl-tiny")  # offline, float32
image = pipe(
    "a large red circle on a white background, top left", num_inference_steps=25, guidance_scale=5.0
).images[0]  # 32x32
```

## Components

- UNet2DConditionModel: SDXL blocks (DownBlock2D, CrossAttnDownBlock2D x2 / CrossAttnUpBlock2D x2,
  UpBlock2D), channels {ToyModelConfig().unet_channels}, `text_time` added conditioning; 4x8x8 latents. Stored fp16
  (diffusers loads it as float32).
- AutoencoderKL: 3 levels (32, 64, 64), 4x downsampling, scaling factor {vae["scaling_factor"]:.4f}
  (1 / std of its latents). Stored fp16.
- CLIPTextModel (width 32) and CLIPTextModelWithProjection (width 64, projection 64), 2 layers each,
  stored float32; CLIPTokenizers built locally from the toy vocabulary (max length 77).
- Scheduler: SDXL base's EulerDiscreteScheduler config (epsilon prediction, scaled-linear betas).

## How it was made

    {report["command"]}

Seed {opts["seed"]}. Wall time about {_wall_minutes(work):.0f} minutes on 2 shared CPU cores (1 thread, `nice`).

1. VAE on generator images of every palette color, purple included (a generic image codec, as SDXL's VAE
   saw all colors), shape pixels weighted 5x, until the analyzer read its reconstructions of 300 held-out
   images right: {vae["steps"]} steps of batch {opts["vae_batch"]}; color {vae["color"]:.1%}, shape {vae["shape"]:.1%}.
2. UNet and both text encoders together on {opts["dataset_size"]} cached latents of held-in images only:
   epsilon loss with min-SNR-{opts["min_snr_gamma"]:g} weights, batch {opts["unet_batch"]}, AdamW lr {opts["unet_lr"]:g}
   (no weight decay, so the unseen `purple` embedding stays as initialised), warmup and cosine decay,
   {opts["caption_dropout"]:.0%} caption dropout to zero embeddings (the pipeline's unconditional input,
   `force_zeros_for_empty_prompt`), EMA {opts["ema_decay"]}. Shipped: the EMA at step {best["step"]} of
   {report["last_step"]}, the better on held-in prompts of the last EMA and the best-scored one among the
   evaluations (every {opts["eval_every"]} steps, {opts["eval_n"]} prompts).
3. Export: fp16 UNet/VAE, reloaded from disk and measured below.

## Measured (bilora_diffusion.toy.analyzer)

- The analyzer on 2,000 generator images: color {generator.color:.1%}, shape {generator.shape:.1%}.
- Generated images, {report["sweep"][0]["held_in"]["n"]} held-in prompts balanced over the 18 shape x color
  combinations, and {report["sweep"][0]["new_concept"]["n"]} purple prompts (the demo concept before any
  fine-tuning: the color column counts images the analyzer reads as purple):

| steps | guidance | held-in color | held-in shape | held-in both | purple prompts read as purple |
|---|---|---|---|---|---|
{rows}

Recommended inference: 32x32 (the default), 25 Euler steps, guidance 5.0
(`bilora_diffusion.toy.evaluate.DEFAULT_STEPS` / `DEFAULT_GUIDANCE`).
"""


def command_line(opts: Options) -> str:
    """The command that reproduces ``opts`` (only the non-default options)."""
    changed = [
        (k, v)
        for k, v in asdict(opts).items()
        if k == "seed" or (v != getattr(Options(), k) and k != "export_only")
    ]
    return "python scripts/pretrain_toy.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed)


def main() -> None:
    opts = parse_options()
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "options.json"
    if opts.export_only:
        # The card must show the training run's command and options, not this re-export's.
        train_opts = json.loads(saved.read_text())
        command = command_line(Options(**train_opts))
    else:
        if saved.exists() and json.loads(saved.read_text())["seed"] != opts.seed:
            log(work, "WARNING: resuming with a different seed than the run in this work dir")
        saved.write_text(json.dumps(asdict(opts), indent=2))
        train_opts, command = asdict(opts), command_line(opts)
    components = build_toy_components(ToyModelConfig(), seed=opts.seed)
    vae = train_vae(components["vae"], opts, work)
    vae.eval().requires_grad_(False)
    if not opts.export_only:
        train_unet(components, vae, opts, work)
    export(components, vae, opts, work, command, train_opts)


if __name__ == "__main__":
    main()
