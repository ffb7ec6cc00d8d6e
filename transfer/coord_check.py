"""Coordinate check (in the spirit of muP's): activation sizes against width, per optimizer.

    python transfer/coord_check.py             # widths 64..512, 10 steps, about 5 min
    python transfer/coord_check.py --quick     # tiny widths, 8 steps (what tests run)

For each parameterisation of `transfer.sweep.PARAMETERISATIONS` and each width, the model is
evaluated at initialisation and after steps 1, 2, 4, 8, ... and the last (`record_steps`;
same seed, same data) on fixed validation sequences masked at a low and a high mask rate, as
muP's coordinate check records several steps. Recording layers are inserted with
`pz.select` (penzai's `SaveIntermediate`, after unrolling the block LayerStack), so the model
code is untouched. Per layer type the script records

    rms        root mean square of the activation coordinates at that step
    delta_rms  root mean square of (activation at that step - activation at init)

for: embedding (token embedding output), attention (attention branch output, every block),
mlp (MLP branch output, every block), residual (residual stream after the last block) and
logits. Under muP (and Modula) both should stay flat in width at every step; with standard
AdamW the update sizes grow with width, more so as steps accumulate. Results: coord.csv (one
row per model, step, mask rate and layer type), coord_check.{png,svg} (rms) and
coord_delta.{png,svg} (rms of the change): one panel per parameterisation and layer type, one
line per step against width, solid at the low mask rate and dashed at the high one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import tyro
from penzai import pz
from penzai.toolshed.save_intermediates import SaveIntermediate
from tqdm import tqdm

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import hostmem
from jif import model as model_lib
from transfer import sweep

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

LAYER_TYPES = ("embedding", "attention", "mlp", "residual", "logits")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoordConfig:
    """Which models to check and how long to train them."""

    out: str = "transfer/results/coord"
    """Folder for coord.csv and figures."""
    optimizers: tuple[str, ...] = ("adamw", "mup_adamw", "modula")
    """Parameterisations (keys of transfer.sweep.PARAMETERISATIONS)."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    """Model widths d_model."""
    depth: int = 2
    """Transformer blocks."""
    steps: int = 10
    """Training steps; activations are recorded at steps 0, 1, 2, 4, ... and this one."""
    lrs: tuple[float, ...] = ()
    """Learning rate per optimizer (same order as --optimizers); default: the centre of each
    parameterisation's sweep range."""
    mask_rates: tuple[float, ...] = (0.15, 0.85)
    """Mask rates of the probe inputs (low / high)."""
    head_dim: int = 32
    """Size of every attention head (heads = width / head_dim), as in the sweep."""
    mup_base_width: int = 0
    """muP base width (0: the smallest width)."""
    batch_size: int = 8
    """Training batch size."""
    seq_len: int = 64
    """Tokens per sequence (training and probe)."""
    n_probe: int = 8
    """Validation sequences the activations are measured on."""
    seed: int = 0
    """Seed of initialisation, data order and probe masks."""
    quick: bool = False
    """Tiny preset for tests: widths 16/32, depth 1, 8 steps (step 1 is warmup at lr 0, and
    with a zero-initialised output layer only the logits move in the next one)."""
    plot_only: bool = False
    """Only redraw the figures from an existing coord.csv."""


QUICK_OVERRIDES = dict(
    out="transfer/results/coord-quick",
    widths=(16, 32),
    depth=1,
    steps=8,
    batch_size=4,
    seq_len=16,
    n_probe=4,
    head_dim=8,
)


def resolve(config: CoordConfig) -> CoordConfig:
    """Applies --quick and fills mup_base_width; ValueError naming any bad value, every model
    config included, before anything trains."""
    if config.quick:
        config = sweep.apply_quick(config, QUICK_OVERRIDES)
    sweep.check_fields(
        config,
        dict(widths=1, depth=1, steps=1, batch_size=1, seq_len=2, head_dim=1, n_probe=1, seed=0),
        nonempty=("optimizers", "widths", "mask_rates"),
    )
    sweep.check_fields(config, dict(mup_base_width=0))
    sweep.check_head_dim(config.widths, config.head_dim)
    sweep.check_lrs(config.lrs)
    for name in config.optimizers:
        if name not in sweep.PARAMETERISATIONS:
            raise ValueError(
                f"unknown optimizer {name!r}; choose from {sorted(sweep.PARAMETERISATIONS)}"
            )
    if config.lrs and len(config.lrs) != len(config.optimizers):
        raise ValueError(
            f"--lrs has {len(config.lrs)} values for {len(config.optimizers)} optimizers; "
            "give one learning rate per optimizer, in the same order"
        )
    if not all(0.0 <= r <= 1.0 for r in config.mask_rates):  # NaN fails too
        raise ValueError(f"mask rates {config.mask_rates} must lie in [0, 1]")
    if config.mup_base_width <= 0:
        config = dataclasses.replace(config, mup_base_width=min(config.widths))
    specs = [spec(name, w, 1.0, config) for w in config.widths for name in config.optimizers]
    sweep.check_runs(sweep_config(config), specs)
    return config


