"""Benchmarks: training throughput and MFU per preset, then sampling speed per method.

    python -m jif.bench                                # tiny, cpu, small; batch 32, seq 128
    python -m jif.bench --presets small --steps 20 --rounds 5
    python -m jif.bench --no-sampling --out runs/bench/train.json
    python -m jif.bench --help

Writes one JSON file (machine info, one record per preset, the sampling results) and prints
a short table. MFU on CPU is relative to the faster of XLA's and numpy's float32 matmul
measured in the same process, so the ratio holds on a busy machine even when absolute times
do not. `python -m jif.bench.accel` sweeps presets and sequence lengths on accelerators.
"""

from __future__ import annotations

import dataclasses
import time

import tyro

from jif import flops
from jif import model as model_lib
from jif.bench import sampling as sampling_bench
from jif.bench import sweep as sweep_bench
from jif.bench import train as train_bench


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What `python -m jif.bench` measures."""

    presets: tuple[str, ...] = ("tiny", "cpu", "small")
    """Model presets whose train step is timed."""
    train: tyro.conf.OmitArgPrefixes[train_bench.TrainBench] = train_bench.TrainBench()
    """The train-step benchmark's settings, for every preset (its flags have no prefix)."""
    sampling: bool = True
    """Also run the sampling benchmark (bench.sampling)."""
    sample_preset: str = "cpu"
    """Model preset of the sampling benchmark (random init)."""
    sample_methods: tuple[str, ...] | None = None
    """Sampling methods (None: all of jif.sampling.METHODS)."""
    sample_steps: int = 500
    """Denoising steps per sample."""
    sample_length: int = 128
    """Sample length in tokens."""
    sample_batch: int = 8
    """Samples per batch."""
    sample_repeats: int = 3
    """Timed repeats per sampling method."""
    sweep: bool = True
    """Also time sweep groups one run at a time, batched and in workers (jif.bench.sweep)."""
    sweep_settings: tyro.conf.OmitArgPrefixes[sweep_bench.SweepBench] = sweep_bench.SweepBench()
    """The sweep benchmark's settings (flags --sweep-widths, --sweep-steps, ...)."""
    out: str = "runs/bench/bench-{time}.json"
    """JSON output path ({time} becomes a UTC timestamp; empty: do not write)."""


def run(cfg: BenchConfig, log=print) -> dict:
    """Runs the benchmarks of `cfg`; returns the record written to the JSON file."""
    result: dict = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": train_bench.device_info(),
        "config": dataclasses.asdict(cfg),
        "train": [],
    }
    dtype = model_lib.default_dtype() if cfg.train.dtype == "auto" else cfg.train.dtype
    peak = None if flops.stated_peak(dtype) else flops.MatmulPeak(cfg.train.peak_n, dtype)
    for preset in cfg.presets:
        bench = dataclasses.replace(cfg.train, preset=preset)
        result["train"].append(train_bench.run(bench, peak, log=log))
    if cfg.sampling:
        kwargs = {}
        if cfg.sample_methods is not None:
            kwargs["methods"] = tuple(cfg.sample_methods)
        result["sampling"] = sampling_bench.run(
            preset=cfg.sample_preset,
            steps=cfg.sample_steps,
            length=cfg.sample_length,
            batch=cfg.sample_batch,
            repeats=cfg.sample_repeats,
            **kwargs,
        )
    if cfg.sweep:
        result["sweep"] = sweep_bench.run(cfg.sweep_settings, log=log)
    return result


def format_table(result: dict) -> str:
    """The short printed summary of a result."""
    m = result["machine"]
    lines = [
        f"machine: {m['processor']}, {m['cpu_count']} cpus, jax {m['jax']} "
        f"{m['backend']} ({m['device_kind']} x {m['device_count']}); {result['time_utc']}",
        f"{'preset':<7} {'params':>8} {'B x L':>8} {'compile s':>9} {'step ms':>8} "
        f"{'tok/s':>8} {'GFLOP/s':>8} {'peak':>6} {'MFU':>6} {'MFU range':>12} {'mem MB':>7}",
    ]
    for r in result["train"]:
        mem = r.get("peak_device_bytes", r.get("peak_rss_bytes", 0)) / 2**20
        lo, hi = min(r["mfu_rounds"]), max(r["mfu_rounds"])
        lines.append(
            f"{r['preset']:<7} {r['n_params'] / 1e6:>7.2f}M {r['batch_size']:>3}x{r['seq_len']:<4} "
            f"{r['compile_s']:>9.1f} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>8.0f} "
            f"{r['achieved_flops'] / 1e9:>8.1f} {r['peak_flops'] / 1e9:>6.0f} {r['mfu']:>6.1%} "
            f"{lo:>5.1%}-{hi:<5.1%} {mem:>7.0f}"
        )
    lines.append(
        "GFLOP/s: the step's matmul FLOPs (logits at the positions the loss reads); peak = "
        + (result["train"][0]["peak_source"] if result["train"] else "-")
        + " (GFLOP/s, same process); MFU range over rounds; mem = process peak."
        + (
            f" dtype {result['train'][0]['dtype']}, attention {result['train'][0]['attention']}."
            if result["train"]
            else ""
        )
    )
    if "sampling" in result:
        lines.append(sampling_bench.format_table(result["sampling"]))
    if "sweep" in result:
        lines.append(
            "sweep groups, one run at a time vs batched vs batched in worker processes "
            "(start-up, compile and evaluation included):"
        )
        lines.append(sweep_bench.format_table(result["sweep"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """The CLI (flags from BenchConfig; see --help)."""
    return train_bench.cli_main(BenchConfig, run, argv, __doc__, table=format_table)


if __name__ == "__main__":
    main()
