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

from bilora_diffusion.toy.analyzer import score
from bilora_diffusion.toy.evaluate import held_in_score, new_concept_score
from bilora_diffusion.toy.model import (
    TOY_MODEL_DIR,
    ToyModelConfig,
    add_time_ids,
    build_toy_components,
    encode_prompt_ids,
)
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
    max_minutes: float = 0.0
    """Stop the UNet phase after this many minutes of this process (0: no limit) and export the best."""


def parse_options() -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in asdict(Options()).items():
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
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(work, f"VAE: resumed at step {step}")
    vae.train()
    start = time.time()
    while step < opts.vae_max_steps:
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
            if min(color, shape) >= opts.vae_target:
                break
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
        out_of_time = opts.max_minutes > 0 and time.time() - start > 60 * opts.max_minutes
        if step % opts.eval_every == 0 or step == opts.unet_steps or out_of_time:
            result = evaluate_ema(tr, pipe, opts)
            log(work, f"UNet step {step}: EMA held-in analyzer {result}")
            if not best or result["both"] >= best["both"]:
                best = dict(result, step=step)
                save_file({k: v.contiguous() for k, v in tr.ema.items()}, work / "best_ema.safetensors")
            save_checkpoint(tr, opt, step, best, work)
        if out_of_time:
            log(work, f"UNet: stopping at step {step}, --max-minutes reached")
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


def export(components: dict, vae: AutoencoderKL, opts: Options, work: Path, command: str) -> None:
    """Phase 3: save the best EMA as the shipped pipeline, reload it as users will, and measure it."""
    weights = load_file(work / "best_ema.safetensors")
    for key in ("unet", "text_encoder", "text_encoder_2"):
        components[key].load_state_dict(
            {n[len(key) + 1 :]: v for n, v in weights.items() if n.startswith(key + ".")}
        )
    pipe = make_pipeline(components, vae)
    # fp16 halves the UNet and VAE on disk (the 20 MB budget); diffusers loads them back as float32.
    # The text encoders stay float32: transformers 5 would otherwise load them as fp16, slow on CPUs.
    pipe.unet.half()
    pipe.vae.half()
    out = Path(opts.output)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    shipped = StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float32, local_files_only=True)
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
        "options": asdict(opts),
        "vae": json.loads((work / "vae_report.json").read_text()),
        "best": json.loads((sorted((work / "ckpt").glob("step_*"))[-1] / "state.json").read_text())["best"],
        "sweep": rows,
        "size_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6,
    }
    (work / "export_report.json").write_text(json.dumps(report, indent=2))
    log(work, f"exported to {out} ({report['size_mb']:.1f} MB)")


def main() -> None:
    opts = parse_options()
    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "options.json"
    if saved.exists() and json.loads(saved.read_text())["seed"] != opts.seed:
        log(work, "WARNING: resuming with a different seed than the run in this work dir")
    saved.write_text(json.dumps(asdict(opts), indent=2))
    command = "python scripts/pretrain_toy.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in asdict(opts).items() if v != getattr(Options(), k)
    )
    components = build_toy_components(ToyModelConfig(), seed=opts.seed)
    vae = train_vae(components["vae"], opts, work)
    vae.eval().requires_grad_(False)
    train_unet(components, vae, opts, work)
    export(components, vae, opts, work, command)


if __name__ == "__main__":
    main()
