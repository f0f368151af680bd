"""bilora-compare: does Bi-LoRA help on *my* data? Train the chosen methods with everything else equal, then one
report.

    bilora-compare --config my_run.yaml --methods lora,bilora --seeds 3 --validation_split 0.2 \\
        --validation_clip_model openai/clip-vit-large-patch14 --output_dir compare

Every (method, seed) run is the SDXL trainer (`SDXLTrainer`, in this process) on the same options but
``--method`` (and any per-variant overrides): same seed, steps, data order, noise and timesteps (they are all
drawn from ``--seed`` and the step), same held-out split (drawn from the seed), same validation prompts and
sample seeds. A variant is ``METHOD`` or ``METHOD:key=value:key=value`` (``bilora:rho=0.25:aux_lr=0.01``).
Flags that are not bilora-compare's go to the trainer (``--max_train_steps 500``).

Per run: the held-out denoising loss at fixed noise (``--validation_split``), the CLIP scores of the final
validation samples (``--validation_clip_model``: CLIP I2T, the paper's metric; CLIP I2I to the training images),
the full-space sharpness S(r) of the final adapter on the training set (`sdxl.landscape.sharpness`), wall time and peak
memory. Each run writes ``runs/<variant>-s<seed>/compare_result.json`` when it is done: a killed compare skips
finished runs when started again, and a half-finished one resumes from its last checkpoint (when the config
sets ``checkpointing_steps``). ``--shard i/n`` runs every n-th run (one process per GPU); ``--report_only``
gathers. The report (``report.md``, ``report.json``, ``report.png``) gives mean ± std over seeds and a
plain-language verdict that says when a difference is within the seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .options import OptionError

logger = logging.getLogger(__name__)

MARKER = "compare_result.json"
PASSES_PER_STEP = {"lora-sam": 2}
KEY_METRICS = [
    # (metric, +1 if higher is better / -1 if lower is better, plain name)
    ("heldout_loss", -1, "held-out denoising loss"),
    ("clip_i2t", +1, "CLIP image-text score"),
    ("clip_i2i", +1, "CLIP image-image similarity to the training images"),
    ("dino_i2i", +1, "DINO image-image similarity"),
]
NOISE_T = 2.0
"""|t| below this (difference of means over its standard error) is reported as within noise."""


# -- what to run ----------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """A method and its option overrides (``bilora:rho=0.25:aux_lr=0.01``)."""

    label: str
    method: str
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", self.label.replace("=", "")).strip("_")


def parse_variants(items: Sequence[str]) -> list[Variant]:
    """``["lora,bilora", "bilora:rho=0.25"]`` -> variants (commas and spaces both separate)."""
    out = []
    for item in (x for arg in items for x in arg.split(",")):
        item = item.strip()
        if not item:
            continue
        method, *pairs = item.split(":")
        overrides = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise OptionError(f"--methods {item}: expected METHOD or METHOD:key=value[:key=value]")
            overrides[key.lstrip("-")] = value
        out.append(Variant(item, method, overrides))
    labels = [v.label for v in out]
    if not out or len(set(labels)) != len(labels):
        raise OptionError(f"--methods: give distinct methods, got {', '.join(labels) or 'none'}")
    return out


@dataclass
class CompareSettings:
    variants: list[Variant]
    seeds: list[int]
    output_dir: str = "compare"
    config: str | None = None
    trainer_args: list[str] = field(default_factory=list)
    validation_split: float | None = None
    validation_clip_model: str | None = None
    validation_dino_model: str | None = None
    radii: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    sharpness_directions: int = 4
    sharpness_draws: int = 2
    record_batches: bool = False
    command: str = ""
    extra_identity: dict = field(default_factory=dict)
    """Settings of an ``extra_eval`` (a preset's own evaluation): part of what a finished run must match."""

    def runs(self) -> list[tuple[Variant, int]]:
        """Every (variant, seed), seed by seed (a partial compare has every method on the first seeds)."""
        return [(v, s) for s in self.seeds for v in self.variants]

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return Path(self.output_dir) / "runs" / f"{variant.slug}-s{seed}"


def trainer_argv(s: CompareSettings, variant: Variant, seed: int) -> list[str]:
    """The trainer's command line of one run: the user's config and flags, then what the compare fixes."""
    argv = (["--config", s.config] if s.config else []) + list(s.trainer_args)
    argv += ["--method", variant.method, "--seed", str(seed), "--output_dir", str(s.run_dir(variant, seed))]
    if s.validation_split is not None:
        argv += ["--validation_split", str(s.validation_split)]
    if s.validation_clip_model:
        argv += ["--validation_clip_model", s.validation_clip_model]
    if s.validation_dino_model:
        argv += ["--validation_dino_model", s.validation_dino_model]
    for key, value in variant.overrides.items():
        argv += [f"--{key}", value]
    return argv


def run_identity(s: CompareSettings, variant: Variant, seed: int) -> str:
    """What a finished run must match to be reused: its trainer command line, the config file's content and
    the compare's evaluation settings (a changed setting retrains instead of reusing an old result)."""
    parts = {
        "argv": trainer_argv(s, variant, seed),
        "config": Path(s.config).read_text() if s.config and Path(s.config).is_file() else None,
        "evaluation": [s.radii, s.sharpness_directions, s.sharpness_draws, s.extra_identity],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_of(s: CompareSettings, variant: Variant, seed: int) -> dict | None:
    """The finished run's result if its marker is there and matches the current settings."""
    marker = s.run_dir(variant, seed) / MARKER
    if not marker.is_file():
        return None
    run = json.loads(marker.read_text())
    return run if run.get("identity") == run_identity(s, variant, seed) else None


def trainer_options(s: CompareSettings, variant: Variant, seed: int, resume: bool = False):
    from .options import parse_options
    from .sdxl.options import SDXLOptions

    argv = trainer_argv(s, variant, seed) + (["--resume_from_checkpoint", "latest"] if resume else [])
    return parse_options(SDXLOptions, argv)


# -- one run --------------------------------------------------------------------------------------------------------
def batch_digest(mb) -> str:
    """sha256 of what a micro-batch feeds the model: latents, noise, timesteps, time ids and captions."""
    h = hashlib.sha256()
    for t in (mb.latents, mb.noise, mb.timesteps, mb.time_ids):
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    h.update("\x00".join(mb.captions).encode())
    return h.hexdigest()[:16]


def record_batches(trainer, path: Path) -> None:
    """Wrap ``trainer.micro_batches`` so that every step's micro-batch digests go to ``path`` (JSON lines)."""
    original = trainer.micro_batches

    def recorded(step: int):
        batches = original(step)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "digests": [batch_digest(mb) for mb in batches]}) + "\n")
        return batches

    trainer.micro_batches = recorded


def peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU max allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS of the process so far (CPU)"


def run_one(
    s: CompareSettings, variant: Variant, seed: int, extra_eval: Callable | None = None, log=logger.info
) -> dict:
    """Train one (variant, seed) unless its marker says it is done; returns its result (the marker's JSON).
    ``extra_eval(trainer, variant, seed) -> dict`` adds task metrics (its ``"metrics"`` entry: flat floats)."""
    from .checkpoint import list_checkpoints
    from .sdxl.landscape import adapted_layers, fixed_batches, loss_function, sharpness
    from .sdxl.train import SDXLTrainer
    from .training import preflight_resume

    out = s.run_dir(variant, seed)
    marker = out / MARKER
    done = marker_of(s, variant, seed)
    if done is not None:
        log(f"{variant.label} seed {seed}: done before, skipped ({marker})")
        return done
    if marker.is_file():
        log(f"{variant.label} seed {seed}: {marker} is from other settings; training again")
        marker.unlink()
    resume = bool(list_checkpoints(out))
    options = trainer_options(s, variant, seed, resume=resume)
    preflight_resume(options, SDXLTrainer.checkpoint_identity(options))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out.mkdir(parents=True, exist_ok=True)
    hashes = out / "batch_hashes.jsonl"
    hashes.unlink(missing_ok=True)
    w0, c0 = time.perf_counter(), time.process_time()
    trainer = SDXLTrainer(options)
    trainer.setup()
    if s.record_batches:
        record_batches(trainer, hashes)
    start_step = trainer.global_step
    result = trainer.train()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak, peak_kind = peak_memory_mb()
    e0 = time.perf_counter()
    train_batches = fixed_batches(
        trainer.evaluation_samples(),
        trainer.c.noise_scheduler.config.num_train_timesteps,
        trainer.text_cache,
        draws=s.sharpness_draws,
    )
    sharp = sharpness(
        loss_function(trainer.loss, list(trainer.trained.values()), train_batches),
        adapted_layers(trainer.trained),
        s.radii,
        s.sharpness_directions,
        seed=777,
    )
    extra = extra_eval(trainer, variant, seed) if extra_eval else {}
    scores_file = out / "samples" / "scores.json"
    scores = json.loads(scores_file.read_text())[-1] if scores_file.is_file() else {}
    tail = result.losses[-10:]
    run = {
        "label": variant.label,
        "identity": run_identity(s, variant, seed),
        "method": variant.method,
        "overrides": variant.overrides,
        "seed": seed,
        "output_dir": str(out),
        "steps": result.global_step,
        "passes": result.global_step * PASSES_PER_STEP.get(variant.method, 1),
        "resumed_at_step": start_step or None,
        "wall_s": wall,
        "cpu_s": cpu,
        "eval_wall_s": time.perf_counter() - e0,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "aux_norm": float(getattr(trainer.optimizer, "last_aux_norm", 0.0)),
        "val_losses": result.val_losses,
        "heldout_loss": result.val_losses[-1][1] if result.val_losses else None,
        "scores": {k: v for k, v in scores.items() if k not in ("per_prompt",)},
        "sharpness": sharp,
        "extra": {k: v for k, v in extra.items() if k != "metrics"},
    }
    run["metrics"] = {**metrics_of(run), **extra.get("metrics", {})}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, marker)  # the marker appears whole or not at all
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run


