"""Loss landscapes and sharpness around a trained (Bi-)LoRA adapter, in full weight space and in the LoRA subspace.

What is perturbed. Every adapted layer ``l`` exports the merged weight ``W'_l = W0_l + s1·B1_l·A1_l`` (the
auxiliary branch never leaves training, so it is disabled for every loss computed here). Two kinds of random
directions, drawn from a seeded Gaussian and *filter-normalized* (Li et al., "Visualizing the Loss Landscape of
Neural Nets", 2018):

- ``full``: ``d_l ~ N(0, I)`` of W's shape, then for every filter i (output row of a Linear, output channel
  of a Conv) ``d_l[i] <- d_l[i] / ||d_l[i]|| · ||W'_l[i]||``; the model is evaluated at ``W'_l + a·d_l``
  (added to W0 in place, so the LoRA forward still adds ``s1·B1·A1``).
- ``lora``: directions ``(dA_l, dB_l)`` filter-normalized against A1 and B1 row by row; the model is evaluated at
  ``W0 + s1·(B1 + a·dB)·(A1 + a·dA)`` — what LoRA-SAM's perturbation can reach.

Measures:

- 1-D curve ``L(a) = L(theta + a·d)`` for a in [-span, span]; 2-D surface ``L(a, b) = L(theta + a·d1 + b·d2)``.
- Sharpness at radius r: ``S(r) = mean_k [L(theta + r·d_k) - L(theta)]`` over K random full-space directions
  (the expected loss increase under random filter-normalized Gaussian perturbations, as in random-weight-
  perturbation studies). ``S(0) = 0`` exactly: every perturbation is undone bitwise from saved copies.

Command line (any SDXL training output of this toolkit; the base model path comes from its training_config.yaml,
the evaluation set is that run's training images at fixed noise and timesteps)::

    python -m bilora_diffusion.sdxl.landscape --output_dir OUT [OUT2 ...] [--directions full|lora|both] [--grid 1d|2d]

The directions and measures work on any model carrying the primary adapter; the glue below them (fixed batches,
the loss, loading a training output, the command line) is SDXL's, and takes the parts it uses, not the trainer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CONFIG_FILE
from ..config import PRIMARY
from ..options import OptionError, check_choices, opt, read_yaml, run_cli
from ..peft_glue import aux_disabled, bilora_layers, lora_pair, unwrap
from ..state import STATE_FILE, load_bilora_state
from ..training import seeded
from .loss import MicroBatch
from .options import SDXLOptions
from .train import SDXLTrainer

logger = logging.getLogger(__name__)

SPACES = ("full", "lora")
LossFn = Callable[[], float]


# -- directions -------------------------------------------------------------------------------------------------
def adapted_layers(models: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``{"<component>.<module path>": layer}`` for every LoRA layer carrying the primary adapter, in order."""
    out: dict[str, nn.Module] = {}
    for component, model in models.items():
        root = unwrap(model)
        names = {id(m): n for n, m in root.named_modules()}
        for layer in bilora_layers(root):
            out[f"{component}.{names[id(layer)]}"] = layer
    return out


@torch.no_grad()
def merged_weight(layer: nn.Module) -> torch.Tensor:
    """``W' = W0 + s1·B1·A1`` of one layer, float32, in the base weight's shape (auxiliary branch excluded)."""
    base = layer.get_base_layer().weight.detach().float()
    return base + layer.get_delta_weight(PRIMARY).detach().float().reshape(base.shape)