def sweep_config(config: CoordConfig) -> sweep.SweepConfig:
    """The sweep settings the check trains with (transfer.sweep.CompiledRuns)."""
    return sweep.SweepConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        head_dim=config.head_dim,
        mup_base_width=config.mup_base_width,
        eval_sequences=config.n_probe,
    )


def spec(name: str, width: int, lr: float, config: CoordConfig) -> sweep.RunSpec:
    return sweep.RunSpec(optimizer=name, width=width, depth=config.depth, lr=lr, seed=config.seed)


def default_lr(name: str) -> float:
    """The geometric centre of the parameterisation's sweep range."""
    lo, hi = sweep.PARAMETERISATIONS[name].lr_range
    return float(f"{math.sqrt(lo * hi):.3g}")


# --------------------------------------------------------------------------------------------
# Recording activations with penzai


def unroll_layer_stacks(model):
    """Replaces every pz.nn.LayerStack by a Sequential of its per-block slices (same math)."""

    def slice_block(stack, i):
        return (
            pz.select(stack.stacked_sublayers)
            .at_instances_of(pz.nx.NamedArrayBase)
            .where(lambda x: stack.stack_axis in x.named_shape)
            .apply(lambda x: x[{stack.stack_axis: i}])
        )

    return (
        pz.select(model)
        .at_instances_of(pz.nn.LayerStack)
        .apply(lambda s: pz.nn.Sequential([slice_block(s, i) for i in range(s.stack_axis_size)]))
    )


def _label(layer) -> str:
    weights = getattr(layer, "weights", None)
    return getattr(weights, "label", "") or ""


def insert_recorders(model):
    """The model with a SaveIntermediate after every layer of interest; labels "coord/<type>/<i>".

    model: a DiT with bound (frozen) parameters. Returns (model, labels by layer type).
    """

    labels: dict[str, list[str]] = {name: [] for name in LAYER_TYPES}

    def tap(kind):
        def wrap(layer):
            label = f"coord/{kind}/{len(labels[kind])}"
            labels[kind].append(label)
            return pz.nn.Sequential(
                [layer, SaveIntermediate(saved=pz.StateVariable(None, label=label))]
            )

        return wrap

    model = unroll_layer_stacks(model)
    model = pz.select(model).at_instances_of(model_lib.Embed).apply(tap("embedding"))
    linears = pz.select(model).at_instances_of(pz.nn.Linear)
    model = linears.where(lambda layer: _label(layer).endswith("attn/output")).apply(
        tap("attention")
    )
    linears = pz.select(model).at_instances_of(pz.nn.Linear)
    model = linears.where(lambda layer: _label(layer).endswith("mlp/down")).apply(tap("mlp"))
    model = dataclasses.replace(model, blocks=tap("residual")(model.blocks))
    return model, labels


@jax.jit
def _forward(pure, values, tokens, rate):
    """Runs a model with recorders (state variables unbound): (logits [B, L, V], {label: value})."""

    out, new_values = pure.stateless_call(
        values,
        pz.nx.wrap(tokens).tag("batch", "seq"),
        mask_rate=pz.nx.wrap(rate).tag("batch"),
    )
    return out.unwrap("batch", "seq", "vocabulary"), {v.label: v.value for v in new_values}


