"""The accelerator benchmark: the train step over presets and sequence lengths.

    python -m jif.bench.accel                      # presets tiny..big x seq 128..2048
    python -m jif.bench.accel --presets big --seq-lens 1024 2048 --tokens 131072
    python -m jif.bench.accel --quick              # small sizes, for CPU (a test runs it)

Every cell is jif.bench.train.run (the real jitted jif.loop train step): tokens/s, MFU
against the chip's nameplate peak for the dtype used (jif.flops; on CPU the measured matmul
peak), XLA's memory analysis of the step and the device's peak memory (memory_stats, where
the backend has it; process RSS on CPU), the attention kernel that ran. Each cell has the
same tokens per step (batch = tokens / seq_len), so rows compare the cost of longer
sequences at equal work elsewhere. A cell that runs out of memory is recorded as such and
the sweep goes on. Writes one JSON file (machine, settings, one record per cell).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from jif.bench import train as train_bench


@dataclasses.dataclass(frozen=True, kw_only=True)
class AccelBench:
    """What `python -m jif.bench.accel` measures."""

    presets: tuple[str, ...] = ("tiny", "cpu", "small", "medium", "big")
    """Model presets (jif.model.PRESETS)."""
    seq_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    """Sequence lengths."""
    tokens: int = 65_536
    """Tokens per step (batch size = tokens / seq_len, at least 1)."""
    steps: int = 10
    """Timed steps per round."""
    rounds: int = 3
    """Rounds of timed steps (the MFU is the median over rounds)."""
    dtype: str = "auto"
    """float32, bfloat16, or auto (bfloat16 on accelerators, float32 on CPU)."""
    attention: str = "auto"
    """Attention kernel: auto, xla, chunked, cudnn, pallas (jif.layers.ATTENTION_NAMES)."""
    quick: bool = False
    """Small sizes for a CPU: presets tiny, seq 32 and 64, 256 tokens, 2 steps, 1 round."""
    out: str = "runs/bench/accel-{time}.json"
    """JSON output path ({time} becomes a UTC timestamp; empty: do not write)."""


QUICK = dict(presets=("tiny",), seq_lens=(32, 64), tokens=256, steps=2, rounds=1)


def run(cfg: AccelBench, log=print) -> dict:
    """Runs every (preset, seq_len) cell of `cfg`; returns the record written to JSON."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if min(cfg.tokens, cfg.steps, cfg.rounds, *cfg.seq_lens) < 1:
        raise ValueError(f"tokens, steps, rounds and seq_lens must be >= 1, got {cfg}")
    result: dict = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": train_bench.device_info(),
        "config": dataclasses.asdict(cfg),
        "cells": [],
    }
    for preset in cfg.presets:
        for seq_len in cfg.seq_lens:
            bench = train_bench.TrainBench(
                preset=preset,
                batch_size=max(1, cfg.tokens // seq_len),
                seq_len=seq_len,
                steps=cfg.steps,
                rounds=cfg.rounds,
                dtype=cfg.dtype,
                attention=cfg.attention,
                data=None,
                peak_n=256 if cfg.quick else 2048,
            )
            try:
                cell = train_bench.run(bench, log=log)
            except Exception as e:  # jaxlib's XlaRuntimeError: record out-of-memory, go on
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e):
                    raise
                cell = {"preset": preset, "seq_len": seq_len, "error": "out of memory"}
                log(f"{preset} seq {seq_len}: out of memory", file=sys.stderr)
            result["cells"].append(cell)
    return result


def format_table(result: dict) -> str:
    """The printed summary: one line per cell."""
    m = result["machine"]
    lines = [
        f"{m['processor']} ({m['backend']}, {m['device_kind']} x {m['device_count']}), "
        f"jax {m['jax']}; {result['time_utc']}",
        f"{'preset':<7} {'seq':>5} {'batch':>6} {'dtype':>8} {'attention':>9} {'step ms':>8} "
        f"{'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7}",
    ]
    for c in result["cells"]:
        if "error" in c:
            lines.append(f"{c['preset']:<7} {c['seq_len']:>5} {c['error']}")
            continue
        mem = c.get("peak_device_bytes", c.get("peak_rss_bytes", 0)) / 2**30
        lines.append(
            f"{c['preset']:<7} {c['seq_len']:>5} {c['batch_size']:>6} {c['dtype']:>8} "
            f"{c['attention']:>9} {c['step_s'] * 1e3:>8.1f} {c['tokens_per_s']:>9.0f} "
            f"{c['achieved_flops'] / 1e12:>8.2f} {c['mfu']:>6.1%} {mem:>7.2f}"
        )
    if result["cells"] and "peak_source" in result["cells"][0]:
        lines.append(f"peak: {result['cells'][0]['peak_source']}; mem: the process's peak so far")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """The CLI (flags from AccelBench; see --help)."""
    return train_bench.cli_main(AccelBench, run, argv, __doc__, table=format_table)


if __name__ == "__main__":
    main()