def metrics_of(run: dict) -> dict[str, float]:
    """The flat metrics of a run (the report's columns)."""
    out = {}
    if run.get("heldout_loss") is not None:
        out["heldout_loss"] = run["heldout_loss"]
    for key in ("clip_i2t", "clip_i2i", "dino_i2i"):
        if key in run.get("scores", {}):
            out[key] = run["scores"][key]
    for r, v in run.get("sharpness", {}).get("mean", {}).items():
        out[f"sharp_{r}"] = v
    for key in ("final_train_loss", "aux_norm", "wall_s", "peak_memory_mb"):
        if run.get(key) is not None:
            out[key] = run[key]
    return out


# -- statistics, verdict, report ------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarize(runs: list[dict], labels: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """{label: {metric: [mean, std, n]}} over seeds."""
    out = {}
    for label in labels:
        rows = [r["metrics"] for r in runs if r["label"] == label]
        keys = sorted({k for row in rows for k in row})
        if rows:
            out[label] = {
                k: [*mean_std([row[k] for row in rows if k in row]), sum(k in row for row in rows)]
                for k in keys
            }
    return out


def compare_metric(a: list[float], b: list[float]) -> dict:
    """b against a: difference of means, its standard error (Welch) and t = difference / standard error."""
    (ma, sa, na), (mb, sb, nb) = a, b
    diff = mb - ma
    se = math.sqrt(sa**2 / na + sb**2 / nb) if na > 1 and nb > 1 else None
    t = diff / se if se else (None if se is None else math.copysign(math.inf, diff) if diff else 0.0)
    return {"baseline_value": ma, "value": mb, "difference": diff, "standard_error": se, "t": t}


