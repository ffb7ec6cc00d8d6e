"""Sweep analysis: runs.csv rows -> loss curves -> optima -> verdicts (summary.json).

Reads only the CSV rows (`read_rows`) and the unigram plateau (a number the sweep computes
from the data), so the summary and figures (`transfer/plots.py`) can be redrawn at any time
(`python transfer/sweep.py --plot-only`).

Every optimum comes from measured points: the grid point with the best mean loss over seeds.
A parabola in log(lr) through it and its two neighbours may move the *location* between
those neighbours; the loss reported is the measured mean at the grid point, never a fitted
value. `VERDICT_RULE` says how a width sweep is judged.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transfer.plots import plot  # noqa: F401 (re-exported: the figures of a summary)

INT_FIELDS = ("width", "depth", "seed", "steps")
FLOAT_FIELDS = ("lr", "val_nelbo", "train_loss_smoothed", "seconds")


def _parse(row: dict) -> dict:
    """One CSV row with its numbers parsed; ValueError if a field is missing or malformed."""
    missing = [f for f in (*INT_FIELDS, *FLOAT_FIELDS, "diverged") if row.get(f) is None]
    if missing or None in row:  # too few fields, or too many
        raise ValueError(f"fields {missing or 'beyond the header'} missing or extra")
    out = dict(row)
    for name in INT_FIELDS:
        out[name] = int(row[name])
    for name in FLOAT_FIELDS:
        out[name] = float(row[name])
    if row["diverged"] not in ("True", "False", "true", "false", "1", "0"):
        raise ValueError(f"diverged={row['diverged']!r} is not True or False")
    out["diverged"] = row["diverged"] in ("True", "true", "1")
    return out


def _split_torn(text: str) -> tuple[str, str]:
    """(the CSV text without a torn last row, that row or ""). A run killed while its row was
    written leaves a last line without its line end, or one whose fields do not parse."""
    if not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        return text[:cut], text[cut:]
    cut = text.rfind("\n", 0, len(text) - 1) + 1
    if cut == 0:  # the header alone
        return text, ""
    last = text[cut:]
    try:
        _parse(next(csv.DictReader(io.StringIO(text[: text.index("\n") + 1] + last))))
    except ValueError:
        return text[:cut], last.rstrip("\r\n")
    return text, ""


def repair_csv(path: Path) -> str | None:
    """Cuts a torn last row (a run killed while its row was written) off runs.csv, so that
    the sweep can append again; returns what was cut, as a message, or None."""
    if not path.exists():
        return None
    text = path.read_text()
    good, torn = _split_torn(text)
    if not torn:
        return None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(good)
    os.replace(tmp, path)  # all or nothing: the file is never half repaired
    return (
        f"{path}: removed a torn last row {torn[:80]!r} (cut mid-write); its run is trained again"
    )


def read_rows(path: Path) -> list[dict]:
    """The CSV rows with numeric fields parsed (empty list if no file). A torn last row (see
    `repair_csv`) is left out with a warning; a malformed row elsewhere is a ValueError
    naming its line."""
    if not path.exists():
        return []
    good, torn = _split_torn(path.read_text())
    if torn:
        print(f"warning: {path}: ignoring a torn last row {torn[:80]!r}", file=sys.stderr)
    rows = []
    reader = csv.DictReader(io.StringIO(good))
    for row in reader:
        try:
            rows.append(_parse(row))
        except ValueError as e:
            raise ValueError(
                f"{path} line {reader.line_num} is malformed ({e}); delete that line (its run "
                "is trained again) or pass another --out."
            ) from None
    return rows


LEARNS_MARGIN = 1.5
"""A run learns when its loss is at least this many nats/token below the unigram plateau."""
SLOPE_TOLERANCE = 0.25
"""|d log(optimum) / d log(width)| below this (under 1.19x per doubling) counts as flat."""
VERDICT_RULE = (
    f"inconclusive unless every width learns (best mean loss >= {LEARNS_MARGIN} nats below the "
    "unigram plateau), has a basin (both grid neighbours of the best point worse than it on "
    "every seed, each seed compared with itself) and has its optimum inside the grid; then "
    "'transfers' if every seed's slope of log(optimum) against log(width) lies within "
    f"+-{SLOPE_TOLERANCE}, "
    "'drifts' if every seed's lies outside it, else inconclusive"
)


def fit_optimum(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, float, str]:
    """Best learning rate of a loss curve: (lr, loss, method).

    lrs: ascending grid [n]; losses: [n], inf/nan for diverged points. The loss is always the
    measured minimum. The location is the vertex of a parabola in log(lr) through the
    minimum and its two neighbours ("parabola"; a convex triple's vertex lies between the
    neighbours); at the edge of the grid, next to a diverged point, or for a non-convex
    triple it is the grid point ("grid").
    """
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    y = np.where(np.isfinite(y), y, np.inf)
    if not np.isfinite(y).any():
        return math.nan, math.nan, "diverged"
    i = int(np.argmin(y))
    if i == 0 or i == len(y) - 1 or not np.isfinite(y[i - 1 : i + 2]).all():
        return float(lrs[i]), float(y[i]), "grid"
    a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    if a <= 0:
        return float(lrs[i]), float(y[i]), "grid"
    vertex = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
    return float(np.exp(vertex)), float(y[i]), "parabola"


def seed_curves(rows: list[dict], metric: str) -> dict[tuple[str, int, int], dict]:
    """(optimizer, width, depth) -> {"lrs": ascending, "seeds": ascending,
    "losses": [n_seeds, n_lrs] array (inf: diverged, nan: not run)}."""
    groups: dict[tuple[str, int, int], dict[tuple[float, int], float]] = {}
    for row in rows:
        value = math.inf if row["diverged"] else row[metric]
        key = (row["optimizer"], row["width"], row["depth"])
        groups.setdefault(key, {})[(row["lr"], row["seed"])] = value
    out = {}
    for key, by_point in groups.items():
        lrs = sorted({lr for lr, _ in by_point})
        seeds = sorted({s for _, s in by_point})
        losses = np.full((len(seeds), len(lrs)), np.nan)
        for (lr, s), v in by_point.items():
            losses[seeds.index(s), lrs.index(lr)] = v
        out[key] = {"lrs": lrs, "seeds": seeds, "losses": losses}
    return out


def curves(rows: list[dict], metric: str) -> dict[tuple[str, int, int], tuple[list, list]]:
    """(optimizer, width, depth) -> (lrs ascending, mean loss over seeds; inf if any diverged
    or is missing)."""
    out = {}
    for key, c in seed_curves(rows, metric).items():
        mean = np.where(np.isnan(c["losses"]), np.inf, c["losses"]).mean(axis=0)
        out[key] = (c["lrs"], [float(v) for v in mean])
    return out


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _worse_on_every_seed(excess: np.ndarray) -> bool:
    """Whether a neighbour is worse than the best point on every seed, from each seed's excess
    loss there (the same seed at both points: same data order and initialisation, so a seed's
    offset common to every learning rate cancels). A diverged neighbour (inf) is worse; a best
    point that diverged on a seed (nan) is not a basin. On a flat, noisy curve each seed finds
    the middle of three points lowest with chance 1/3, so all of 3 seeds with chance 1/27."""
    return bool((excess > 0).all())


def optimum(lrs: list[float], losses: np.ndarray, plateau: float | None) -> dict:
    """The optimum of one (parameterisation, width, depth) from its runs.

    losses: [n_seeds, n_lrs] (inf: diverged or missing). Returns best_lr (location),
    best_loss (measured mean at the best grid point), method, at_edge, the seeds' own best
    learning rates and their range, the seed-to-seed spread of the loss at the best point
    (max - min), basin (both neighbours worse on every seed: `_worse_on_every_seed`),
    basin_unpaired (both neighbours' mean loss above the best point's by more than that
    spread), neighbour_excess, learns, and the mean curve."""
    losses = np.where(np.isnan(losses), np.inf, losses)
    mean = losses.mean(axis=0)
    lr, loss, method = fit_optimum(lrs, mean)
    finite = np.isfinite(mean)
    i = int(np.argmin(np.where(finite, mean, np.inf))) if finite.any() else 0
    seed_lrs = [fit_optimum(lrs, row)[0] for row in losses]
    seed_lrs = [v for v in seed_lrs if math.isfinite(v)]
    at_best = losses[:, i]
    spread = float(at_best.max() - at_best.min()) if np.isfinite(at_best).all() else math.inf
    interior = 0 < i < len(lrs) - 1
    basin_unpaired = bool(
        finite.any() and interior and min(mean[i - 1], mean[i + 1]) > mean[i] + spread
    )
    excess = {}  # per side: each seed's loss at the neighbour minus its loss at the best point
    if finite.any() and interior:
        with np.errstate(invalid="ignore"):  # inf - inf: the best point diverged on that seed
            excess = {side: losses[:, i + d] - at_best for side, d in (("lower", -1), ("upper", 1))}
    basin = bool(excess) and all(_worse_on_every_seed(e) for e in excess.values())
    return dict(
        best_lr=lr,
        best_loss=_finite_or_none(loss),
        method=method,
        at_edge=bool(finite.any() and not interior),
        grid_best_lr=lrs[i],
        seed_best_lrs=seed_lrs,
        seed_lr_range=[min(seed_lrs), max(seed_lrs)] if seed_lrs else None,
        seed_loss_spread=_finite_or_none(spread),
        basin=basin,
        basin_unpaired=basin_unpaired,
        neighbour_excess={side: [_finite_or_none(v) for v in e] for side, e in excess.items()},
        learns=bool(
            plateau is not None and math.isfinite(loss) and loss <= plateau - LEARNS_MARGIN
        ),
        n_seeds=int(losses.shape[0]),
        n_diverged=int((~np.isfinite(losses)).sum()),
        lrs=lrs,
        losses=[_finite_or_none(v) for v in mean],
        seed_losses_min=[_finite_or_none(v) for v in losses.min(axis=0)],
        seed_losses_max=[_finite_or_none(v) for v in losses.max(axis=0)],
    )


def slope(widths: Sequence[float], lrs: Sequence[float]) -> float:
    """Least-squares slope of log(lr) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(lrs), 1)[0])


