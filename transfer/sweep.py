"""Width (and depth) x learning-rate sweeps: does the best learning rate stay put?

    python transfer/sweep.py                      # default grid, about 30 min on 2 CPU cores
    python transfer/sweep.py --quick              # tiny widths, few steps, about a minute
    python transfer/sweep.py --depths 1 2 4       # a depth sweep as well
    python transfer/sweep.py --plot-only          # redraw figures + summary from the CSV

Three parameterisations are compared (the `PARAMETERISATIONS` registry): AdamW on the standard
DiT (the baseline, expected not to transfer), AdamW under muP (`jif.mup`), and the Modula
optimizer on the well-normed DiT. Every run trains from the same seed on the same data order
and records its final validation NELBO (fixed time grid) and smoothed training loss as one CSV
row; rows already present are skipped, so an interrupted sweep picks up where it stopped.
Figures and `summary.json` are computed from the CSV alone (`transfer/analysis.py`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tqdm import tqdm

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import eval as jif_eval
from jif import hostmem, loop, optim, train
from jif.tokenizer import load_tokenizer
from transfer import analysis

# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A width (x depth) x learning-rate x parameterisation grid of short training runs."""

    out: str = "transfer/results/sweep"
    """Folder for runs.csv, summary.json and figures (created if missing)."""
    optimizers: tuple[str, ...] = ("adamw", "mup_adamw", "modula")
    """Parameterisations to sweep (keys of PARAMETERISATIONS)."""
    widths: tuple[int, ...] = (32, 64, 128, 256)
    """Model widths d_model (a factor 8; 512 costs as much again as all four together)."""
    depths: tuple[int, ...] = (2,)
    """Numbers of transformer blocks; several values give a depth sweep as well."""
    n_lrs: int = 7
    """Learning rates per parameterisation, log-spaced over its range."""
    lr_span: float = 0.0
    """If > 0, override every range to centre x 10^(+-lr_span/2) around its registry centre."""
    lrs: tuple[float, ...] = ()
    """Explicit learning rates for every parameterisation (overrides n_lrs / ranges)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds; each grid point is trained once per seed (same seed -> same data order/init)."""
    steps: int = 200
    """Training steps per run (warmup: a tenth of them)."""
    batch_size: int = 16
    """Sequences per batch."""
    seq_len: int = 64
    """Tokens per sequence."""
    n_heads: int = 4
    """Attention heads at every width (head size = width / n_heads)."""
    mup_base_width: int = 0
    """Base width for muP (0: the smallest width of the sweep)."""
    data: str = "stories"
    """Training data (see jif.data)."""
    eval_sequences: int = 64
    """Validation sequences for the final NELBO (fixed set, fixed time grid)."""
    eval_times: int = 8
    """Points of the fixed time grid of the validation NELBO."""
    metric: str = "val_nelbo"
    """Outcome used for optima: "val_nelbo" or "train_loss_smoothed"."""
    quick: bool = False
    """Tiny preset for tests: widths 16/32, depth 1, 3 learning rates, few steps."""
    plot_only: bool = False
    """Only redraw figures and summary.json from the existing CSV."""
    progress: bool = True
    """Show a tqdm bar over the whole grid."""
    engine: str = "compiled"
    """How runs are trained: "compiled" (one compiled step per shape, lr as data; fast) or
    "train_run" (a full jif.train.run per grid point; same training, EMA evaluated)."""


