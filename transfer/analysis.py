"""Sweep analysis: runs.csv rows -> loss curves -> optima -> summary.json and figures.

Reads only the CSV rows (`read_rows`), so figures can be redrawn at any time
(`python transfer/sweep.py --plot-only`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

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


def fit_optimum(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, float, str]:
    """Best learning rate from a loss curve: (lr, loss, method).

    lrs: ascending grid [n]; losses: [n], inf/nan for diverged points. Fits a parabola in
    log(lr) through the grid minimum and its two neighbours and returns its vertex ("parabola");
    at the edge of the grid, next to a diverged point, or for a non-convex triple it returns
    the grid point ("grid"). The vertex of a convex triple always lies between the neighbours.
    """
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    y = np.where(np.isfinite(y), y, np.inf)
    if not np.isfinite(y).any():
        return math.nan, math.nan, "diverged"
    i = int(np.argmin(y))
    if i == 0 or i == len(y) - 1 or not np.isfinite(y[i - 1 : i + 2]).all():
        return float(lrs[i]), float(y[i]), "grid"
    a, b, c = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    if a <= 0:
        return float(lrs[i]), float(y[i]), "grid"
    vertex = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
    return float(np.exp(vertex)), float(a * vertex**2 + b * vertex + c), "parabola"


def curves(rows: list[dict], metric: str) -> dict[tuple[str, int, int], tuple[list, list]]:
    """(optimizer, width, depth) -> (lrs ascending, mean loss over seeds; inf if any diverged)."""
    groups: dict[tuple[str, int, int], dict[float, list[float]]] = {}
    for row in rows:
        value = math.inf if row["diverged"] else row[metric]
        groups.setdefault((row["optimizer"], row["width"], row["depth"]), {}).setdefault(
            row["lr"], []
        ).append(value)
    out = {}
    for key, by_lr in groups.items():
        lrs = sorted(by_lr)
        out[key] = (lrs, [float(np.mean(by_lr[lr])) for lr in lrs])
    return out


def _spread(optima: list[float]) -> float | None:
    finite = [lr for lr in optima if math.isfinite(lr)]
    return max(finite) / min(finite) if len(finite) >= 2 else None


def summarize(rows: list[dict], metric: str) -> dict:
    """Per optimizer and (width, depth): the best lr; spread of optima across widths/depths."""
    summary: dict = {"metric": metric, "n_runs": len(rows), "optimizers": {}}
    for (name, width, depth), (lrs, losses) in sorted(curves(rows, metric).items()):
        lr, loss, method = fit_optimum(lrs, losses)
        i = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
        entry = summary["optimizers"].setdefault(name, {"optima": []})
        entry["optima"].append(
            dict(
                width=width,
                depth=depth,
                best_lr=lr,
                best_loss=loss,
                method=method,
                at_edge=method == "grid" and i in (0, len(lrs) - 1),
                grid_best_lr=lrs[i],
                grid_best_loss=losses[i] if math.isfinite(losses[i]) else None,
                n_diverged=int(sum(not math.isfinite(v) for v in losses)),
                lrs=lrs,
                losses=[v if math.isfinite(v) else None for v in losses],
            )
        )
    for entry in summary["optimizers"].values():
        optima = entry["optima"]
        depths = sorted({o["depth"] for o in optima})
        widths = sorted({o["width"] for o in optima})
        # Width transfer at each depth, depth transfer at each width.
        entry["spread_across_widths"] = {
            str(d): _spread([o["best_lr"] for o in optima if o["depth"] == d]) for d in depths
        }
        if len(depths) > 1:
            entry["spread_across_depths"] = {
                str(w): _spread([o["best_lr"] for o in optima if o["width"] == w]) for w in widths
            }
        base = [o["best_lr"] for o in optima if o["depth"] == depths[0]]
        entry["spread"] = _spread(base)
        # Optima at the edge of the lr grid only bound the spread: widen the grid there.
        entry["any_optimum_at_grid_edge"] = any(o["at_edge"] for o in optima)
    return summary


# --------------------------------------------------------------------------------------------
# Plots (read only the CSV via `summarize`)


def plot(summary: dict, out: Path) -> list[Path]:
    """loss_vs_lr.{png,svg} (one panel per optimizer, one curve per width) and
    optimum_vs_width.{png,svg}; with several depths also the depth versions."""
    names = list(summary["optimizers"])
    written = []

    def save(fig, stem):
        for ext in ("png", "svg"):
            path = out / f"{stem}.{ext}"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            written.append(path)
        plt.close(fig)

    all_optima = [o for n in names for o in summary["optimizers"][n]["optima"]]
    depths = sorted({o["depth"] for o in all_optima})
    widths = sorted({o["width"] for o in all_optima})
    for vary, fixed_name, fixed_value in [("width", "depth", depths[0])] + (
        [("depth", "width", widths[-1])] if len(depths) > 1 else []
    ):
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            optima = [
                o for o in summary["optimizers"][name]["optima"] if o[fixed_name] == fixed_value
            ]
            cmap = plt.get_cmap("viridis")
            for k, o in enumerate(sorted(optima, key=lambda o: o[vary])):
                color = cmap(k / max(1, len(optima) - 1))
                lrs = np.array(o["lrs"])
                losses = np.array([np.nan if v is None else v for v in o["losses"]])
                ax.plot(lrs, losses, "o-", color=color, ms=3, label=f"{vary} {o[vary]}")
                bad = ~np.isfinite(losses)
                if bad.any():
                    top = np.nanmax(losses) if np.isfinite(losses).any() else 1.0
                    ax.plot(lrs[bad], np.full(bad.sum(), top), "x", color=color)
                if math.isfinite(o["best_lr"]):
                    ax.plot([o["best_lr"]], [o["best_loss"]], "*", color=color, ms=11, mec="k")
            finite = [v for o in optima for v in o["losses"] if v is not None]
            if finite and max(finite) > min(finite) + 3.0:  # keep the basin readable
                ax.set_ylim(top=min(finite) + 3.0)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_title(f"{name} ({fixed_name} {fixed_value})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel(summary["metric"] + " (nats/token)")
        fig.tight_layout()
        save(fig, f"loss_vs_lr{'' if vary == 'width' else '_depth'}")

        fig, ax = plt.subplots(figsize=(5, 3.6))
        for name in names:
            optima = sorted(
                (o for o in summary["optimizers"][name]["optima"] if o[fixed_name] == fixed_value),
                key=lambda o: o[vary],
            )
            (line,) = ax.plot(
                [o[vary] for o in optima], [o["best_lr"] for o in optima], "o-", label=name
            )
            edge = [o for o in optima if o["best_lr"] in (o["lrs"][0], o["lrs"][-1])]
            ax.plot(  # optimum at the edge of the grid: a bound, not a measurement
                [o[vary] for o in edge],
                [o["best_lr"] for o in edge],
                "o",
                mfc="white",
                color=line.get_color(),
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(vary)
        ax.set_ylabel("best learning rate")
        ax.set_title(f"optimum vs {vary} ({fixed_name} {fixed_value}; open: grid edge)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, f"optimum_vs_{vary}")
    return written