def verdicts(summary: dict, key_metrics: Sequence[tuple[str, int, str]] = KEY_METRICS) -> list[dict]:
    """Each variant against the first one, on every key metric both have."""
    labels = list(summary)
    if len(labels) < 2:
        return []
    base, out = labels[0], []
    for label in labels[1:]:
        for key, sign, name in key_metrics:
            if key not in summary[base] or key not in summary[label]:
                continue
            c = compare_metric(summary[base][key], summary[label][key])
            if c["t"] is None:
                call = "no noise estimate (one seed)"
            elif abs(c["t"]) < NOISE_T:
                call = "within noise"
            else:
                call = "better" if c["difference"] * sign > 0 else "worse"
            out.append({"variant": label, "baseline": base, "metric": key, "name": name, "call": call, **c})
    return out


def verdict_text(found: list[dict], n_seeds: int) -> list[str]:
    """Plain-language lines: one per variant, then the per-metric evidence."""
    lines = []
    for label in dict.fromkeys(v["variant"] for v in found):
        mine = [v for v in found if v["variant"] == label]
        base = mine[0]["baseline"]
        better = [v["name"] for v in mine if v["call"] == "better"]
        worse = [v["name"] for v in mine if v["call"] == "worse"]
        if all(v["call"].startswith("no noise") for v in mine):
            head = (
                f"**{label} vs {base}: cannot tell** — one seed per method gives no estimate of the "
                "seed-to-seed noise; run with --seeds 3 or more."
            )
        elif better and not worse:
            head = (
                f"**{label} helps** over {base} on this data: better {', '.join(better)} (beyond the noise)."
            )
        elif worse and not better:
            head = f"**{label} is worse** than {base} on this data: {', '.join(worse)} (beyond the noise)."
        elif better and worse:
            head = f"**{label} vs {base}: mixed** — better {', '.join(better)}, worse {', '.join(worse)}."
        else:
            head = (
                f"**{label} vs {base}: no measurable difference** — every difference is within the "
                f"seed-to-seed noise ({n_seeds} seed(s); |t| < {NOISE_T:g})."
            )
        lines.append(head)
        for v in mine:
            t = "–" if v["t"] is None else f"{v['t']:+.1f}"
            lines.append(
                f"  - {v['name']}: {v['value']:.4g} vs {v['baseline_value']:.4g} (difference {v['difference']:+.3g}, "
                f"t = {t}): {v['call']}"
            )
    return lines


def gather(s: CompareSettings) -> tuple[list[dict], list[str]]:
    """The finished runs' results (from their markers) and the runs still missing."""
    runs, missing = [], []
    for variant, seed in s.runs():
        run = marker_of(s, variant, seed)
        if run is not None:
            runs.append(run)
        else:
            missing.append(f"{variant.label} seed {seed}")
    return runs, missing


COLUMNS = [
    ("heldout_loss", "held-out loss ↓", "{:.4f}"),
    ("clip_i2t", "CLIP I2T ↑", "{:.2f}"),
    ("clip_i2i", "CLIP I2I ↑", "{:.3f}"),
    ("dino_i2i", "DINO I2I ↑", "{:.3f}"),
    ("final_train_loss", "train loss", "{:.4f}"),
    ("aux_norm", "aux norm", "{:.3g}"),
]


def _cell(stat: list[float] | None, fmt: str) -> str:
    if not stat:
        return "–"
    mean, std, n = stat
    return fmt.format(mean) + (" ± " + fmt.format(std) if n > 1 else "")


def report_table(summary: dict, radii: Sequence[float], extra_columns: Sequence = ()) -> str:
    cols = [*extra_columns, *COLUMNS, *[(f"sharp_{r}", f"S({r}) ↓", "{:.4f}") for r in radii]]
    cols += [("wall_s", "wall s", "{:.0f}"), ("peak_memory_mb", "peak MB", "{:.0f}")]
    present = [c for c in cols if any(c[0] in stats for stats in summary.values())]
    lines = ["| variant | n | " + " | ".join(c[1] for c in present) + " |", "|" + "---|" * (len(present) + 2)]
    for label, stats in summary.items():
        n = max(v[2] for v in stats.values())
        lines.append(f"| {label} | {n} | " + " | ".join(_cell(stats.get(k), f) for k, _, f in present) + " |")
    return "\n".join(lines)