QUICK_OVERRIDES = dict(
    out="transfer/results/sweep-quick",
    widths=(16, 32),
    depths=(1,),
    n_lrs=3,
    steps=12,
    batch_size=4,
    seq_len=16,
    n_heads=2,
    eval_sequences=8,
    eval_times=2,
)
# Settings that must match between a resumed sweep and its CSV (the grid may grow).
RUN_SETTINGS = (
    "steps",
    "batch_size",
    "seq_len",
    "n_heads",
    "mup_base_width",
    "data",
    "eval_sequences",
    "eval_times",
    "engine",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parameterisation:
    """How one curve family is trained."""

    arch: str
    """ModelConfig.arch."""
    optimizer: str
    """jif.optim.OPTIMIZERS key."""
    mup: bool
    """Whether ModelConfig.mup_base_width is set."""
    lr_range: tuple[float, float]
    """Default (smallest, largest) learning rate of the log grid."""


PARAMETERISATIONS: dict[str, Parameterisation] = {
    "adamw": Parameterisation(arch="standard", optimizer="adamw", mup=False, lr_range=(3e-4, 3e-1)),
    "mup_adamw": Parameterisation(
        arch="standard", optimizer="mup_adamw", mup=True, lr_range=(3e-4, 3e-1)
    ),
    "modula": Parameterisation(arch="modula", optimizer="modula", mup=False, lr_range=(1e-2, 10.0)),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run of the grid."""

    optimizer: str
    width: int
    depth: int
    lr: float
    seed: int

    def key(self) -> tuple[str, int, int, str, int]:
        return (self.optimizer, self.width, self.depth, f"{self.lr:.6g}", self.seed)


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


def resolve(config: SweepConfig) -> SweepConfig:
    """Applies --quick and fills mup_base_width; validates names and values."""
    if config.quick:
        config = apply_quick(config, QUICK_OVERRIDES)
    for name in config.optimizers:
        if name not in PARAMETERISATIONS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(PARAMETERISATIONS)}")
    if config.metric not in ("val_nelbo", "train_loss_smoothed"):
        raise ValueError(f"metric {config.metric!r}: use 'val_nelbo' or 'train_loss_smoothed'")
    for width in config.widths:
        if width <= 0 or width % config.n_heads:
            raise ValueError(
                f"width {width} must be a positive multiple of n_heads={config.n_heads}"
            )
    if not config.lrs and config.n_lrs < 1:
        raise ValueError(f"n_lrs={config.n_lrs} must be >= 1 (or pass --lrs)")
    if config.mup_base_width <= 0:
        config = dataclasses.replace(config, mup_base_width=min(config.widths))
    return config


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
    return [float(f"{lr:.3g}") for lr in np.geomspace(lo, hi, config.n_lrs)]


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
# Running


def train_config_for(spec: RunSpec, config: SweepConfig) -> train.TrainConfig:
    """The jif.train.TrainConfig of one run (nothing written to disk)."""
    p = PARAMETERISATIONS[spec.optimizer]
    return train.TrainConfig(
        d_model=spec.width,
        n_layers=spec.depth,
        n_heads=config.n_heads,
        arch=p.arch,
        mup_base_width=config.mup_base_width if p.mup else None,
        data=config.data,
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        optim=optim.OptimConfig(
            optimizer=p.optimizer,
            lr=spec.lr,
            embed_lr_mult=1.0,  # one learning rate for every parameter: the question is its transfer
            warmup=max(1, config.steps // 10),
        ),
        seed=spec.seed,
        out=None,
        ckpt_every=0,
        eval=jif_eval.EvalConfig(
            eval_every=config.steps,  # evaluate once, at the end
            eval_sequences=config.eval_sequences,
            eval_times=config.eval_times,
            n_samples=0,
        ),
        progress=False,
    )


def train_run(spec: RunSpec, config: SweepConfig) -> dict:
    """Trains one grid point with jif.train.run; a non-finite loss counts as diverged."""
    with contextlib.redirect_stdout(io.StringIO()):  # keep the grid's progress bar readable
        result = train.run(train_config_for(spec, config), progress=False)
    nan_if_none = lambda v: math.nan if v is None else float(v)
    return {
        "val_nelbo": nan_if_none(result.get("val_nelbo")),
        "train_loss_smoothed": nan_if_none(result.get("train_loss_smoothed")),
        "diverged": bool(result.get("diverged", False)),
    }


RunFn = Callable[[RunSpec, SweepConfig], dict]


class _LrState(NamedTuple):
    lr: Any  # float32 scalar, part of the optimizer state so it is data, not a constant


def scale_by_state_lr() -> optax.GradientTransformation:
    """Multiplies updates by the learning rate held in the state (set per run, traced)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: u * state.lr.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: _LrState(jnp.ones((), jnp.float32)), update)


class CompiledRuns:
    """The default run function: trains like jif.train.run (same model, optimizer registry,
    schedule, clipping, data order and train step, `jif.loop`), but compiles the step once
    per (optimizer, width, depth, seed) and passes the learning rate as data.

    This is exact because every optimizer swept is linear in its learning rate (AdamW, muP
    AdamW and Modula all end in scale_by_learning_rate, weight decay included): the optimizer
    is built with lr = 1 and its updates are multiplied by the run's lr. The final *raw*
    parameters are evaluated (an EMA lags far behind in runs this short).
    """

    def __init__(self):
        self._groups: dict[tuple, dict] = {}
        self._shared: dict[tuple, Any] = {}

    def _data(self, config: SweepConfig, seed: int):
        key = ("data", seed, *(getattr(config, n) for n in RUN_SETTINGS))
        if key not in self._shared:
            tokenizer = load_tokenizer()
            batches = data_lib.TokenBatches(
                config.data,
                tokenizer,
                split="train",
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                seed=seed,
            )
            train_batches = [next(batches) for _ in range(config.steps)]
            val = data_lib.validation_tokens(
                config.data,
                tokenizer,
                seq_len=config.seq_len,
                n_sequences=config.eval_sequences,
                seed=seed,
            )
            self._shared[key] = (tokenizer, train_batches, jif_eval.batched(val, config.batch_size))
        return self._shared[key]

    def _group(self, spec: RunSpec, config: SweepConfig) -> dict:
        key = (spec.optimizer, spec.width, spec.depth, spec.seed, id(config))
        if key not in self._groups:
            tokenizer, _, _ = self._data(config, spec.seed)
            cfg = train_config_for(dataclasses.replace(spec, lr=1.0), config)
            model_config = train.resolve_model_config(cfg, tokenizer.vocab_size)
            unbound, params = ckpt.init_model(model_config, cfg.seed)
            tx, _ = optim.make_optimizer(cfg.optim, cfg.steps, model_config, params)
            tx = optax.chain(tx, scale_by_state_lr())
            step = loop.make_train_step(
                unbound, tx, seed=cfg.seed, ema=cfg.ema, mask_id=tokenizer.mask_id
            )
            self._groups = {key: dict(unbound=unbound, params=params, tx=tx, step=jax.jit(step))}
        return self._groups[key]

    def train(self, spec: RunSpec, config: SweepConfig) -> tuple[Any, dict]:
        """Trains one run: (final parameters or None if diverged, outcome without val_nelbo)."""
        _, batches, _ = self._data(config, spec.seed)
        g = self._group(spec, config)
        state = loop.init_state(g["params"], g["tx"])
        opt_state = state["opt_state"]
        state["opt_state"] = (*opt_state[:-1], _LrState(jnp.asarray(spec.lr, jnp.float32)))
        last = None
        try:
            for s in loop.steps(g["step"], state, iter(batches), start=0, stop=len(batches)):
                last = s
        except loop.Diverged:
            return None, {"train_loss_smoothed": math.nan, "diverged": True}
        return last.state["params"], {"train_loss_smoothed": last.smoothed, "diverged": False}

    def init_params(self, spec: RunSpec, config: SweepConfig) -> tuple[Any, dict]:
        """(unbound model, initial parameters) of the run's shape and seed."""
        g = self._group(spec, config)
        return g["unbound"], g["params"]

    def __call__(self, spec: RunSpec, config: SweepConfig) -> dict:
        params, outcome = self.train(spec, config)
        if params is None:
            return {"val_nelbo": math.nan, **outcome}
        tokenizer, _, val = self._data(config, spec.seed)
        model = ckpt.bind_params(self._group(spec, config)["unbound"], params)
        result = jif_eval.val_nelbo(
            model, val, mask_id=tokenizer.mask_id, n_times=config.eval_times
        )
        return {"val_nelbo": result["nelbo"], **outcome}


RUNNERS: dict[str, Callable[[], RunFn]] = {
    "compiled": CompiledRuns,
    "train_run": lambda: train_run,
}


def _row_key(row: dict) -> tuple[str, int, int, str, int]:
    return (row["optimizer"], row["width"], row["depth"], f"{row['lr']:.6g}", row["seed"])


def _check_settings(out: Path, config: SweepConfig) -> None:
    """Stores the run settings beside the CSV; refuses to mix rows trained differently."""
    settings = {name: getattr(config, name) for name in RUN_SETTINGS}
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        old = {k: old.get(k, v) for k, v in settings.items()}  # settings added later: default
        if old != settings:
            raise ValueError(
                f"{out} holds runs trained with {old}, but this sweep uses {settings}; "
                "pass another --out (or delete the folder) to start a new sweep."
            )
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def run_sweep(config: SweepConfig, run_fn: RunFn) -> list[dict]:
    """Trains every grid point missing from runs.csv, appending one row per finished run."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, config)
    path = out / "runs.csv"
    done = {_row_key(row) for row in analysis.read_rows(path)}
    todo = [spec for spec in grid(config) if spec.key() not in done]
    n_total = len(grid(config))
    bar = None
    if config.progress:
        bar = tqdm(total=n_total, initial=n_total - len(todo), desc="sweep", unit="run")
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        for spec in todo:
            if bar is not None:
                bar.set_postfix_str(
                    f"{spec.optimizer} w={spec.width} d={spec.depth} lr={spec.lr:.3g}"
                )
            start = time.perf_counter()
            result = run_fn(spec, config)
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
                    seconds=f"{time.perf_counter() - start:.2f}",
                )
            )
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(1)
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
    summary = analysis.summarize(rows, config.metric)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    analysis.plot(summary, out)
    return summary


def main(argv: Sequence[str] | None = None, run_fn: RunFn | None = None) -> dict:
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    config = resolve(tyro.cli(SweepConfig, args=argv))
    if not config.plot_only:
        print(json.dumps(dataclasses.asdict(config)), flush=True)
        if config.engine not in RUNNERS:
            raise ValueError(f"engine {config.engine!r}: choose from {sorted(RUNNERS)}")
        run_sweep(config, run_fn or RUNNERS[config.engine]())
    summary = analyse(config)
    for name, entry in summary["optimizers"].items():
        opt = ", ".join(f"w{o['width']}/d{o['depth']}: {o['best_lr']:.3g}" for o in entry["optima"])
        spread = entry["spread"]
        print(f"{name:10s} best lr {opt}; spread {spread if spread is None else f'{spread:.2f}x'}")
    print(f"wrote {config.out}/summary.json and figures")
    return summary


if __name__ == "__main__":
    main()
