"""Where attention's time goes in the CPU train step, and how the step scales with length.

    python -m jif.bench.attention                       # d256 L4, 4 heads, 32 x 128
    python -m jif.bench.attention --rounds 5 --scaling-lens 128 256 512 1024

Times the real jitted train step (jif.bench.train.build_step) with the attention layer in
several variants, interleaved round by round in one process so that a shared, noisy machine
slows them alike; reports medians over rounds and ratios, never absolute times across runs:

- "fused": the model as built (jif.layers.DotProductAttention, its kernel for this platform:
  "xla" on CPU); "chunked": the same layer with one (batch, head) pair at a time;
- "penzai": the same attention from penzai's generic layers (`as_penzai()`: nmapped
  NamedEinsums, mask, SoftmaxF32), the DiT's attention before the fused layer;
- "no_core": scores, softmax and the weighted sum replaced by the values themselves (q and
  k are still computed): the step without attention's core, for its share of the time.

Then the sequence-length scaling at constant tokens per step (batch = tokens / seq_len):
time per token against the counted FLOPs per token (jif.flops), both relative to the first
length. Writes a JSON record (processor included) and prints a summary.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import jax
from penzai import pz

from jif import flops
from jif import model as model_lib
from jif.bench import train as train_bench
from jif.layers import DotProductAttention


@pz.pytree_dataclass
class ValuesOnly(pz.nn.Layer):
    """A DotProductAttention whose core is skipped: output(values), with q and k computed
    (kept alive by a zero-weighted term) so only the scores, softmax and sum are missing."""

    inner: DotProductAttention

    def __call__(self, x, **side):
        a = self.inner
        q, k, v = a.query(x, **side), a.key(x, **side), a.value(x, **side)
        return a.output(v + 0.0 * (q + k), **side)


VARIANTS = {
    "fused": lambda model: model,
    "chunked": lambda model: (
        pz.select(model)
        .at_instances_of(DotProductAttention)
        .apply(lambda layer: dataclasses.replace(layer, implementation="chunked"))
    ),
    "penzai": lambda model: (
        pz.select(model).at_instances_of(DotProductAttention).apply(lambda layer: layer.as_penzai())
    ),
    "no_core": lambda model: (
        pz.select(model).at_instances_of(DotProductAttention).apply(ValuesOnly)
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBench:
    """What `python -m jif.bench.attention` measures."""

    preset: str = "small"
    """Model preset; d_model, n_layers and n_heads override it."""
    d_model: int = 256
    """Width."""
    n_layers: int = 4
    """Depth."""
    n_heads: int = 4
    """Attention heads."""
    batch_size: int = 32
    """Sequences per step of the share measurement."""
    seq_len: int = 128
    """Tokens per sequence of the share measurement."""
    variants: tuple[str, ...] = ("fused", "chunked", "penzai", "no_core")
    """Attention variants timed against each other (see the module docstring)."""
    scaling_lens: tuple[int, ...] = (128, 256, 512, 1024)
    """Sequence lengths of the scaling measurement at batch_size x seq_len tokens (empty: skip)."""
    scaling_variants: tuple[str, ...] = ("fused", "chunked", "penzai")
    """Variants timed in the scaling measurement."""
    steps: int = 3
    """Timed steps per variant per round."""
    rounds: int = 5
    """Rounds; each times every variant once, in a rotating order."""
    clock: str = "cpu"
    """cpu: this process's CPU seconds per step (steadier on a shared machine); wall."""
    out: str = "runs/bench/attention-{time}.json"
    """JSON output path ({time} becomes a UTC timestamp; empty: do not write)."""


