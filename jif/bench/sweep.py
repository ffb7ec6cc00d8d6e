"""Sweep throughput: runs per hour trained one at a time against a whole group batched.

For each width, the same grid of runs (learning rates x seeds of one parameterisation) is
trained twice in one process, first one run at a time (`transfer.sweep.CompiledRuns`, one
compiled step per seed, the learning rate as data) and then as one vmapped program
(`transfer.batched.BatchedRuns`). Both times include compilation and the final evaluation,
as a sweep pays them; the ratio is what batching buys a sweep of that many steps on this
machine. At a few steps compilation weighs most, so with `sweep_steady_steps` both engines
also train that many steps more, and the ratio of the extra time (compilation and evaluation
cancel) is the steady-state speed-up a long sweep approaches.
"""

from __future__ import annotations

import dataclasses
import time

from transfer import batched, sweep


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepBench:
    """Settings of the sweep-throughput benchmark."""

    sweep_widths: tuple[int, ...] = (32, 64, 128)
    """Model widths (depth 2, 4 heads, as the default sweep)."""
    sweep_optimizer: str = "adamw"
    """Parameterisation (transfer.sweep.PARAMETERISATIONS)."""
    sweep_n_lrs: int = 7
    """Learning rates per group (log-spaced over the parameterisation's range)."""
    sweep_seeds: int = 3
    """Seeds per learning rate."""
    sweep_steps: int = 30
    """Training steps per run."""
    sweep_steady_steps: int = 0
    """If > 0, also train sweep_steps + this many steps, for the steady-state speed-up."""


def _time_engines(bench: SweepBench, width: int, steps: int) -> tuple[int, float, float]:
    """(runs, seconds one at a time, seconds batched) of one width's group at `steps`."""
    config = sweep.resolve(
        sweep.SweepConfig(
            widths=(width,), n_lrs=bench.sweep_n_lrs, seeds=tuple(range(bench.sweep_seeds)),
            steps=steps, optimizers=(bench.sweep_optimizer,), progress=False,
        )
    )  # fmt: skip
    specs = sweep.grid(config)
    t0 = time.perf_counter()
    one_at_a_time = sweep.CompiledRuns()
    for spec in specs:
        one_at_a_time(spec, config)
    t1 = time.perf_counter()
    batched.BatchedRuns().run_group(specs, config)
    t2 = time.perf_counter()
    return len(specs), t1 - t0, t2 - t1


def run(bench: SweepBench, log=print) -> dict:
    """{"width": {...}, ...}: seconds and runs per hour both ways, and their ratio (and the
    steady-state ratio with sweep_steady_steps)."""
    out = {}
    for width in bench.sweep_widths:
        n, one, both = _time_engines(bench, width, bench.sweep_steps)
        r = out[str(width)] = {
            "runs": n,
            "steps": bench.sweep_steps,
            "one_at_a_time_s": one,
            "batched_s": both,
            "runs_per_hour_one_at_a_time": 3600 * n / one,
            "runs_per_hour_batched": 3600 * n / both,
            "speedup": one / both,
        }
        line = f"sweep width {width}: {n} runs; batched: {r['speedup']:.2f}x the runs per hour"
        if bench.sweep_steady_steps > 0:
            _, one_long, both_long = _time_engines(
                bench, width, bench.sweep_steps + bench.sweep_steady_steps
            )
            r["steady_steps"] = bench.sweep_steady_steps
            r["steady_one_at_a_time_s"] = one_long - one
            r["steady_batched_s"] = both_long - both
            r["steady_speedup"] = (one_long - one) / (both_long - both)
            line += f", {r['steady_speedup']:.2f}x in steady state"
        log(line)
    return out


def format_table(result: dict) -> str:
    lines = [f"{'width':>5} {'runs':>4} {'one by one s':>12} {'batched s':>9} {'speed-up':>8}"]
    lines[0] += "  steady state" if any("steady_speedup" in r for r in result.values()) else ""
    for width, r in result.items():
        lines.append(
            f"{width:>5} {r['runs']:>4} {r['one_at_a_time_s']:>12.1f} {r['batched_s']:>9.1f} "
            f"{r['speedup']:>7.2f}x"
        )
        if "steady_speedup" in r:
            lines[-1] += f"  {r['steady_speedup']:>11.2f}x"
    return "\n".join(lines)
