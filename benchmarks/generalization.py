"""Generalization benchmark on the toy shapes world: teach a new color on some shapes, test it on the others.

The task (few-shot concept learning with held-out combinations):

- teach ``purple`` (never seen in pretraining) from ``--n_train`` images of purple circles and squares;
- test on purple **triangles** (never in the fine-tuning data): does the new color transfer to another shape?
- measure forgetting on the held-in colors (red ... blue on every shape).

This is a preset of ``bilora-compare`` (`bilora_diffusion.compare`) on the toy world: every (method, seed) is
one compare run (the toolkit's own trainer ``SDXLTrainer`` in this process, a done-marker per run under
``--work``/runs, so an interrupted benchmark resumes), with the toy analyzer as the adherence score (the toy has
no CLIP) and compare's report and verdict next to the table (``<stem>_compare/report.md``). Every method (lora,
bilora, dual-descent, lora-sam, flat-lora) trains on the same data, the same number of optimizer
steps, the same hyper-parameters except rho, for several seeds; lora-sam spends two forward/backward passes per
step (reported). After training, with the auxiliary branch disabled (what users get):

(a) denoising loss at fixed noise and timesteps (min-SNR-weighted epsilon loss, the training loss) on images of
    the unseen combinations, of fresh taught combinations and of held-in combinations;
(b) prompt adherence of images generated for held-out prompts (and held-in / taught ones), read by the toy
    analyzer: color, shape, both;
(c) full-space sharpness of the exported weights ``W' = W0 + s1·B1·A1`` of the adapted layers on the training
    set: ``S(r) = mean_k [L(W' + r·d_k) - L(W')]`` over random filter-normalized Gaussian directions d_k
    (`bilora_diffusion.sdxl.landscape.sharpness`).

    python benchmarks/generalization.py            # full: 5 methods x 3 seeds
    python benchmarks/generalization.py --quick    # 1 seed, fewer steps and samples, same code path
    python benchmarks/generalization.py --sweep_rho 0.01 0.05 0.25  # rho sweep: bilora, lora-sam; 1 seed
    python benchmarks/generalization.py --aux_lr_grid 0.05 1.0    # aux lr 1x, 3x, 10x at each rho vs lora; 3 seeds

Writes benchmarks/results/generalization{,_quick}.{json,md,png} (and the sweep's generalization_rho_sweep.*).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bilora_diffusion.errors import OptionError  # noqa: E402
from bilora_diffusion.options import opt, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("lora", "bilora", "dual-descent", "lora-sam", "flat-lora")
PASSES_PER_STEP = {"lora": 1, "bilora": 1, "dual-descent": 1, "lora-sam": 2, "flat-lora": 1}
TAUGHT_SHAPES = ("circle", "square")


@dataclass
class Settings:
    """Everything a benchmark run depends on (saved in the JSON)."""

    model: str = ""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    steps: int = 200
    batch: int = 8
    lr: float = 3e-3
    rank: int = 4
    alpha: float = 4.0
    rho: dict[str, float] = field(
        default_factory=lambda: {"bilora": 1.0, "dual-descent": 1.0, "lora-sam": 0.25, "flat-lora": 0.25}
    )
    """Chosen by the rho sweep (RESULTS.md): per method the largest swept value whose training loss stays
    within 5 % of LoRA's, i.e. the strongest perturbation that does not stop the fit (test metrics unused)."""
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    n_train: int = 16
    n_loss_images: int = 24
    loss_draws: int = 2
    n_gen_unseen: int = 72
    n_gen_taught: int = 12
    n_gen_held_in: int = 18
    inference_steps: int = 25
    guidance: float = 5.0
    radii: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    sharp_directions: int = 6
    landscape: bool = True
    threads: int = 1
    grid: dict[str, dict] = field(default_factory=dict)
    """Extra labelled variants, e.g. {"bilora rho=1 aux_lr 3x": {"method": "bilora", "rho": 1.0, "aux_lr": 9e-3}}."""