def record(model, tokens: np.ndarray, mask_rate: float) -> dict[str, np.ndarray]:
    """Activations of every recorded layer plus the logits, as plain arrays.

    tokens: int32 [B, L] (already masked); mask_rate: the rate passed as side input.
    """

    tapped, labels = insert_recorders(model)
    pure, state_vars = pz.unbind_state_vars(tapped)
    values = [v.freeze() for v in state_vars]

    rate = jnp.full((tokens.shape[0],), mask_rate, jnp.float32)
    logits, saved = _forward(pure, values, jnp.asarray(tokens), rate)
    acts = {"logits": [np.asarray(logits)]}
    for kind, names in labels.items():
        if kind != "logits":
            acts[kind] = [np.asarray(saved[n].data_array) for n in names]
    return {kind: np.concatenate([a.ravel() for a in arrays]) for kind, arrays in acts.items()}


def mask_tokens(tokens: np.ndarray, rate: float, mask_id: int, seed: int) -> np.ndarray:
    """Replaces a fixed random `rate` fraction of each row's tokens by mask_id. [B, L] -> [B, L]."""
    rng = np.random.default_rng(seed)
    out = tokens.copy()
    for row in out:
        n = int(round(rate * row.size))
        row[rng.choice(row.size, n, replace=False)] = mask_id
    return out


# --------------------------------------------------------------------------------------------
# The check


def record_steps(steps: int) -> list[int]:
    """The steps at which activations are recorded: 0, 1, 2, 4, 8, ... below `steps`, and it."""
    out, k = [0], 1
    while k < steps:
        out.append(k)
        k *= 2
    return [*out, steps]


def check_one(name: str, width: int, lr: float, config: CoordConfig, runs) -> list[dict]:
    """Rows (step, layer, mask_rate, rms at init, rms and delta_rms at that step) for one
    model, at every step of `record_steps`.

    runs: a transfer.sweep.CompiledRuns (trains exactly as the sweep does).
    """

    sweep_cfg, run = sweep_config(config), spec(name, width, lr, config)
    unbound, init_params = runs.init_params(run, sweep_cfg)
    at = record_steps(config.steps)
    params = {0: init_params}

    def keep(done, p):
        if done in at:
            params[done] = jax.tree_util.tree_map(jnp.copy, p)

    _, outcome = runs.train(run, sweep_cfg, snapshots=keep)
    if outcome["diverged"]:
        raise FloatingPointError(f"{name} at width {width} diverged at lr {lr}; pass smaller --lrs")
    tokenizer = runs._data(sweep_cfg, config.seed)[0]
    probe = data_lib.validation_tokens(
        sweep_cfg.data,
        tokenizer,
        seq_len=config.seq_len,
        n_sequences=config.n_probe,
        seed=config.seed,
    )
    rows = []
    for rate in config.mask_rates:
        xt = mask_tokens(np.asarray(probe), rate, tokenizer.mask_id, config.seed)
        before = record(ckpt.bind_params(unbound, init_params), xt, rate)
        for step in at:
            after = record(ckpt.bind_params(unbound, params[step]), xt, rate)
            for kind in LAYER_TYPES:
                rows.append(
                    dict(
                        optimizer=name,
                        width=width,
                        lr=lr,
                        steps=config.steps,
                        step=step,
                        mask_rate=rate,
                        layer=kind,
                        rms_init=float(np.sqrt(np.mean(before[kind] ** 2))),
                        rms=float(np.sqrt(np.mean(after[kind] ** 2))),
                        delta_rms=float(np.sqrt(np.mean((after[kind] - before[kind]) ** 2))),
                    )
                )
    return rows


CSV_FIELDS = (
    "optimizer",
    "width",
    "lr",
    "steps",
    "step",
    "mask_rate",
    "layer",
    "rms_init",
    "rms",
    "delta_rms",
)


