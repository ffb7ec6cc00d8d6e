"""Width (and depth) x learning-rate sweeps: does the best learning rate stay put?

    python transfer/sweep.py                      # default grid (docs/transfer.md: wall time)
    python transfer/sweep.py --quick              # tiny widths, few steps, about a minute
    python transfer/sweep.py --depths 1 2 4       # a depth sweep as well
    python transfer/sweep.py --plot-only          # redraw figures + summary from the CSV

Three parameterisations are compared (the `PARAMETERISATIONS` registry): AdamW on the standard
DiT (the baseline, expected not to transfer), AdamW under muP (`jif.mup`), and the Modula
optimizer on the well-normed DiT. The runs of one seed share its initialisation and data
order; each records its final validation NELBO (fixed time grid) and smoothed training loss
as one CSV row; rows already present are skipped, so an interrupted sweep picks up where it
stopped. `summary.json` (optima, seed ranges, basins, drift and a verdict per depth) and the
figures are computed from the CSV and the unigram plateau (`transfer/analysis.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import tyro
from tqdm import tqdm

from jif import data as data_lib
from jif import hostmem, train
from jif.tokenizer import load_tokenizer
from transfer import analysis, batched, runs, workers
from transfer.runs import (  # noqa: F401 (re-exported: the sweep's names)
    PARAMETERISATIONS,
    RUN_SETTINGS,
    RUNNERS,
    CompiledRuns,
    Parameterisation,
    RunFn,
    RunSpec,
    _LrState,
    scale_by_state_lr,
    train_config_for,
    train_run,
)

# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A width (x depth) x learning-rate x parameterisation grid of short training runs."""

    out: str = "docs/transfer"
    """Folder for runs.csv, summary.json and figures (created if missing); the default's results
    are the committed ones (docs/transfer.md)."""
    optimizers: tuple[str, ...] = ("adamw", "mup_adamw", "modula")
    """Parameterisations to sweep (keys of PARAMETERISATIONS)."""
    widths: tuple[int, ...] = (32, 64, 128)
    """Model widths d_model (a factor 4; 256 would cost as much again as all three together)."""
    depths: tuple[int, ...] = (2,)
    """Numbers of transformer blocks; several values give a depth sweep as well."""
    n_lrs: int = 5
    """Learning rates per parameterisation, log-spaced over its range (5: a factor 3.16 apart)."""
    lr_span: float = 0.0
    """If > 0, override every range to centre x 10^(+-lr_span/2) around its registry centre."""
    centre_half_steps: bool = False
    """Also train the two points half a grid step either side of the range's centre (a factor
    1.78 for 5 points a factor 3.16 apart; odd n_lrs only). Off by default: at that spacing
    the curves are flat to within the seeds' noise, so no basin shows (docs/transfer.md)."""
    lrs: tuple[float, ...] = ()
    """Explicit learning rates for every parameterisation (overrides n_lrs / ranges)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds; each grid point is trained once per seed (same seed -> same data order/init)."""
    steps: int = 1600
    """Training steps per run (warmup: a tenth of them)."""
    batch_size: int = 8
    """Sequences per batch."""
    seq_len: int = 64
    """Tokens per sequence."""
    head_dim: int = 32
    """Size of every attention head; a model of width w has w / head_dim heads. A fixed head
    size keeps each head's logit scale the same at every width, so the sweep varies the
    matrices' widths only (why 32: docs/transfer.md, "Method")."""
    mup_base_width: int = 0
    """Base width for muP (0: the smallest width of the sweep)."""
    embed_lr_mult: float = 100.0
    """AdamW and muP AdamW: the embedding table's learning rate as a fixed multiple of the swept
    learning rate, the same at every width (jif.train's default; Modula needs none)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule's end, as a fraction of the peak learning rate (the sweep's own,
    fixed so that its runs stay comparable whatever jif.train's default is)."""
    data: str = "stories"
    """Training data (see jif.data)."""
    eval_sequences: int = 64
    """Validation sequences for the final NELBO (fixed set, fixed time grid)."""
    eval_times: int = 8
    """Points of the fixed time grid of the validation NELBO."""
    metric: str = "val_nelbo"
    """Outcome used for optima: "val_nelbo" or "train_loss_smoothed"."""
    quick: bool = False
    """Tiny preset for tests: widths 16/32, depth 1, 3 learning rates, 2 seeds, few steps."""
    plot_only: bool = False
    """Only redraw figures and summary.json from the existing CSV."""
    progress: bool = True
    """Show a tqdm bar over the whole grid."""
    workers: int = 0
    """Processes that train groups side by side on CPU, the cores split between them (0: one
    per core, at most one per group, and one on an accelerator; transfer/workers.py)."""
    engine: str = "batched"
    """How runs are trained: "batched" (every lr and seed of a shape as one vmapped program,
    transfer/batched.py), "compiled" (one compiled step per shape and seed, lr as data) or
    "train_run" (a full jif.train.run per grid point; same training, EMA evaluated)."""


