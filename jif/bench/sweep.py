"""Sweep throughput: runs per hour one run at a time, batched, and batched in worker processes.

For each width the same groups of runs (learning rates x seeds, one group per parameterisation)
are trained three ways in one process, as `python transfer/sweep.py` would train them: one
run at a time (`--engine compiled --workers 1`: one compiled step per seed, the learning rate
as data), each group as one vmapped program (`--engine batched --workers 1`), and the groups
side by side in worker processes, the cores split between them (`--engine batched --workers
N`, transfer/workers.py). Every time includes compilation, the final evaluation and, for the
workers, starting them, as a sweep pays them; the ratios to one at a time are what each buys a
sweep of that many steps on this machine. At a few steps compilation weighs most, so each way
also reports its steady state: the time the engines measure for the steps after each run's
(or group's) first, the one that compiles, summed over the runs one at a time and over the
groups in one process, and for the workers the longest worker's share. A long sweep
approaches its ratios. With `sweep_rounds` > 1 every way is timed that many times,
alternating, each ratio is taken within one round and the medians are reported, with each
round's.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from transfer import batched, runs, sweep, workers


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepBench:
    """Settings of the sweep-throughput benchmark."""

    sweep_widths: tuple[int, ...] = (32, 64, 128)
    """Model widths (depth 2, heads of 32, as the default sweep)."""
    sweep_optimizers: tuple[str, ...] = ("adamw", "mup_adamw")
    """Parameterisations (transfer.sweep.PARAMETERISATIONS), one group each; two groups of
    equal cost let two workers share the cores evenly."""
    sweep_n_lrs: int = 5
    """Learning rates per group (log-spaced over the parameterisation's range)."""
    sweep_seeds: int = 3
    """Seeds per learning rate."""
    sweep_steps: int = 30
    """Training steps per run (the steady state times all but the first)."""
    sweep_rounds: int = 1
    """Rounds, each timing every way once; medians over rounds."""
    sweep_workers: int = 0
    """Worker processes for the third way (0: as the sweep's default, one per core, at most
    one per group)."""


WAYS = ("one_at_a_time", "batched", "workers")


def _time_ways(bench: SweepBench, width: int, n_workers: int) -> tuple[int, dict]:
    """One round at one width: the number of runs, and {way}_s (wall seconds), steady_{way}_s
    (the timed steps) and the speed-ups over one at a time."""
    config = sweep.resolve(
        sweep.SweepConfig(
            widths=(width,), n_lrs=bench.sweep_n_lrs, seeds=tuple(range(bench.sweep_seeds)),
            steps=bench.sweep_steps, optimizers=bench.sweep_optimizers, progress=False,
        )
    )  # fmt: skip
    specs = sweep.grid(config)
    groups = sweep.group_runs(specs, batched.BatchedRuns())
    ways = {
        "one_at_a_time": ([[s] for s in specs], runs.CompiledRuns(), 1),
        "batched": (groups, batched.BatchedRuns(), 1),
        "workers": (groups, batched.BatchedRuns(), n_workers),
    }
    out = {}
    for way, (units, run_fn, n) in ways.items():
        start = time.perf_counter()
        steps_s = [results[0]["steps_s"] for _, results, _ in workers.train_groups(
            units, config, run_fn, n
        )]  # fmt: skip
        out[f"{way}_s"] = time.perf_counter() - start
        # In n processes the slowest worker sets the pace; with more units than workers, the
        # even split is a lower bound (every ratio here has n >= the number of groups).
        out[f"steady_{way}_s"] = max(max(steps_s), sum(steps_s) / n)
    for pre in ("", "steady_"):
        out[f"{pre}speedup"] = out[f"{pre}one_at_a_time_s"] / out[f"{pre}batched_s"]
        out[f"{pre}speedup_workers"] = out[f"{pre}one_at_a_time_s"] / out[f"{pre}workers_s"]
    return len(specs), out


def run(bench: SweepBench, log=print) -> dict:
    """{"width": {...}, ...}: seconds and runs per hour each way, and the speed-ups over one
    at a time, with and without start-up (steady_*). With sweep_rounds > 1 each figure is the
    median over rounds and "rounds" holds every round's."""
    if bench.sweep_rounds < 1:
        raise ValueError(f"sweep_rounds must be at least 1, got {bench.sweep_rounds}")
    if bench.sweep_steps < 2:
        raise ValueError(
            f"sweep_steps must be at least 2 (the first compiles), got {bench.sweep_steps}"
        )
    n_groups = len(bench.sweep_optimizers)
    n_workers = workers.resolve_workers(bench.sweep_workers, n_groups, "cpu")
    out = {}
    for width in bench.sweep_widths:
        timed = [_time_ways(bench, width, n_workers) for _ in range(bench.sweep_rounds)]
        n, rounds = timed[0][0], [one for _, one in timed]
        r = out[str(width)] = {"runs": n, "groups": n_groups, "workers": n_workers}
        r["steps"] = bench.sweep_steps
        r.update({k: statistics.median(x[k] for x in rounds) for k in rounds[0]})
        for way in WAYS:
            r[f"runs_per_hour_{way}"] = 3600 * n / r[f"{way}_s"]
        line = (
            f"sweep width {width}: {n} runs; the runs per hour of one at a time x "
            f"{r['speedup']:.2f} batched, x {r['speedup_workers']:.2f} batched in "
            f"{n_workers} workers; steady state x {r['steady_speedup']:.2f} and "
            f"x {r['steady_speedup_workers']:.2f}"
        )
        if bench.sweep_rounds > 1:
            r["rounds"] = rounds
            line += f" (medians of {bench.sweep_rounds} rounds)"
        log(line)
    return out


def format_table(result: dict) -> str:
    lines = [
        f"{'width':>5} {'runs':>4} {'one by one s':>12} {'batched s':>9} {'workers s':>9} "
        f"{'batched':>7} {'workers':>7}  steady state: batched workers"
    ]
    for width, r in result.items():
        lines.append(
            f"{width:>5} {r['runs']:>4} {r['one_at_a_time_s']:>12.1f} {r['batched_s']:>9.1f} "
            f"{r['workers_s']:>9.1f} {r['speedup']:>6.2f}x {r['speedup_workers']:>6.2f}x"
        )
        lines[-1] += f"  {r['steady_speedup']:>15.2f}x {r['steady_speedup_workers']:>6.2f}x"
    return "\n".join(lines)
