"""Figures of a sweep summary (`transfer.analysis.summarize`): loss against learning rate and
optimum against width (and depth), with the seed-to-seed spread shown as min..max bars and
open markers for optima at the edge of the learning-rate grid (bounds, not measurements)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _bars(values: list, lo: list, hi: list) -> np.ndarray:
    """[2, n] asymmetric error bars (value - lo, hi - value); zero where unknown."""
    v, lo, hi = (np.array([np.nan if x is None else x for x in a], float) for a in (values, lo, hi))
    return np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0, posinf=0.0, neginf=0.0).clip(0)


def _loss_panel(ax, optima: list[dict], vary: str, plateau, margin: float) -> None:
    cmap = plt.get_cmap("viridis")
    for k, o in enumerate(optima):
        color = cmap(k / max(1, len(optima) - 1))
        lrs = np.array(o["lrs"])
        mean = np.array([np.nan if v is None else v for v in o["losses"]])
        err = _bars(o["losses"], o["seed_losses_min"], o["seed_losses_max"])
        ax.errorbar(
            lrs,
            mean,
            yerr=err,
            fmt="o-",
            color=color,
            ms=3,
            capsize=2,
            lw=1,
            label=f"{vary} {o[vary]}",
        )
        bad = ~np.isfinite(mean)
        if bad.any():
            top = np.nanmax(mean) if np.isfinite(mean).any() else 1.0
            ax.plot(lrs[bad], np.full(bad.sum(), top), "x", color=color)
        if math.isfinite(o["best_lr"]) and o["best_loss"] is not None:
            face = "white" if o["at_edge"] else color
            ax.plot([o["best_lr"]], [o["best_loss"]], "*", color=color, mfc=face, ms=12, mec="k")
    if plateau is not None:
        ax.axhline(plateau, color="grey", ls="--", lw=1, label="unigram plateau")
        ax.axhline(plateau - margin, color="grey", ls=":", lw=1, label=f"plateau - {margin:g}")
    finite = [v for o in optima for v in o["losses"] if v is not None]
    if finite:
        top = min(max(finite), min(finite) + 3.0)  # keep the basin readable
        ax.set_ylim(top=top if plateau is None else max(top, plateau + 0.3))


def _optimum_panel(ax, summary: dict, names: list[str], vary: str, fixed: str, value) -> None:
    for name in names:
        optima = sorted(
            (o for o in summary["optimizers"][name]["optima"] if o[fixed] == value),
            key=lambda o: o[vary],
        )
        x = np.array([o[vary] for o in optima], float)
        y = np.array([o["best_lr"] for o in optima])
        ranges = [o["seed_lr_range"] or [None, None] for o in optima]
        err = _bars(list(y), [r[0] for r in ranges], [r[1] for r in ranges])
        (line,) = ax.plot(x, y, "-", label=name)
        color = line.get_color()
        edge = np.array([o["at_edge"] for o in optima], bool)
        for sel, face in ((~edge, color), (edge, "white")):
            if sel.any():
                ax.errorbar(
                    x[sel], y[sel], yerr=err[:, sel], fmt="o", color=color, mfc=face, capsize=3
                )


def plot(summary: dict, out: Path) -> list[Path]:
    """loss_vs_lr.{png,svg} (one panel per optimizer, one curve per width: mean over seeds,
    bars min..max, star at the optimum) and optimum_vs_width.{png,svg} (bars: the range of
    the seeds' own optima); with several depths also the depth versions (at the widest width)."""
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
    plateau, margin = summary.get("unigram_plateau"), summary.get("learns_margin", 1.5)
    for vary, fixed, value in [("width", "depth", depths[0])] + (
        [("depth", "width", widths[-1])] if len(depths) > 1 else []
    ):
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            optima = sorted(
                (o for o in summary["optimizers"][name]["optima"] if o[fixed] == value),
                key=lambda o: o[vary],
            )
            _loss_panel(ax, optima, vary, plateau, margin)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            verdict = summary["optimizers"][name].get("depths", {}).get(str(value), {})
            tag = f": {verdict['verdict']}" if vary == "width" and verdict else ""
            ax.set_title(f"{name} ({fixed} {value}){tag}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        n_seeds = max((o["n_seeds"] for o in all_optima), default=1)
        axes[0][0].set_ylabel(f"{summary['metric']} (nats/token), {n_seeds} seeds")
        fig.tight_layout()
        save(fig, f"loss_vs_lr{'' if vary == 'width' else '_depth'}")

        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        _optimum_panel(ax, summary, names, vary, fixed, value)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(vary)
        ax.set_ylabel("best learning rate (bars: seeds' own)")
        ax.set_title(f"optimum vs {vary} ({fixed} {value}; open: grid edge)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, f"optimum_vs_{vary}")
    return written