QUICK_OVERRIDES = dict(
    out="transfer/results/sweep-quick",
    widths=(16, 32),
    depths=(1,),
    n_lrs=3,
    seeds=(0, 1),
    steps=12,
    batch_size=4,
    seq_len=16,
    head_dim=16,
    eval_sequences=8,
    eval_times=2,
)
CSV_FIELDS = (
    "optimizer",
    "width",
    "depth",
    "lr",
    "seed",
    "steps",
    "val_nelbo",
    "train_loss_smoothed",
    "diverged",
    "seconds",
)


def apply_quick(config, overrides: dict):
    """--quick: the quick value of every field the user left at its default."""
    default = type(config)()
    quick = {k: v for k, v in overrides.items() if getattr(config, k) == getattr(default, k)}
    return dataclasses.replace(config, **quick)


def check_fields(config, at_least: dict[str, float], nonempty: tuple[str, ...] = ()) -> None:
    """ValueError naming the first field (or value of a tuple field) below its minimum, NaN,
    or a tuple field left empty; messages use the flag's name."""
    flag = lambda name: "--" + name.replace("_", "-")
    for name in nonempty:
        if not getattr(config, name):
            raise ValueError(f"{flag(name)} needs at least one value")
    for name, lo in at_least.items():
        value = getattr(config, name)
        for v in value if isinstance(value, tuple) else (value,):
            if not (math.isfinite(v) and v >= lo):  # NaN and inf fail too
                raise ValueError(f"{flag(name)} {v}: must be a finite number >= {lo}")


def check_head_dim(widths: Sequence[int], head_dim: int) -> None:
    """ValueError for a width that is not a multiple of the head size."""
    for width in widths:
        if width % head_dim:
            raise ValueError(f"width {width} must be a positive multiple of --head-dim {head_dim}")


def check_lrs(lrs: Sequence[float]) -> None:
    """ValueError for a learning rate that is not a finite positive number."""
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lrs {lr}: a learning rate must be a finite number > 0")


def resolve(config: SweepConfig) -> SweepConfig:
    """Applies --quick and fills mup_base_width; validates names and values (ValueError)."""
    if config.quick:
        config = apply_quick(config, QUICK_OVERRIDES)
    check_fields(
        config,
        dict(widths=1, depths=1, seeds=0, steps=1, batch_size=1, seq_len=2, head_dim=1),
        nonempty=("optimizers", "widths", "depths", "seeds"),
    )
    check_fields(
        config,
        dict(
            eval_sequences=1,
            eval_times=1,
            mup_base_width=0,
            lr_span=0,
            embed_lr_mult=0,
            workers=0,
        ),
    )
    check_lrs(config.lrs)
    for name in config.optimizers:
        if name not in PARAMETERISATIONS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(PARAMETERISATIONS)}")
    if config.metric not in ("val_nelbo", "train_loss_smoothed"):
        raise ValueError(f"metric {config.metric!r}: use 'val_nelbo' or 'train_loss_smoothed'")
    if config.engine not in ENGINES:
        raise ValueError(f"engine {config.engine!r}: choose from {sorted(ENGINES)}")
    if config.engine == "train_run" and "mup_adamw" in config.optimizers:
        if config.embed_lr_mult != 1.0:
            raise ValueError(
                "--engine train_run trains mup_adamw without an embedding multiplier; pass "
                "--embed-lr-mult 1, or --engine compiled or batched"
            )
    check_head_dim(config.widths, config.head_dim)
    if config.workers > 1:
        workers.core_sets(config.workers)  # ValueError if there are fewer cores
    if not config.lrs and config.n_lrs < 1:
        raise ValueError(f"n_lrs={config.n_lrs} must be >= 1 (or pass --lrs)")
    if config.mup_base_width <= 0:
        config = dataclasses.replace(config, mup_base_width=min(config.widths))
    return config