def write_report(
    s: CompareSettings,
    runs: list[dict],
    missing: list[str],
    key_metrics: Sequence[tuple[str, int, str]] = KEY_METRICS,
    extra_columns: Sequence = (),
    title: str = "bilora-compare report",
    out: Path | None = None,
) -> dict:
    """report.json, report.md and report.png in ``out`` (default ``s.output_dir``); returns the report."""
    labels = [v.label for v in s.variants]
    summary = summarize(runs, labels)
    found = verdicts(summary, key_metrics)
    n_seeds = min((max(v[2] for v in st.values()) for st in summary.values()), default=0)
    text = verdict_text(found, n_seeds)
    settings = asdict(s)
    report = {
        "settings": settings,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
        "missing": missing,
        "summary": summary,
        "verdicts": found,
        "verdict_text": text,
    }
    out = Path(out or s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "report.json", json.dumps(report, indent=1))
    per_run_cols = [k for k, *_ in key_metrics] + [f"sharp_{s.radii[-1]}", "wall_s"] if s.radii else []
    per_run_cols = [k for k in dict.fromkeys(per_run_cols) if any(k in r["metrics"] for r in runs)]
    md = [
        f"# {title}",
        "",
        f"Command: `{s.command}`  " if s.command else "",
        f"Date: {report['date_utc']}; {len(runs)} run(s) done"
        + (f", **{len(missing)} missing**: {', '.join(missing)}" if missing else "")
        + ".",
        "",
        "## Verdict",
        "",
        *text,
        "",
        f"Differences are compared with t = (difference of means) / (its standard error over seeds); |t| < "
        f"{NOISE_T:g} is called within noise. Every run has the same seed-driven data order, noise, timesteps, "
        "held-out split and sample seeds; only the method differs.",
        "",
        "## Mean ± std over seeds",
        "",
        report_table(summary, s.radii, extra_columns),
        "",
        "## Every run",
        "",
        "| variant | seed | " + " | ".join(per_run_cols) + " |",
        "|" + "---|" * (len(per_run_cols) + 2),
        *[
            f"| {r['label']} | {r['seed']} | "
            + " | ".join(f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "–" for k in per_run_cols)
            + " |"
            for r in runs
        ],
        "",
        "S(r): mean training-loss increase under random filter-normalized perturbations of radius r of the "
        "merged weights W0 + s1·B1·A1 (auxiliary branch off); peak memory: "
        + (runs[0]["peak_memory_kind"] if runs else "–")
        + ".",
        "",
    ]
    _atomic(out / "report.md", "\n".join(md))
    if runs:
        plot(summary, runs, [k for k, *_ in key_metrics], s.radii, out / "report.png")
    return report


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(summary: dict, runs: list[dict], keys: Sequence[str], radii: Sequence[float], path: Path) -> Path:
    """One panel per key metric (bars: mean ± std, dots: seeds) and S(r) against r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    keys = [k for k in keys if any(k in st for st in summary.values())]
    panels = len(keys) + (1 if radii else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.2 * max(panels, 1), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [i for i, label in enumerate(labels) if key in summary[label]]
        means = [summary[labels[i]][key][0] for i in xs]
        stds = [summary[labels[i]][key][1] for i in xs]
        ax.bar(xs, means, yerr=stds, capsize=3, alpha=0.7)
        for i in xs:
            dots = [r["metrics"][key] for r in runs if r["label"] == labels[i] and key in r["metrics"]]
            ax.plot([i] * len(dots), dots, "k.", markersize=4)
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        pad = 0.3 * (hi - lo) + 1e-9 + 0.02 * abs(hi)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(key, fontsize=9)
    if radii:
        ax = axes[0][-1]
        for label in labels:
            pts = [(r, summary[label].get(f"sharp_{r}")) for r in radii]
            pts = [(r, st) for r, st in pts if st]
            if pts:
                ax.errorbar(
                    [r for r, _ in pts], [st[0] for _, st in pts], yerr=[st[1] for _, st in pts], marker="o"
                )
                ax.lines[-1].set_label(label)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("radius r")
        ax.set_title("sharpness S(r) ↓", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the command ----------------------------------------------------------------------------------------------------
def run_compare(
    s: CompareSettings,
    shard: tuple[int, int] = (0, 1),
    extra_eval: Callable | None = None,
    log=logger.info,
) -> list[dict]:
    """This shard's runs (the others' markers are read, not made); returns this shard's results."""
    for variant, seed in s.runs():  # every run's options are checked before the first one trains
        trainer_options(s, variant, seed)
    index, count = shard
    results = []
    start = time.perf_counter()
    for k, (variant, seed) in enumerate(s.runs()):
        if k % count != index:
            continue
        run = run_one(s, variant, seed, extra_eval, log=log)
        results.append(run)
        brief = ", ".join(
            f"{key} {v:.4g}" for key, v in run["metrics"].items() if not key.startswith("sharp")
        )
        log(f"[{(time.perf_counter() - start) / 60:5.1f} min] {variant.label} seed {seed}: {brief}")
    return results


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise OptionError(f"--shard takes i/n with 0 <= i < n (e.g. 0/2), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="bilora-compare",
        allow_abbrev=False,  # --seed is the trainer's (refused), not an abbreviation of --seeds
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other flag goes to the trainer (train_sdxl.py --help lists them).",
    )
    p.add_argument("--config", default=None, help="The trainer's YAML config (data, base model, steps, ...).")
    p.add_argument(
        "--methods", nargs="+", default=["lora,bilora"], help="e.g. lora,bilora (first: baseline)."
    )
    p.add_argument("--seeds", type=int, default=3, help="Seeds 0..N-1 per method.")
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument(
        "--validation_split", type=float, default=None, help="Held-out fraction (default: config)."
    )
    p.add_argument("--validation_clip_model", default=None, help="CLIP model scoring the validation samples.")
    p.add_argument("--validation_dino_model", default=None, help="Optional DINO model (DINO I2I).")
    p.add_argument("--output_dir", default="compare", help="Where runs/ and the report go.")
    p.add_argument("--radii", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0], help="Sharpness radii.")
    p.add_argument("--sharpness_directions", type=int, default=4)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i (one per process).")
    p.add_argument(
        "--report_only", action="store_true", help="Only gather the finished runs into the report."
    )
    p.add_argument(
        "--record_batches", action="store_true", help="Write each run's per-step batch digests (checks)."
    )
    return p.parse_known_args(argv)