QUICK = {
    "seeds": [0],
    "steps": 30,
    "n_loss_images": 12,
    "n_gen_unseen": 12,
    "n_gen_taught": 6,
    "n_gen_held_in": 6,
    "inference_steps": 15,
    "sharp_directions": 2,
    "radii": [0.25, 1.0],
    "landscape": False,
}
GRID = {
    "seeds": [0, 1, 2],
    "n_loss_images": 12,
    "n_gen_unseen": 24,
    "n_gen_taught": 6,
    "n_gen_held_in": 12,
    "inference_steps": 15,
    "radii": [0.25, 1.0],
    "sharp_directions": 2,
    "landscape": False,
}
"""The aux-lr grid's budget (7 variants x 3 seeds in about 15 minutes on 2 busy CPU cores): the full run's
training (200 steps, lr 3e-3), the quick run's evaluation sizes with more held-out prompts."""
TOY_KEYS = [
    ("loss_unseen", -1, "held-out (purple triangle) loss"),
    ("unseen_both", +1, "held-out adherence (analyzer: color and shape right)"),
    ("held_in_both", +1, "held-in adherence (forgetting)"),
]
"""The toy's key metrics in bilora-compare's verdict (the toy has no CLIP: the analyzer is its adherence score)."""
SWEEP = {
    "seeds": [0],
    "n_loss_images": 12,
    "n_gen_unseen": 36,
    "n_gen_taught": 6,
    "n_gen_held_in": 18,
    "inference_steps": 15,
    "sharp_directions": 2,
    "landscape": False,
}
"""The rho sweep's budget: the full run's training (steps, lr), one seed and the quick run's evaluation sizes
(a few more held-out prompts)."""


# -- data ---------------------------------------------------------------------------------------------------------
def write_data(work: Path, s: Settings) -> dict[str, Path]:
    """Kohya folders: the few-shot training set and the three loss-evaluation sets (fixed seeds)."""
    from bilora_diffusion.toy.world import (
        concept_split,
        held_in_combos,
        make_demo_samples,
        make_samples,
        write_kohya_folder,
    )

    taught, unseen = concept_split(TAUGHT_SHAPES)
    sets = {
        "train": make_demo_samples(s.n_train, combos=taught, seed=101),
        "unseen": make_demo_samples(s.n_loss_images, combos=unseen, seed=202),
        "taught": make_demo_samples(s.n_loss_images, combos=taught, seed=303),
        "held_in": make_samples(s.n_loss_images, seed=404, combos=held_in_combos()),
    }
    folders = {}
    for name, samples in sets.items():
        folder = work / "data" / name
        if folder.exists():
            shutil.rmtree(folder)
        folders[name] = write_kohya_folder(samples, folder)
    return folders


def prompt_sets(s: Settings) -> dict[str, list]:
    """(caption, spec) prompts for adherence, balanced over each set's combinations, fixed seeds."""
    from bilora_diffusion.toy.world import concept_split, eval_prompts

    taught, unseen = concept_split(TAUGHT_SHAPES)
    return {
        "unseen": eval_prompts(s.n_gen_unseen, seed=11, combos=unseen),
        "taught": eval_prompts(s.n_gen_taught, seed=12, combos=taught),
        "held_in": eval_prompts(s.n_gen_held_in, seed=13),
    }


# -- one run: a bilora-compare run on the toy world --------------------------------------------------------------
def trainer_flags(s: Settings, data: Path, cache: Path) -> list[str]:
    """The SDXL trainer's flags shared by every run (bilora-compare adds --method, --seed, --output_dir and each
    variant's overrides such as --rho / --aux_lr)."""
    never = str(10 * s.steps + 1)
    flags = {
        "pretrained_model_name_or_path": s.model,
        "dataset": data,
        "cache_dir": cache,
        "resolution": 32,
        "train_batch_size": s.batch,
        "max_train_steps": s.steps,
        "learning_rate": s.lr,
        "lr_scheduler": "constant",
        "rank": s.rank,
        "lora_alpha": s.alpha,
        "snr_gamma": s.snr_gamma,
        "caption_dropout": s.caption_dropout,
        "mixed_precision": "no",
        "report_to": "none",
        "export_format": "diffusers",
        "save_dtype": "fp32",
        "checkpointing_steps": never,
        "validation_steps": never,
        "compare_grid": "false",
    }
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def variants_of(s: Settings) -> list:
    """One bilora-compare variant per method (its rho), plus ``s.grid``'s labelled extra variants."""
    from bilora_diffusion.compare import Variant

    out = [Variant(m, m, {"rho": str(s.rho.get(m, 0.05))}) for m in s.methods]
    out += [
        Variant(label, spec["method"], {k: str(v) for k, v in spec.items() if k != "method"})
        for label, spec in s.grid.items()
    ]
    return out