def filter_normalize(direction: torch.Tensor, reference: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Li et al.'s filter normalization: ``d[i] <- d[i] / ||d[i]|| · ||w[i]||`` for every filter i along dim 0.

    ``direction`` and ``reference`` have the same shape; a filter of a 2-D weight [out, in] is an output row, of a
    4-D conv weight [out, in, kh, kw] an output channel. A zero filter of the reference gives a zero filter.
    """
    d = direction.reshape(direction.shape[0], -1).float()
    w = reference.reshape(reference.shape[0], -1).float()
    scale = w.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + eps)
    return (d * scale).reshape(direction.shape)


@dataclass
class Direction:
    """A perturbation direction: tensors moved in place (``targets``) and their offsets (``deltas``, float32)."""

    targets: list[torch.Tensor] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)

    def norm(self) -> float:
        """``||d||`` over all tensors."""
        return math.sqrt(sum(float(d.square().sum()) for d in self.deltas))


def random_direction(layers: Mapping[str, nn.Module], space: str, seed: int) -> Direction:
    """A filter-normalized Gaussian direction over all ``layers`` in ``space`` ("full" or "lora").

    Drawn on the CPU from ``seed`` layer by layer in order, so two runs of the same architecture get the same
    raw Gaussians (common random numbers); only the normalization depends on each run's weights.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    gen = torch.Generator().manual_seed(seed)
    out = Direction()
    for layer in layers.values():
        if space == "full":
            weight = layer.get_base_layer().weight
            ref = merged_weight(layer)
            raw = torch.randn(ref.shape, generator=gen)
            out.targets.append(weight)
            out.deltas.append(filter_normalize(raw, ref.cpu()).to(weight.device))
        else:
            pair = lora_pair(layer, PRIMARY)
            for param in (pair.A_param, pair.B_param):
                raw = torch.randn(param.shape, generator=gen)
                out.targets.append(param)
                out.deltas.append(filter_normalize(raw, param.detach().cpu()).to(param.device))
    return out


@contextlib.contextmanager
def moved(directions: Sequence[Direction], coefficients: Sequence[float]) -> Iterator[None]:
    """Within the context every target t is ``t + sum_k c_k·delta_k`` (in place, in t's dtype); on exit each
    target is restored bitwise from a copy (adding then subtracting would drift in low precision)."""
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for direction, c in zip(directions, coefficients, strict=True):
            for target, delta in zip(direction.targets, direction.deltas, strict=True):
                if id(target) not in saved:
                    saved[id(target)] = (target, target.detach().clone())
                if c != 0.0:
                    target.add_((c * delta).to(target.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for target, original in saved.values():
                target.copy_(original)


# -- measures ---------------------------------------------------------------------------------------------------
def curve_1d(loss_fn: LossFn, direction: Direction, alphas: Sequence[float]) -> list[float]:
    """``[L(theta + a·d) for a in alphas]``."""
    out = []
    for a in alphas:
        with moved([direction], [a]):
            out.append(float(loss_fn()))
    return out


def surface_2d(
    loss_fn: LossFn, d1: Direction, d2: Direction, alphas: Sequence[float], betas: Sequence[float]
) -> list[list[float]]:
    """``L[i][j] = L(theta + betas[i]·d2 + alphas[j]·d1)`` (rows: b, columns: a, as matplotlib's contour wants)."""
    return [[_at(loss_fn, d1, d2, a, b) for a in alphas] for b in betas]


def _at(loss_fn: LossFn, d1: Direction, d2: Direction, a: float, b: float) -> float:
    with moved([d1, d2], [a, b]):
        return float(loss_fn())


def sharpness(
    loss_fn: LossFn,
    layers: Mapping[str, nn.Module],
    radii: Sequence[float],
    n_directions: int,
    seed: int = 0,
    space: str = "full",
) -> dict:
    """Expected loss increase under random filter-normalized perturbations of the merged weights:

        S(r) = (1/K) · sum_k [L(W' + r·d_k) - L(W')],   d_k = filter_normalize(N(0, I), W'),  k = 1..K

    Returns ``{"base_loss", "radii", "increase": {r: [K values]}, "mean": {r}, "std": {r}}`` (keys of the
    per-radius dicts are ``str(r)``, so the result is JSON-ready). Direction k is drawn from ``seed + k``.
    """
    base = float(loss_fn())
    increase: dict[str, list[float]] = {str(r): [] for r in radii}
    for k in range(n_directions):
        direction = random_direction(layers, space, seed + k)
        for r in radii:
            with moved([direction], [r]):
                increase[str(r)].append(float(loss_fn()) - base)
    mean = {r: sum(v) / len(v) for r, v in increase.items()}
    std = {r: _std(v) for r, v in increase.items()}
    return {"base_loss": base, "radii": list(radii), "increase": increase, "mean": mean, "std": std}


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def landscape(
    loss_fn: LossFn,
    layers: Mapping[str, nn.Module],
    spaces: Sequence[str] = SPACES,
    spans: Mapping[str, float] | None = None,
    points: int = 21,
    n_directions: int = 2,
    grid: str = "1d",
    grid_points: int = 11,
    seed: int = 0,
) -> dict:
    """1-D curves (``n_directions`` per space) and, with ``grid="2d"``, one 2-D surface per space.

    Returns JSON-ready ``{"base_loss", space: {"span", "alphas", "curves", ["grid_alphas", "surface"]}}``;
    curve k of a space uses direction seed ``seed + k``, the surface directions ``seed`` and ``seed + 1``.
    """
    spans = {**DEFAULT_SPANS, **(spans or {})}
    out: dict = {"base_loss": float(loss_fn())}
    for space in spaces:
        span = spans[space]
        alphas = _linspace(-span, span, points)
        dirs = [random_direction(layers, space, seed + k) for k in range(max(n_directions, 2))]
        entry = {
            "span": span,
            "alphas": alphas,
            "curves": [curve_1d(loss_fn, d, alphas) for d in dirs[:n_directions]],
        }
        if grid == "2d":
            g = _linspace(-span, span, grid_points)
            entry["grid_alphas"] = g
            entry["surface"] = surface_2d(loss_fn, dirs[0], dirs[1], g, g)
        out[space] = entry
    return out


DEFAULT_SPANS = {"full": 1.0, "lora": 2.0}
"""Default half-widths of the plotted ranges, in units of filter-normalized directions (a = 1: every filter
moves by its own norm). Measured on the toy SDXL after fine-tuning: a random full-space move of the attention
projections by 25 % of each filter's norm raises the loss by ~1 %, by 100 % of it ~30 % (the residual paths
carry the rest), so the plot spans one filter norm; the rank-4 LoRA factors span twice their own norm."""


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    if n < 2:
        return [0.0]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


# -- SDXL glue: fixed evaluation batches, loss, loading a training output -------------------------------------------
def fixed_batches(
    samples: Sequence[tuple],
    num_train_timesteps: int,
    text_cache=None,
    draws: int = 2,
    seed: int = 1234,
    batch_size: int = 64,
) -> list[MicroBatch]:
    """MicroBatches of ``samples`` — ``(record, geometry, latent of the resized image)``, e.g. from
    ``SDXLTrainer.evaluation_samples`` — at fixed noise and timesteps.

    Each image appears ``draws`` times, at timesteps ``t_k = floor((k + 0.5)·T / draws)`` (stratified over
    the ``T = num_train_timesteps`` of the schedule) with noise seeded by (seed, image, k); the geometry's centre
    crop and time ids, full captions, no flip. Text embeddings come from ``text_cache`` when given (frozen text
    encoders); otherwise the loss encodes the captions, exactly as in training.
    """
    rows = []
    for i, (record, geometry, latent) in enumerate(samples):
        lat, ids = geometry.crop(latent, center=True)
        for k in range(draws):
            noise = torch.randn(lat.shape, generator=seeded(seed, i, k))
            rows.append((lat, ids, record, noise, int((k + 0.5) * num_train_timesteps / draws)))
    batches = []
    for start in range(0, len(rows), batch_size):
        by_shape: dict[tuple, list] = {}
        for row in rows[start : start + batch_size]:
            by_shape.setdefault(tuple(row[0].shape), []).append(row)
        for group in by_shape.values():
            mb = MicroBatch(
                torch.stack([r[0] for r in group]),
                torch.tensor([r[1] for r in group]),
                [r[2].caption for r in group],
                [r[2].key for r in group],
                torch.stack([r[3] for r in group]),
                torch.tensor([r[4] for r in group], dtype=torch.long),
            )
            if text_cache is not None:
                mb.prompt_embeds, mb.pooled = text_cache.get(mb.captions)
            batches.append(mb)
    return batches


def loss_function(
    loss: Callable[[MicroBatch], torch.Tensor], models: Sequence[nn.Module], batches: Sequence[MicroBatch]
) -> LossFn:
    """``L()`` = ``loss`` (a trainer's own loss of one micro-batch) averaged over ``batches`` (weighted by
    size), with the auxiliary branch of ``models`` (the trained components) off."""

    @torch.no_grad()
    def average() -> float:
        total, n = 0.0, 0
        with aux_disabled(list(models)):
            for mb in batches:
                total += float(loss(mb)) * len(mb.keys)
                n += len(mb.keys)
        return total / n

    return average


def load_trained(output_dir: str | Path, **overrides) -> SDXLTrainer:
    """An `SDXLTrainer` set up from a finished training output: the base model named in its
    training_config.yaml, its adapters loaded from bilora_adapters.safetensors, its training images cached.

    ``overrides`` replace options of the saved config (e.g. ``dataset=...`` when the run's data moved,
    ``pretrained_model_name_or_path=...``). Nothing is written to ``output_dir``.
    """
    output_dir = Path(output_dir)
    for name in (CONFIG_FILE, STATE_FILE):
        if not (output_dir / name).is_file():
            raise FileNotFoundError(f"{output_dir}: no {name} (is this a finished training output?)")
    values = read_yaml(output_dir / CONFIG_FILE, SDXLOptions)
    values.update(report_to="none", resume_from_checkpoint=None, validation_prompt=[])
    values.update({k: v for k, v in overrides.items() if v is not None})
    trainer = SDXLTrainer(SDXLOptions(**values))
    trainer.setup()  # data, models with adapters attached, caches, optimizer: as a training run does
    load_bilora_state(output_dir / STATE_FILE, trainer.trained)  # copies into the attached parameters
    for model in trainer.trained.values():
        model.eval()
    return trainer


# -- plot -----------------------------------------------------------------------------------------------------------
def plot(results: Mapping[str, dict], path: str | Path, title: str = "") -> Path:
    """One row per direction space: the 1-D curves of every run (thin: each direction, thick: their mean),
    then, if computed, each run's 2-D surface as a contour plot of ``L - L(theta)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results)
    spaces = [s for s in SPACES if any(s in results[r] for r in runs)]
    has_2d = any("surface" in results[r].get(s, {}) for r in runs for s in spaces)
    ncols = 1 + (len(runs) if has_2d else 0)
    width = max(4.2 * ncols, 6.0)
    fig, axes = plt.subplots(len(spaces), ncols, figsize=(width, 3.4 * len(spaces)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, space in enumerate(spaces):
        ax = axes[row][0]
        for i, run in enumerate(runs):
            entry = results[run].get(space)
            if entry is None:
                continue
            color = colors[i % len(colors)]
            curves = torch.tensor(entry["curves"])
            for curve in curves:
                ax.plot(entry["alphas"], curve.tolist(), color=color, alpha=0.3, linewidth=0.8)
            ax.plot(entry["alphas"], curves.mean(0).tolist(), color=color, linewidth=2, label=run)
        ax.set_xlabel(f"a ({space} space, filter-normalized)")
        ax.set_ylabel("loss")
        ax.set_title(f"1-D, {space} space")
        ax.legend(fontsize=7)
        for i, run in enumerate(runs if has_2d else []):
            ax = axes[row][1 + i]
            entry = results[run].get(space, {})
            if "surface" not in entry:
                ax.axis("off")
                continue
            z = torch.tensor(entry["surface"]) - results[run]["base_loss"]
            g = entry["grid_alphas"]
            cs = ax.contour(g, g, z.tolist(), levels=12, cmap="viridis")
            ax.clabel(cs, fontsize=6)
            ax.plot([0], [0], "r+")
            ax.set_title(f"{run}: L - L0, {space}", fontsize=9)
            ax.set_xlabel("a")
            ax.set_ylabel("b")
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, int(width * 16))), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -- command line ---------------------------------------------------------------------------------------------------
@dataclass
class LandscapeOptions:
    """Options of ``python -m bilora_diffusion.sdxl.landscape`` (the project's typed options: ``--help``,
    ``--config FILE.yaml``)."""

    usage = (
        "usage: python -m bilora_diffusion.sdxl.landscape --output_dir RUN [RUN ...] [--directions D] [--grid G] "
        "[...]\n\nLoss landscape (1-D / 2-D, full-space and LoRA-subspace directions) around trained adapters."
    )

    output_dir: list[str] = opt([], "Training output folder(s) to compare; required.")
    directions: str = opt("both", "Direction spaces.", choices=("full", "lora", "both"))
    grid: str = opt("1d", "2d adds a contour surface per run.", choices=("1d", "2d"))
    points: int = opt(21, "Points of each 1-D curve.")
    grid_points: int = opt(11, "Points per axis of the 2-D surface.")
    n_directions: int = opt(2, "Random 1-D directions per space.")
    span_full: float = opt(DEFAULT_SPANS["full"], "Largest step along a full-space direction.")
    span_lora: float = opt(DEFAULT_SPANS["lora"], "Largest step along a LoRA-subspace direction.")
    draws: int = opt(2, "Noise/timestep draws per training image.")
    max_images: int = opt(32, "Evaluate on at most this many training images.")
    seed: int = opt(0, "Seed of the directions (the same for every run).")
    dataset: str | None = opt(None, "Override the run's dataset path (if it moved).", path=True)
    pretrained_model_name_or_path: str | None = opt(None, "Override the base model path.")
    out: str | None = opt(None, "PNG path (default: <first output_dir>/landscape.png).")

    def validate(self) -> None:
        if not self.output_dir:
            raise OptionError("--output_dir is required")
        check_choices(self)
        for name in ("points", "grid_points", "n_directions", "draws", "max_images"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name} must be at least 1, got {getattr(self, name)}")


def main(argv: Sequence[str] | None = None) -> dict:
    """The tool's entry point: a bad option exits with code 2 and one line."""
    return run_cli(run, LandscapeOptions, None if argv is None else list(argv), prog="landscape")


def run(args: LandscapeOptions) -> dict:
    spaces = SPACES if args.directions == "both" else (args.directions,)
    results = {}
    for folder in args.output_dir:
        trainer = load_trained(
            folder, dataset=args.dataset, pretrained_model_name_or_path=args.pretrained_model_name_or_path
        )
        samples = trainer.evaluation_samples()[: args.max_images]
        batches = fixed_batches(
            samples, trainer.c.noise_scheduler.config.num_train_timesteps, trainer.text_cache, args.draws
        )
        layers = adapted_layers(trainer.trained)
        label = f"{Path(folder).name} ({trainer.opt.method})"
        results[label] = landscape(
            loss_function(trainer.loss, list(trainer.trained.values()), batches),
            layers,
            spaces,
            {"full": args.span_full, "lora": args.span_lora},
            args.points,
            args.n_directions,
            args.grid,
            args.grid_points,
            args.seed,
        )
        print(f"{label}: base loss {results[label]['base_loss']:.5f}", flush=True)
        del trainer
    out = Path(args.out) if args.out else Path(args.output_dir[0]) / "landscape.png"
    plot(results, out, title="Loss around the trained adapter (auxiliary branch off), training images")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    main()