def settings_from(args: argparse.Namespace, rest: list[str], command: str = "") -> CompareSettings:
    for flag in ("--method", "--seed", "--output_dir"):
        if flag in rest:
            raise OptionError(
                f"{flag} is set by bilora-compare per run; use --methods / --seeds / --output_dir"
            )
    if args.seeds < 1:
        raise OptionError(f"--seeds must be >= 1, got {args.seeds}")
    return CompareSettings(
        variants=parse_variants(args.methods),
        seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
        output_dir=args.output_dir,
        config=args.config,
        trainer_args=rest,
        validation_split=args.validation_split,
        validation_clip_model=args.validation_clip_model,
        validation_dino_model=args.validation_dino_model,
        radii=args.radii,
        sharpness_directions=args.sharpness_directions,
        record_batches=args.record_batches,
        command=command,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, rest = parse_args(argv)
    command = "bilora-compare " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        s = settings_from(args, rest, command)
        shard = parse_shard(args.shard)
        if not args.report_only:
            run_compare(s, shard, log=print)
    except OptionError as err:
        print(f"bilora-compare: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    runs, missing = gather(s)
    report = write_report(s, runs, missing)
    print("\n".join(report["verdict_text"]))
    if missing:
        print(
            f"{len(missing)} run(s) not done yet: {', '.join(missing)} (other shards, or run again to resume)"
        )
    print(f"wrote {Path(s.output_dir) / 'report.md'} (.json, .png)")
    return report


if __name__ == "__main__":
    main()