def time_steps(step, steps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) per call of `step`."""
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def jax_timer(compiled, state, batch):
    """A timer (steps -> time_steps' medians) of a compiled (state, batch) -> (state,
    metrics) function, each call blocked on the new state and the loss, the state carried
    from call to call."""
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics["loss"]))

    return lambda steps: time_steps(step, steps)


def interleaved(
    timers: dict, steps: int, rounds: int, clock: str, settle: int = 0
) -> dict[str, list[float]]:
    """{name: timer} -> {name: [median step seconds per round]}, a timer being a function
    steps -> (median wall, median CPU seconds) per step over that many steps. By `clock`
    ("wall", or "cpu": the CPU time of the process that ran it, which other processes on a
    shared machine disturb less), after one warm-up step each, every round timing each cell
    once, the order rotated from round to round; `settle` untimed steps precede each cell's
    timed ones (for cells in separate processes, whose thread pools hand over the cores)."""
    names, out = list(timers), {name: [] for name in timers}
    for timer in timers.values():
        timer(1)  # warm-up
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if settle:
                timers[name](settle)
            wall, cpu = timers[name](steps)
            out[name].append(cpu if clock == "cpu" else wall)
    return out


def run(cfg: AttentionBench, log=print) -> dict:
    """Runs both measurements of `cfg`; returns the record written to JSON."""
    unknown = set(cfg.variants) | set(cfg.scaling_variants) - set(VARIANTS)
    if unknown - set(VARIANTS):
        raise ValueError(
            f"variants {sorted(unknown - set(VARIANTS))}: choose from {list(VARIANTS)}"
        )
    shape = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)

    def cell(variant, batch_size, seq_len):
        bench = train_bench.TrainBench(preset=cfg.preset, batch_size=batch_size, seq_len=seq_len)
        compiled, state, batch, _, _ = train_bench.build_step(bench, VARIANTS[variant], **shape)
        return jax_timer(compiled, state, batch)

    result = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": train_bench.device_info(),
        "load_average": os.getloadavg(),
        "config": dataclasses.asdict(cfg),
    }
    cells = {v: cell(v, cfg.batch_size, cfg.seq_len) for v in cfg.variants}
    times = interleaved(cells, cfg.steps, cfg.rounds, cfg.clock)
    base = statistics.median(times[cfg.variants[0]])
    result["share"] = {
        v: {"step_s": statistics.median(t), "rounds": t, "over_first": statistics.median(t) / base}
        for v, t in times.items()
    }
    for v, r in result["share"].items():
        log(
            f"{v}: {r['step_s'] * 1e3:.0f} ms/step ({r['over_first']:.3f}x {cfg.variants[0]})",
            file=sys.stderr,
        )
    if cfg.scaling_lens:
        tokens = cfg.batch_size * cfg.seq_len
        config = model_lib.make_config(cfg.preset, vocab_size=train_bench.VOCAB_SIZE, **shape)
        cells = {
            (v, n): cell(v, tokens // n, n) for v in cfg.scaling_variants for n in cfg.scaling_lens
        }
        times = interleaved(
            {f"{v}@{n}": c for (v, n), c in cells.items()}, cfg.steps, cfg.rounds, cfg.clock
        )
        rows = []
        for v in cfg.scaling_variants:
            first = None
            for n in cfg.scaling_lens:
                per_token = statistics.median(times[f"{v}@{n}"]) / tokens
                fl = flops.train_step_flops(config, tokens // n, n) / tokens
                first = first or (per_token, fl)
                rows.append(
                    {
                        "variant": v,
                        "seq_len": n,
                        "batch_size": tokens // n,
                        "us_per_token": per_token * 1e6,
                        "time_growth": per_token / first[0],
                        "flop_growth": fl / first[1],
                    }
                )
                log(
                    f"{v} seq {n}: {per_token * 1e6:.1f} us/token, time x{per_token / first[0]:.2f}"
                    f", FLOPs x{fl / first[1]:.2f}",
                    file=sys.stderr,
                )
        result["scaling"] = rows
    result["load_average_end"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> dict:
    """The CLI (flags from AttentionBench; see --help)."""
    return train_bench.cli_main(AttentionBench, run, argv, __doc__)


if __name__ == "__main__":
    main()