def compare_settings(s: Settings, work: Path, folders: dict, command: str):
    from bilora_diffusion.compare import CompareSettings

    return CompareSettings(
        variants=variants_of(s),
        seeds=list(s.seeds),
        output_dir=str(work),
        trainer_args=trainer_flags(s, folders["train"], work / "cache"),
        radii=list(s.radii),
        sharpness_directions=s.sharp_directions,
        sharpness_draws=s.loss_draws,
        command=command,
        extra_identity={
            k: v for k, v in asdict(s).items() if k not in ("methods", "seeds", "grid", "threads")
        },
    )


def timed(fn, *args, **kwargs):
    """(result, wall seconds, process CPU seconds) of ``fn(*args, **kwargs)``."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w0, time.process_time() - c0


def trainer_loss(trainer, draws: int, records=None, seed: int = 1234):
    """The trained model's loss at fixed noise and timesteps on its training images, or on ``records``."""
    from bilora_diffusion.sdxl.landscape import fixed_batches, loss_function

    batches = fixed_batches(
        trainer.evaluation_samples(records),
        trainer.c.noise_scheduler.config.num_train_timesteps,
        trainer.text_cache,
        draws=draws,
        seed=seed,
    )
    return loss_function(trainer.loss, list(trainer.trained.values()), batches)


def evaluate(
    trainer, s: Settings, folders: dict, prompts: dict, base: bool = False, sharp: bool = True
) -> dict:
    """Losses (a), adherence (b) and, unless ``base`` or not ``sharp``, sharpness (c) of a trained trainer; the
    auxiliary branch is off throughout; ``base=True`` evaluates W0 alone (adapters disabled). bilora-compare
    measures (c) itself (same batches, radii, directions and seed)."""
    import contextlib

    from bilora_diffusion import adapters_disabled, aux_disabled
    from bilora_diffusion.data import load_records
    from bilora_diffusion.sdxl.landscape import adapted_layers, sharpness
    from bilora_diffusion.sdxl.sampling import build_pipeline
    from bilora_diffusion.toy.evaluate import evaluate_prompts

    models = list(trainer.trained.values())
    for m in models:
        m.eval()
    off = adapters_disabled(models) if base else contextlib.nullcontext()
    out: dict = {"loss": {}, "adherence": {}}
    train_loss = trainer_loss(trainer, s.loss_draws)
    with off:
        out["loss"]["train"] = train_loss()
        for name in ("unseen", "taught", "held_in"):
            records = load_records(str(folders[name])).records
            out["loss"][name] = trainer_loss(trainer, s.loss_draws, records, seed=4321)()
        pipe = build_pipeline(trainer.c, trainer.accelerator.device)
        with aux_disabled(models):
            for name, specs in prompts.items():
                if specs:
                    score = evaluate_prompts(
                        pipe, specs, seed=0, steps=s.inference_steps, guidance=s.guidance
                    )
                    out["adherence"][name] = {"color": score.color, "shape": score.shape, "both": score.both}
    if not base and sharp:
        layers = adapted_layers(trainer.trained)
        out["sharpness"] = sharpness(train_loss, layers, s.radii, s.sharp_directions, seed=777)
    return out


def landscape_of(trainer, s: Settings) -> dict:
    """1-D loss curves and 2-D surfaces around the trained adapter, full-space and LoRA-subspace directions
    (training set, the same random directions for every method)."""
    from bilora_diffusion.sdxl.landscape import adapted_layers, landscape

    loss_fn = trainer_loss(trainer, s.loss_draws)
    layers = adapted_layers(trainer.trained)
    return landscape(loss_fn, layers, points=13, n_directions=2, grid="2d", grid_points=9, seed=99)