def check_runs(config: SweepConfig, specs: Sequence[RunSpec] | None = None) -> None:
    """Every run's jif.train config and model config is valid, and the data opens: ValueError
    before anything trains (not at the first run of an odd shape, hours in)."""
    vocab = load_tokenizer().vocab_size
    for spec in {(s.optimizer, s.width, s.depth): s for s in specs or grid(config)}.values():
        cfg = train_config_for(spec, config)
        train.validate(cfg)
        train.resolve_model_config(cfg, vocab)
    data_lib.data_identity(config.data)  # DataError for a missing or unknown source


def lr_grid(config: SweepConfig, name: str) -> list[float]:
    """The learning rates tried for one parameterisation (ascending, rounded to 3 digits)."""
    if config.lrs:
        return sorted(float(lr) for lr in config.lrs)
    lo, hi = PARAMETERISATIONS[name].lr_range
    if config.lr_span > 0:
        centre = math.sqrt(lo * hi)
        lo, hi = centre * 10 ** (-config.lr_span / 2), centre * 10 ** (config.lr_span / 2)
    if config.n_lrs == 1:
        return [float(f"{math.sqrt(lo * hi):.3g}")]
    lrs = list(np.geomspace(lo, hi, config.n_lrs))
    if config.centre_half_steps and config.n_lrs % 2 == 1:
        half_step = (hi / lo) ** (0.5 / (config.n_lrs - 1))
        lrs += [math.sqrt(lo * hi) / half_step, math.sqrt(lo * hi) * half_step]
    return sorted(float(f"{lr:.3g}") for lr in lrs)