def width_verdict(optima: list[dict], per_seed: dict[int, list[float]]) -> dict:
    """Drift and verdict of one parameterisation at one depth (see VERDICT_RULE).

    optima: `optimum` dicts (with "width"), one per width; per_seed: seed -> its own best lr
    at each of those widths (same order)."""
    widths = [o["width"] for o in optima]
    best = [o["best_lr"] for o in optima]
    out: dict = dict(widths=widths, best_lrs=best, spread_across_widths=_spread(best))
    ok = len(widths) >= 2 and all(math.isfinite(v) for v in best)
    out["drift_slope"] = slope(widths, best) if ok else None
    seed_slopes = {
        str(s): slope(widths, v)
        for s, v in per_seed.items()
        if ok and len(v) == len(widths) and all(math.isfinite(x) for x in v)
    }
    out["drift_slope_seeds"] = seed_slopes
    out["drift_slope_seed_range"] = (
        [min(seed_slopes.values()), max(seed_slopes.values())] if seed_slopes else None
    )
    problems = []
    if len(widths) < 2:
        problems.append("fewer than two widths")
    for o in optima:
        why = [
            text
            for bad, text in (
                (not o["learns"], "does not learn"),
                (not o["basin"], "has no basin"),
                (o["at_edge"], "has its optimum at the grid edge"),
            )
            if bad
        ]
        if why:
            problems.append(f"width {o['width']} " + " and ".join(why))
    if problems or not seed_slopes:
        verdict, reason = "inconclusive", "; ".join(problems) or "no seed has a slope"
    else:
        flat = [abs(v) <= SLOPE_TOLERANCE for v in seed_slopes.values()]
        lo, hi = out["drift_slope_seed_range"]
        seeds = f"seed slopes {lo:+.2f}..{hi:+.2f}"
        if all(flat):
            verdict, reason = "transfers", f"{seeds}, all within +-{SLOPE_TOLERANCE}"
        elif not any(flat):
            verdict, reason = "drifts", f"{seeds}, all outside +-{SLOPE_TOLERANCE}"
        else:
            verdict, reason = "inconclusive", f"{seeds}: some within +-{SLOPE_TOLERANCE}, some not"
    out["verdict"], out["verdict_reason"] = verdict, reason
    return out