def toy_eval(s: Settings, folders: dict, prompts: dict, with_base: bool):
    """bilora-compare's ``extra_eval`` on the toy world: the analyzer's adherence and the toy losses (and, on
    the first run, the base model; on the first seed, the landscape)."""
    first = (s.seeds[0], (variants_of(s)[0]).label)

    def extra(trainer, variant, seed) -> dict:
        out: dict = {}
        if with_base and (seed, variant.label) == first:
            out["base"] = evaluate(trainer, s, folders, prompts, base=True)
        ev, wall, cpu = timed(evaluate, trainer, s, folders, prompts, sharp=False)
        out.update(ev, toy_eval_wall_s=wall, toy_eval_cpu_s=cpu)
        if s.landscape and seed == s.seeds[0]:
            out["landscape"] = landscape_of(trainer, s)
        out["metrics"] = {k: v for k, v in metrics_of(ev).items() if not k.startswith("sharp_")}
        return out

    return extra


# -- the benchmark ------------------------------------------------------------------------------------------------
def run_benchmark(
    s: Settings,
    work: Path,
    out_json: Path,
    command: str = "",
    with_base: bool = True,
    log=print,
    compare_report: bool = True,
) -> dict:
    """Every (seed, variant) run through bilora-compare (interleaved seed by seed, each run's result kept in
    its done-marker, so an interrupted benchmark resumes); the JSON is rewritten after each run. The base model
    (adapters disabled) is evaluated once, on the first run, when ``with_base``."""
    from bilora_diffusion.compare import gather, run_one, write_report

    torch.set_num_threads(s.threads)
    folders = write_data(work, s)
    prompts = prompt_sets(s)
    cs = compare_settings(s, work, folders, command)
    extra = toy_eval(s, folders, prompts, with_base)
    report: dict = {"meta": meta(s, command), "base": None, "runs": [], "landscape": {}}
    start = time.perf_counter()
    for variant, seed in cs.runs():
        run = toy_run(run_one(cs, variant, seed, extra, log=log))
        if run.get("base") is not None:
            report["base"] = run.pop("base")
            log(f"base model: {brief(report['base'])}")
        if run.get("landscape"):
            report["landscape"][run["method"]] = run.pop("landscape")
        report["runs"].append(run)
        elapsed = (time.perf_counter() - start) / 60
        log(
            f"[{elapsed:5.1f} min] {run['method']} seed {seed}: train {run['train_wall_s']:.0f}s, "
            f"eval {run['eval_wall_s']:.0f}s; {brief(run)}"
        )
        report["summary"] = summarize(report["runs"], s)
        report["meta"]["wall_minutes"] = elapsed
        report["meta"]["cpu_minutes"] = time.process_time() / 60
        out_json.write_text(json.dumps(report, indent=1))
    if not compare_report:
        return report
    runs, missing = gather(cs)
    folder = out_json.parent / (out_json.name[: -len(".json")] + "_compare")
    cols = [("loss_unseen", "held-out loss ↓", "{:.4f}"), ("unseen_both", "held-out both ↑", "{:.3f}")]
    cols += [("held_in_both", "held-in both", "{:.3f}")]
    compare = write_report(cs, runs, missing, TOY_KEYS, cols, "bilora-compare on the toy world", folder)
    report["verdict"] = compare["verdict_text"]
    out_json.write_text(json.dumps(report, indent=1))
    return report


def toy_run(run: dict) -> dict:
    """A bilora-compare run result in this benchmark's run format (the table's and the figure's input)."""
    extra = run["extra"]
    out = {
        "method": run["label"],
        "seed": run["seed"],
        "rho": float(run["overrides"]["rho"]) if "rho" in run["overrides"] else None,
        "aux_lr": float(run["overrides"]["aux_lr"]) if "aux_lr" in run["overrides"] else None,
        "steps": run["steps"],
        "passes": run["passes"],
        "train_wall_s": run["wall_s"],
        "train_cpu_s": run["cpu_s"],
        "eval_wall_s": run["eval_wall_s"],
        "final_train_loss": run["final_train_loss"],
        "aux_norm": run["aux_norm"],
        "loss": extra["loss"],
        "adherence": extra["adherence"],
        "sharpness": run["sharpness"],
    }
    for key in ("base", "landscape"):
        if extra.get(key):
            out[key] = extra[key]
    return out