def plot(rows: list[dict], out: Path) -> list[Path]:
    """coord_check.{png,svg}: rms against width; coord_delta.{png,svg}: rms of the change since
    initialisation. One row of panels per optimizer, one column per layer type; one colour
    per recorded step (dark: early), solid at the lowest mask rate, dashed at the highest
    (others dotted); log-log axes. Step 0 is left out of the change (it is zero)."""

    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    rates = sorted({r["mask_rate"] for r in rows})
    steps = sorted({r["step"] for r in rows})
    colors = dict(
        zip(steps, plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(steps))), strict=True)
    )
    styles = {
        rate: "-" if rate == rates[0] else "--" if rate == rates[-1] else ":" for rate in rates
    }
    written = []
    for stem, field in (("coord_check", "rms"), ("coord_delta", "delta_rms")):
        fig, axes = plt.subplots(
            len(names),
            len(LAYER_TYPES),
            figsize=(3.0 * len(LAYER_TYPES), 2.4 * len(names)),
            squeeze=False,
        )
        for i, name in enumerate(names):
            for j, kind in enumerate(LAYER_TYPES):
                ax = axes[i][j]
                positive = False
                for rate in rates:
                    for step in steps:
                        if field == "delta_rms" and step == 0:
                            continue
                        sel = sorted(
                            (
                                r
                                for r in rows
                                if r["optimizer"] == name
                                and r["layer"] == kind
                                and r["mask_rate"] == rate
                                and r["step"] == step
                            ),
                            key=lambda r: r["width"],
                        )
                        y = np.array([r[field] for r in sel])
                        positive |= bool((y > 0).any())
                        ax.plot(
                            [r["width"] for r in sel],
                            np.where(y > 0, y, np.nan),
                            styles[rate],
                            marker="o",
                            ms=2.5,
                            lw=1,
                            color=colors[step],
                            label=f"step {step}" if rate == rates[0] else None,
                        )
                ax.set_xscale("log", base=2)
                if positive:  # all-zero panels (e.g. logits at init) stay linear
                    ax.set_yscale("log")
                    # At least a decade of y-range, so that flat really looks flat.
                    lo, hi = ax.get_ylim()
                    if hi / lo < 10:
                        centre = math.sqrt(lo * hi)
                        ax.set_ylim(centre / math.sqrt(10), centre * math.sqrt(10))
                ax.grid(alpha=0.3, which="both")
                if i == 0:
                    ax.set_title(kind)
                if j == 0:
                    ax.set_ylabel(f"{name}\n{'rms' if field == 'rms' else 'rms of change'}")
                if i == len(names) - 1:
                    ax.set_xlabel("width")
        rate_note = ", ".join(f"{styles[r]} mask {r:g}" for r in rates)
        axes[0][-1].legend(fontsize=6, title=rate_note, title_fontsize=6)
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = out / f"{stem}.{ext}"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written


def read_rows(path: Path) -> list[dict]:
    """coord.csv rows with numbers parsed."""
    if not path.exists():
        raise ValueError(f"no {path}; run the coordinate check first (without --plot-only)")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if rows and "step" not in rows[0]:
        raise ValueError(f"{path} has no step column (an older check); run it again")
    for row in rows:
        row["width"], row["steps"], row["step"] = (int(row[k]) for k in ("width", "steps", "step"))
        for name in ("lr", "mask_rate", "rms_init", "rms", "delta_rms"):
            row[name] = float(row[name])
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """The CLI (see --help). Exits with status 2 and `error: ...` on a mistake in the flags or
    a missing coord.csv, with status 1 and a message if a model diverges."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    try:
        return check(tyro.cli(CoordConfig, args=argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def check(config: CoordConfig) -> list[dict]:
    """Resolves the config, trains and measures every model, writes coord.csv and figures."""
    config = resolve(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.plot_only:
        rows = read_rows(out / "coord.csv")
        plot(rows, out)
        return rows
    print(json.dumps(dataclasses.asdict(config)), flush=True)
    lrs = dict(
        zip(
            config.optimizers, config.lrs or [default_lr(n) for n in config.optimizers], strict=True
        )
    )

    rows, runs = [], sweep.CompiledRuns()
    jobs = [(name, width) for width in config.widths for name in config.optimizers]
    for name, width in tqdm(jobs, desc="coord check", unit="model"):
        rows.extend(check_one(name, width, lrs[name], config, runs))
    with (out / "coord.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out)
    for name in config.optimizers:
        for kind in LAYER_TYPES:
            sel = sorted(
                (
                    r
                    for r in rows
                    if r["optimizer"] == name and r["layer"] == kind and r["step"] == config.steps
                ),
                key=lambda r: r["width"],
            )
            ratio = [r["delta_rms"] for r in sel if r["width"] == max(config.widths)]
            base = [r["delta_rms"] for r in sel if r["width"] == min(config.widths)]
            growth = np.mean(ratio) / np.mean(base) if np.mean(base) > 0 else math.nan
            print(
                f"{name:10s} {kind:10s} change rms at step {config.steps} x{growth:.2f} from "
                f"width {min(config.widths)} to {max(config.widths)}"
            )
    print(f"wrote {out}/coord.csv and figures")
    return rows


if __name__ == "__main__":
    main()