def _spread(optima: list[float]) -> float | None:
    finite = [lr for lr in optima if math.isfinite(lr)]
    return max(finite) / min(finite) if len(finite) >= 2 else None


def summarize(rows: list[dict], metric: str, plateau: float | None = None) -> dict:
    """summary.json: per optimizer, the optimum of every (width, depth) (`optimum`), and per
    depth the spread, drift and verdict across widths (`width_verdict`); with several depths
    also the spread across depths at each width.

    plateau: the unigram plateau in nats/token (`transfer.runs.unigram_plateau`); without it
    no run counts as learning, so every verdict is inconclusive."""
    summary: dict = dict(
        metric=metric,
        n_runs=len(rows),
        unigram_plateau=plateau,
        learns_margin=LEARNS_MARGIN,
        slope_tolerance=SLOPE_TOLERANCE,
        verdict_rule=VERDICT_RULE,
        optimizers={},
    )
    per_seed: dict[tuple[str, int, int], dict[int, float]] = {}
    for (name, width, depth), c in sorted(seed_curves(rows, metric).items()):
        o = optimum(c["lrs"], c["losses"], plateau)
        entry = summary["optimizers"].setdefault(name, {"optima": []})
        entry["optima"].append(dict(width=width, depth=depth, **o))
        for seed, row in zip(c["seeds"], c["losses"], strict=True):
            row = np.where(np.isnan(row), np.inf, row)
            per_seed[(name, width, depth)] = per_seed.get((name, width, depth), {})
            per_seed[(name, width, depth)][seed] = fit_optimum(c["lrs"], row)[0]
    for name, entry in summary["optimizers"].items():
        optima = entry["optima"]
        depths = sorted({o["depth"] for o in optima})
        widths = sorted({o["width"] for o in optima})
        entry["depths"] = {}
        for d in depths:
            at_d = sorted((o for o in optima if o["depth"] == d), key=lambda o: o["width"])
            seeds = sorted({s for o in at_d for s in per_seed[(name, o["width"], d)]})
            by_seed = {
                s: [per_seed[(name, o["width"], d)].get(s, math.nan) for o in at_d] for s in seeds
            }
            entry["depths"][str(d)] = width_verdict(at_d, by_seed)
        entry["spread_across_widths"] = {
            d: v["spread_across_widths"] for d, v in entry["depths"].items()
        }
        if len(depths) > 1:
            entry["spread_across_depths"] = {
                str(w): _spread([o["best_lr"] for o in optima if o["width"] == w]) for w in widths
            }
        entry["spread"] = entry["depths"][str(depths[0])]["spread_across_widths"]
        # Optima at the edge of the lr grid only bound the spread: widen the grid there.
        entry["any_optimum_at_grid_edge"] = any(o["at_edge"] for o in optima)
    return summary