def brief(ev: dict) -> str:
    a = ev["adherence"].get("unseen", {})
    h = ev["adherence"].get("held_in", {})
    text = (
        f"unseen loss {ev['loss']['unseen']:.4f}, unseen color/shape/both {a.get('color', 0):.0%}/"
        f"{a.get('shape', 0):.0%}/{a.get('both', 0):.0%}, held-in both {h.get('both', 0):.0%}"
    )
    if "sharpness" in ev:
        text += ", S(r) " + " ".join(f"{v:.4f}" for v in ev["sharpness"]["mean"].values())
    return text


def meta(s: Settings, command: str) -> dict:
    import diffusers
    import peft

    return {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads {s.threads}",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
        },
        "settings": asdict(s),
        "task": f"teach purple on {list(TAUGHT_SHAPES)}; held out: purple triangle; forgetting: held-in colors",
        "model_fingerprint": fingerprint(Path(s.model)),
    }


def fingerprint(folder: Path) -> str:
    """sha256 (first 16 hex digits) of the base model's weight files, to tell which model a result is from."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- summary, table, figure -----------------------------------------------------------------------------------------
def metrics_of(run: dict) -> dict[str, float]:
    """Flat {metric name: value} of one run (the table's and the figure's columns)."""
    out = {f"loss_{k}": v for k, v in run["loss"].items()}
    for name, score in run["adherence"].items():
        out.update({f"{name}_{k}": v for k, v in score.items()})
    for r, v in run.get("sharpness", {}).get("mean", {}).items():
        out[f"sharp_{r}"] = v
    for key in ("steps", "passes", "train_wall_s", "train_cpu_s", "final_train_loss", "aux_norm"):
        if key in run:
            out[key] = run[key]
    return out


def summarize(runs: list[dict], s: Settings) -> dict[str, dict[str, list[float]]]:
    """{method: {metric: [mean, std, n]}} over seeds."""
    from bilora_diffusion.compare import mean_std

    out = {}
    for variant in variants_of(s):
        rows = [metrics_of(r) for r in runs if r["method"] == variant.label]
        if rows:
            out[variant.label] = {k: [*mean_std([r[k] for r in rows]), len(rows)] for k in rows[0]}
    return out


COLUMNS = [
    ("loss_unseen", "held-out loss ↓", 4, False),
    ("unseen_color", "held-out color ↑", 0, True),
    ("unseen_shape", "held-out shape ↑", 0, True),
    ("unseen_both", "held-out both ↑", 0, True),
    ("taught_color", "taught color", 0, True),
    ("loss_taught", "taught loss", 4, False),
    ("held_in_both", "held-in both", 0, True),
    ("loss_held_in", "held-in loss", 4, False),
    ("loss_train", "train loss", 4, False),
]


def table(report: dict) -> str:
    """The Markdown table: mean ± std over seeds, one row per method, plus the base model."""
    s = report["meta"]["settings"]
    sharp = [(f"sharp_{r}", f"S({r}) ↓", 4, False) for r in s["radii"]]
    cols = [*COLUMNS, *sharp]
    head = "| method | steps | fwd/bwd passes | " + " | ".join(c[1] for c in cols) + " | train CPU s |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    base = metrics_of(report["base"]) if report.get("base") else {}
    if base:
        cells = [_fmt(base.get(k), None, d, pct) if k in base else "–" for k, _, d, pct in cols]
        lines.append("| base (no fine-tuning) | 0 | 0 | " + " | ".join(cells) + " | – |")
    for method, stats in report.get("summary", {}).items():
        cells = [_fmt(*stats[k][:2], d, pct) if k in stats else "–" for k, _, d, pct in cols]
        n = stats["passes"][2]
        steps = (
            int(stats["steps"][0]) if "steps" in stats else int(stats["passes"][0] / PASSES_PER_STEP[method])
        )
        lines.append(
            f"| {method} (n={n}) | {steps} | {stats['passes'][0]:.0f} | "
            + " | ".join(cells)
            + f" | {stats['train_cpu_s'][0]:.0f} |"
        )
    return "\n".join(lines)


def _fmt(mean: float | None, std: float | None, digits: int, pct: bool) -> str:
    if mean is None:
        return "–"
    if pct:
        return f"{100 * mean:.0f}" + (f" ± {100 * std:.0f}" if std is not None else "") + " %"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def figure(report: dict, path: Path) -> Path:
    """Mean ± std over seeds: held-out loss, held-out adherence (color / shape / both), held-in adherence
    (forgetting) and sharpness S(r) against the radius; dashed lines: the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, methods = report["summary"], list(report["summary"])
    base = metrics_of(report["base"]) if report.get("base") else {}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.0))
    x = list(range(len(methods)))
    _bars(axes[0], summary, methods, ["loss_unseen"], 1.0, base, zoom=True)
    axes[0].set_title("held-out (purple triangle) loss ↓" + _base_note(base, "loss_unseen", 1.0), fontsize=9)
    _bars(axes[1], summary, methods, ["unseen_color", "unseen_shape", "unseen_both"], 100.0, base)
    axes[1].set_title("held-out prompts (purple triangle): % right ↑", fontsize=9)
    _bars(axes[2], summary, methods, ["held_in_color", "held_in_both", "taught_color"], 100.0, base)
    axes[2].set_title("held-in prompts (forgetting) and taught color: % right", fontsize=9)
    for ax in axes[:3]:
        ax.set_xticks(x, methods, rotation=30, fontsize=8)
    ax = axes[3]
    radii = report["meta"]["settings"]["radii"]
    for m in methods:
        means = [summary[m][f"sharp_{r}"][0] for r in radii]
        stds = [summary[m][f"sharp_{r}"][1] for r in radii]
        ax.errorbar(radii, means, yerr=stds, marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)  # small radii can give tiny negative increases
    ax.set_xlabel("radius r (filter-normalized)")
    ax.set_title("sharpness S(r) of W0 + s1·B1A1, training set ↓", fontsize=9)
    ax.legend(fontsize=7)
    n = max(v["passes"][2] for v in summary.values())
    fig.suptitle(
        f"Toy shapes world: purple taught on circle + square, tested on triangle ({n} seed(s) per method)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(
    ax, summary: dict, methods: list, keys: list[str], k: float, base: dict, zoom: bool = False
) -> None:
    """Grouped bars of ``keys`` per method (scaled by k), error bars = std over seeds, base as dashed lines."""
    width = 0.8 / len(keys)
    lo, hi = math.inf, -math.inf
    for j, key in enumerate(keys):
        means = [k * summary[m][key][0] for m in methods]
        stds = [k * summary[m][key][1] for m in methods]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(methods))]
        bars = ax.bar(
            xs, means, width, yerr=stds, capsize=2, alpha=0.85, label=key if len(keys) > 1 else None
        )
        if key in base and not zoom:
            ax.axhline(k * base[key], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
        lo = min(lo, *(m - s for m, s in zip(means, stds)))
        hi = max(hi, *(m + s for m, s in zip(means, stds)))
    if zoom:  # differences between methods are small next to the loss itself
        pad = 0.25 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
    if len(keys) > 1:
        ax.legend(fontsize=7)


def _base_note(base: dict, key: str, k: float) -> str:
    return f"\n(base model: {k * base[key]:.4f})" if key in base else ""


def _at(stem: Path, suffix: str) -> Path:
    """``stem`` + suffix (not Path.with_suffix, which would eat a tag like "rho0.25")."""
    return stem.parent / (stem.name + suffix)


def write_outputs(report: dict, stem: Path) -> None:
    """stem.json (already written), stem.md (table + settings) and stem.png; landscape_toy* if computed."""
    m = report["meta"]
    text = [
        f"# Generalization benchmark ({stem.name})",
        "",
        f"Command: `{m['command']}`  ",
        f"Date: {m['date_utc']}; machine: {m['machine']}; wall {m.get('wall_minutes', 0):.1f} min, "
        f"CPU {m.get('cpu_minutes', 0):.1f} min.  ",
        f"Task: {m['task']}.  ",
        f"Settings: `{json.dumps(m['settings'])}`",
        "",
        table(report),
        "",
    ]
    if report.get("verdict"):
        text += [
            f"bilora-compare's verdict ([report]({stem.name}_compare/report.md)):",
            "",
            *report["verdict"],
            "",
        ]
    _at(stem, ".md").write_text("\n".join(text))
    figure(report, _at(stem, ".png"))
    if report.get("landscape"):
        from bilora_diffusion.sdxl.landscape import plot

        land = stem.parent / stem.name.replace("generalization", "landscape_toy")
        plot(report["landscape"], _at(land, ".png"), title="Toy task, seed 0: loss on the training set")
        _at(land, ".json").write_text(json.dumps(report["landscape"], indent=1))


# -- command line -------------------------------------------------------------------------------------------------
@dataclass
class GeneralizationOptions:
    """Options of this benchmark (the project's typed options: ``--help``, ``--config FILE.yaml``)."""

    usage = (
        "usage: python benchmarks/generalization.py [--quick] [--methods M ...] [--sweep_rho RHO ...] [...]"
    )

    quick: bool = opt(False, "1 seed, fewer steps and samples (same code path).")
    model: str | None = opt(None, "Base model folder (default: the shipped toy model).")
    methods: list[str] | None = opt(None, f"Methods to run (of {', '.join(METHODS)}).")
    seeds: int | None = opt(None, "Number of seeds (0, 1, ...).")
    steps: int | None = opt(None, "Optimizer steps of every method.")
    lr: float | None = opt(None, "Learning rate of every method.")
    rho: list[str] | None = opt(None, "METHOD=RHO pairs, e.g. bilora=0.01 lora-sam=0.05.")
    sweep_rho: list[float] | None = opt(None, "rho values to sweep (1 seed).")
    sweep_methods: list[str] = opt(["bilora", "lora-sam", "flat-lora"], "Methods of --sweep_rho.")
    aux_lr_grid: list[float] | None = opt(
        None,
        "bilora at each rho x each --aux_lr_factors (x the primary lr) against lora; 3 seeds, GRID budget.",
    )
    aux_lr_factors: list[float] = opt([1.0, 3.0, 10.0], "Factors of --aux_lr_grid.")
    no_landscape: bool = opt(False, "Skip the loss-landscape curves.")
    threads: int = opt(1, "torch threads (1: fastest on a shared machine).")
    work: str = opt("/tmp/bilora_generalization", "Scratch folder (runs, data, caches).")
    out: str = opt(str(RESULTS), "Folder of the results.")
    tag: str | None = opt(None, "Suffix of the result files (default: quick / none).")
    verbose: bool = opt(False, "Show the trainer's progress bars.")
    replot: str | None = opt(None, "Rewrite the .md/.png of a finished run's JSON.")

    def validate(self) -> None:
        for flag in ("methods", "sweep_methods"):
            bad = [m for m in getattr(self, flag) or [] if m not in METHODS]
            if bad:
                raise OptionError(f"--{flag}: must be some of {', '.join(METHODS)}, got {bad[0]!r}")
        bad = [item for item in self.rho or [] if "=" not in item]
        if bad:
            raise OptionError(f"--rho: expected METHOD=RHO, got {bad[0]!r}")


def quiet_progress_bars() -> None:
    """The trainer's and the caches' tqdm bars off (they pass ``disable=`` themselves, so TQDM_DISABLE is
    not enough); the benchmark logs one line per run instead."""
    from bilora_diffusion import training
    from bilora_diffusion.sdxl import cache

    for module in (training, cache):
        original = module.tqdm
        module.tqdm = lambda *a, _tqdm=original, **k: _tqdm(*a, **{**k, "disable": True})


def settings_from(args: GeneralizationOptions) -> Settings:
    from bilora_diffusion.toy.model import TOY_MODEL_DIR

    s = Settings(model=args.model or str(TOY_MODEL_DIR), threads=args.threads)
    if args.quick:
        s = replace(s, **QUICK)
    if args.sweep_rho:
        s = replace(s, **SWEEP)
    if args.aux_lr_grid:
        s = replace(s, **GRID, methods=["lora"])
    if args.methods:
        s.methods = list(args.methods)
    if args.seeds is not None:
        s.seeds = list(range(args.seeds))
    if args.steps is not None:
        s.steps = args.steps
    if args.lr is not None:
        s.lr = args.lr
    for item in args.rho or []:
        method, _, value = item.partition("=")
        s.rho[method] = float(value)
    if args.no_landscape:
        s.landscape = False
    for rho in args.aux_lr_grid or []:
        for factor in args.aux_lr_factors:
            s.grid[f"bilora rho={rho:g} aux_lr {factor:g}x"] = {
                "method": "bilora",
                "rho": rho,
                "aux_lr": factor * s.lr,
            }
    return s


GeneralizationOptions.usage += "\n\n" + __doc__  # the module's docstring: what the benchmark measures


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; a bad option exits with code 2 and one line."""
    return run_cli(lambda args: run(args, argv), GeneralizationOptions, argv, prog="generalization.py")


def run(args: GeneralizationOptions, argv: list[str] | None) -> dict:
    if not args.verbose:
        quiet_progress_bars()
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        write_outputs(report, Path(args.replot[: -len(".json")]))
        return report
    s = settings_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    if args.sweep_rho:
        return sweep(s, args, work, out, command(argv))
    tag = (
        args.tag
        if args.tag is not None
        else ("quick" if args.quick else "aux_lr" if args.aux_lr_grid else "")
    )
    stem = out / ("generalization" + (f"_{tag}" if tag else ""))
    report = run_benchmark(s, work, _at(stem, ".json"), command(argv))
    write_outputs(report, stem)
    print(table(report))
    print("\n".join(report.get("verdict", [])))
    print(f"wrote {stem}.json/.md/.png and {stem.name}_compare/report.md")
    return report


def command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python benchmarks/generalization.py", *args])


def sweep(s: Settings, args: GeneralizationOptions, work: Path, out: Path, cmd: str) -> dict:
    """rho sweep of ``--sweep_methods`` (plus a lora reference), one seed, the SWEEP budget."""
    s = replace(s, landscape=False, methods=["lora"], seeds=s.seeds[:1])
    stem = out / ("generalization_rho_sweep" + (f"_{args.tag}" if args.tag else ""))
    report = run_benchmark(s, work, _at(stem, ".json"), cmd)
    runs = [dict(r, label="lora") for r in report["runs"]]
    for rho in args.sweep_rho:
        for method in args.sweep_methods:
            sub = replace(s, methods=[method], rho={**s.rho, method: rho})
            part = run_benchmark(
                sub,
                work,
                stem.with_name(stem.name + "_part.json"),
                cmd,
                with_base=False,
                compare_report=False,
            )
            runs += [dict(r, label=f"{method} rho={rho}") for r in part["runs"]]
            report["runs"] = runs
            _at(stem, ".json").write_text(json.dumps(report, indent=1))
    stem.with_name(stem.name + "_part.json").unlink(missing_ok=True)
    lines = [
        "| run | held-out loss | held-out color | held-out both | held-in both | train loss | aux norm | "
        + " | ".join(f"S({r})" for r in s.radii)
        + " |",
        "|" + "---|" * (7 + len(s.radii)),
    ]
    for r in runs:
        a, h = r["adherence"]["unseen"], r["adherence"]["held_in"]
        sharp = " | ".join(f"{v:.4f}" for v in r["sharpness"]["mean"].values())
        lines.append(
            f"| {r['label']} | {r['loss']['unseen']:.4f} | {a['color']:.0%} | {a['both']:.0%} | {h['both']:.0%} "
            f"| {r['loss']['train']:.4f} | {r['aux_norm']:.4f} | {sharp} |"
        )
    m = report["meta"]
    head = [
        f"# rho sweep\n\nCommand: `{m['command']}`; {m['date_utc']}; {m['machine']}.  ",
        f"Settings: `{json.dumps(m['settings'])}`\n",
    ]
    _at(stem, ".md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