def grid(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, smallest models first (so early results arrive early)."""
    specs = []
    for depth in config.depths:
        for width in config.widths:
            for name in config.optimizers:
                for lr in lr_grid(config, name):
                    for seed in config.seeds:
                        specs.append(
                            RunSpec(optimizer=name, width=width, depth=depth, lr=lr, seed=seed)
                        )
    return sorted(specs, key=lambda s: (s.width * s.width * s.depth, s.optimizer, s.seed, s.lr))


# --------------------------------------------------------------------------------------------
# Running: one CSV row per finished run (how a run trains: transfer/runs.py)


def _row_key(row: dict) -> tuple[str, int, int, str, int]:
    return (row["optimizer"], row["width"], row["depth"], f"{row['lr']:.6g}", row["seed"])


def _check_settings(out: Path, config: SweepConfig) -> None:
    """Stores the run settings beside the CSV; refuses to mix rows trained differently."""
    settings = {name: getattr(config, name) for name in RUN_SETTINGS}
    path = out / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}), so the runs in {out} cannot be checked "
                "against this sweep; pass another --out to start a new sweep."
            ) from None
        old = {k: old.get(k, v) for k, v in settings.items()}  # settings added later: default
        if old != settings:
            raise ValueError(
                f"{out} holds runs trained with {old}, but this sweep uses {settings}; "
                "pass another --out (or delete the folder) to start a new sweep."
            )
    else:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, path)  # never a half-written settings.json


ENGINES = {**RUNNERS, "batched": batched.BatchedRuns}  # --engine: how runs are trained


def group_runs(todo: list[RunSpec], run_fn) -> list[list[RunSpec]]:
    """The runs to train together: one group per (optimizer, width, depth) for an engine
    that trains groups (`run_group`), else one run each."""
    if not hasattr(run_fn, "run_group"):
        return [[spec] for spec in todo]
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in todo:
        groups.setdefault((spec.optimizer, spec.width, spec.depth), []).append(spec)
    return list(groups.values())


def run_sweep(config: SweepConfig, run_fn: RunFn, platform: str = "given") -> list[dict]:
    """Trains every grid point missing from runs.csv, appending one row per finished run.
    `platform` is where the sweep's own engine trains ("cpu", "gpu", ...), for --workers 0;
    "given" (a caller's run function) trains in this process unless --workers says more."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, config)
    path = out / "runs.csv"
    repaired = analysis.repair_csv(path)
    if repaired:
        print(repaired, file=sys.stderr, flush=True)
    done = {_row_key(row) for row in analysis.read_rows(path)}
    todo = [spec for spec in grid(config) if spec.key() not in done]
    n_total = len(grid(config))
    bar = None
    if config.progress:
        bar = tqdm(total=n_total, initial=n_total - len(todo), desc="sweep", unit="run")
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        groups = group_runs(todo, run_fn)
        n_workers = workers.resolve_workers(config.workers, len(groups), platform)
        if bar is not None and n_workers > 1:
            bar.set_postfix_str(f"{n_workers} workers")
        cost = lambda g: g[0].width ** 2 * g[0].depth * len(g)  # big groups first
        trained = workers.train_groups(groups, config, run_fn, n_workers, cost)
        for group, results, seconds in trained:
            seconds /= len(group)  # a group's runs share its time
            if bar is not None and n_workers == 1:
                spec = group[0]
                lrs = f"{len(group)} runs" if len(group) > 1 else f"lr={spec.lr:.3g}"
                bar.set_postfix_str(f"{spec.optimizer} w={spec.width} d={spec.depth} {lrs}")
            for spec, result in zip(group, results, strict=True):
                val, train = float(result["val_nelbo"]), float(result["train_loss_smoothed"])
                diverged = bool(result.get("diverged", False)) or not (
                    math.isfinite(val) and math.isfinite(train)
                )
                writer.writerow(
                    dict(
                        optimizer=spec.optimizer,
                        width=spec.width,
                        depth=spec.depth,
                        lr=f"{spec.lr:.6g}",
                        seed=spec.seed,
                        steps=config.steps,
                        val_nelbo=f"{val:.6f}",
                        train_loss_smoothed=f"{train:.6f}",
                        diverged=diverged,
                        seconds=f"{seconds:.2f}",
                    )
                )
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(group))
    if bar is not None:
        bar.close()
    return analysis.read_rows(path)


def analyse(config: SweepConfig) -> dict:
    """CSV -> summary.json + figures; returns the summary."""
    out = Path(config.out)
    rows = analysis.read_rows(out / "runs.csv")
    if not rows:
        raise ValueError(
            f"no runs in {out / 'runs.csv'}; run the sweep first (without --plot-only)"
        )
    plateau = runs.unigram_plateau(config)
    summary = analysis.summarize(rows, config.metric, plateau)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    analysis.plot(summary, out)
    return summary


def main(argv: Sequence[str] | None = None, run_fn: RunFn | None = None) -> dict:
    """The CLI (see --help). Exits with status 2 and `error: ...` on a mistake in the flags,
    the data or the output folder."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    try:
        config = resolve(tyro.cli(SweepConfig, args=argv))
        if not config.plot_only:
            print(json.dumps(dataclasses.asdict(config)), flush=True)
            check_runs(config)
            if run_fn is None:
                run_sweep(config, ENGINES[config.engine](), jax.default_backend())
            else:
                run_sweep(config, run_fn)
        summary = analyse(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"unigram plateau {summary['unigram_plateau']:.3f} nats/token")
    print(f"verdict rule: {summary['verdict_rule']}")
    for name, entry in summary["optimizers"].items():
        for depth, d in entry["depths"].items():
            optima = [o for o in entry["optima"] if str(o["depth"]) == depth]
            opt = ", ".join(
                f"w{o['width']} {o['best_lr']:.3g}{' (edge)' if o['at_edge'] else ''}"
                + ("" if o["best_loss"] is None else f" at {o['best_loss']:.2f}")
                for o in optima
            )
            print(
                f"{name:10s} d{depth} best lr (loss) {opt}: {d['verdict']} ({d['verdict_reason']})"
            )
    print(f"wrote {config.out}/summary.json and figures")
    return summary


if __name__ == "__main__":
    main()
