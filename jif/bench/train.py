"""Training throughput of the real jitted train step (jif.loop.make_train_step).

For one preset: compile time, steady-state step time and tokens/s, FLOP/s of the matmul work
the step does (jif.flops.train_step_flops, the readout at the positions the loss reads
out; XLA's cost analysis of the compiled step is reported beside it, and also counts the
loss's all-positions branch that rarely runs), model FLOPs utilisation (MFU) against the
peak of this machine, memory, and the time the data pipeline needs per batch (which the loop
pays unless it is prefetched).

Peak (jif.flops): on CPU the faster of a jitted n x n float32 matmul and numpy's (the BLAS),
measured in the same process, interleaved with the train steps so both see the same (shared,
noisy) machine; on an accelerator its nameplate peak for the dtype used
(jif.flops.ACCELERATOR_PEAKS). Every record names its processor.

Timing: every step is blocked on the new state and the loss (dispatch is asynchronous; an
empty aux would make steps look free), the way the training loop blocks on float(loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import numpy as np
import tyro

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import flops, hostmem, layers, loop, optim
from jif import model as model_lib
from jif.tokenizer import load_tokenizer

N_BPE = 2048  # default tokenizer: vocab 2050, mask id 2049
VOCAB_SIZE = N_BPE + 2
MASK_ID = N_BPE + 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainBench:
    """Settings of one training benchmark."""

    preset: tyro.conf.Suppress[str] = "small"
    """Model preset (jif.model.PRESETS; `python -m jif.bench --presets` sets it)."""
    batch_size: int = 32
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    steps: int = 10
    """Timed steps per round (after one untimed warm-up step)."""
    rounds: int = 3
    """Rounds of (peak matmul, timed steps); each round gives one MFU sample."""
    optimizer: str = "adamw"
    """Optimizer name (jif.optim.OPTIMIZERS)."""
    peak_n: int = 2048
    """Size of the square float32 matmul whose FLOP/s is the CPU peak."""
    data: str | None = "stories"
    """Also time the data pipeline for this source (None: skip; needs the tokenizer)."""
    dtype: str = "auto"
    """Parameter and activation dtype: float32, bfloat16, auto (bfloat16 on accelerators)."""
    attention: str = "auto"
    """Attention kernel (jif.layers.ATTENTION_NAMES): auto, xla, chunked, cudnn, pallas."""


# ----------------------------------------------------------------------------- peak


def device_info() -> dict:
    """Machine facts stored with every result."""
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": flops.processor(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "host_memory_reuse": hostmem.applied(),  # see jif.hostmem
    }


# ----------------------------------------------------------------------------- the step


def xla_flops(compiled) -> float | None:
    """FLOPs of one call from XLA's cost analysis (None if the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def memory_bytes(compiled) -> dict:
    """Argument / output / temporary bytes of the compiled step (XLA's memory analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0)) for k in keys}


def peak_memory_bytes() -> dict:
    """Peak memory so far: device memory_stats on accelerators, process max RSS on CPU."""
    stats = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        pass
    if "peak_bytes_in_use" in stats:
        return {"peak_device_bytes": int(stats["peak_bytes_in_use"])}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_rss_bytes": int(rss_kb) * 1024}


def build_step(bench: TrainBench, transform=None, **overrides):
    """(compiled train step, initial state, batch, model config, compile seconds).

    The step is jif.loop.make_train_step jitted as jif.train.run does (state donated),
    on one device, with random token batches of the benchmark's shape. `overrides` are
    ModelConfig fields set on the preset; `transform(model) -> model` swaps layers (for
    jif.bench.attention's variants)."""
    model_config = model_lib.make_config(
        bench.preset,
        vocab_size=VOCAB_SIZE,
        dtype=bench.dtype,
        attention=bench.attention,
        **overrides,
    )
    model = model_lib.build_model(model_config, jax.random.key(0))
    unbound, params = ckpt.split_params(transform(model) if transform else model)
    opt = optim.OptimConfig(optimizer=bench.optimizer)
    tx, _ = optim.make_optimizer(opt, 1000, model_config, params)
    state = loop.init_state(params, tx)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, N_BPE, (bench.batch_size, bench.seq_len), dtype=np.int32)
    batch[:, 0] = N_BPE  # BOS, like the data pipeline
    batch = jax.device_put(batch)
    step = loop.make_train_step(unbound, tx, seed=0, ema=0.995, mask_id=MASK_ID)
    step = jax.jit(step, donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, state, batch, model_config, {"trace_s": t1 - t0, "compile_s": t2 - t1}


def time_data(bench: TrainBench, n: int = 5) -> dict:
    """Seconds per batch of jif.data.TokenBatches (first batch separately: it opens the source)."""
    tok = load_tokenizer(N_BPE)
    t0 = time.perf_counter()
    batches = data_lib.TokenBatches(
        bench.data, tok, split="train", batch_size=bench.batch_size, seq_len=bench.seq_len
    )
    next(batches)
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - t0)
    return {"data_first_batch_s": first, "data_batch_s": statistics.median(times)}


def run(bench: TrainBench, peak: flops.MatmulPeak | None = None, log=print) -> dict:
    """Benchmarks one preset's train step; see the module docstring for what is measured."""
    if min(bench.batch_size, bench.seq_len, bench.steps, bench.rounds) < 1:
        raise ValueError(f"batch_size, seq_len, steps and rounds must be >= 1, got {bench}")
    compiled, state, batch, mc, compile_times = build_step(bench)
    fixed_peak = flops.stated_peak(mc.dtype)
    if fixed_peak is None and peak is None:
        peak = flops.MatmulPeak(bench.peak_n, mc.dtype)
    tokens = bench.batch_size * bench.seq_len
    flops_xla = xla_flops(compiled)
    flops_model = flops.train_step_flops(mc, bench.batch_size, bench.seq_len)

    state, metrics = compiled(state, batch)  # warm-up (first call allocates)
    jax.block_until_ready((state, metrics["loss"]))
    step_times, peaks, by_source = [], [], {}
    for _ in range(bench.rounds):
        for i in range(2):  # the peak before and after each round's steps: the better of both
            if fixed_peak is None:
                peak.measure()
                for k, v in peak.last.items():
                    by_source.setdefault(k, []).append(v)
            if i == 0:
                for _ in range(bench.steps):
                    t0 = time.perf_counter()
                    state, metrics = compiled(state, batch)
                    jax.block_until_ready((state, metrics["loss"]))
                    step_times.append(time.perf_counter() - t0)
        recent = [max(v[-2:]) for v in by_source.values()]
        peaks.append(fixed_peak or max(recent))
    loss = float(metrics["loss"])
    # MFU per round: that round's median step against the peak measured around it.
    per_round = [
        statistics.median(step_times[r * bench.steps : (r + 1) * bench.steps])
        for r in range(bench.rounds)
    ]
    # MFU by the step's matmul work, counted: XLA's cost analysis also counts the branch of
    # the loss that reads out every position, which runs only when unusually many are masked.
    mfu_rounds = [flops_model / t / p for t, p in zip(per_round, peaks, strict=True)]
    step_s = statistics.median(step_times)
    kernel = layers.pick_attention(
        mc.attention, platform=jax.default_backend(), dtype=mc.dtype, seq_len=bench.seq_len
    )
    result = {
        "preset": bench.preset,
        "processor": flops.processor(),
        "dtype": mc.dtype,
        "attention": kernel,
        "batch_size": bench.batch_size,
        "seq_len": bench.seq_len,
        "optimizer": bench.optimizer,
        "n_params": sum(int(v.data_array.size) for v in state["params"].values()),
        **compile_times,
        "step_s": step_s,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "tokens_per_s": tokens / step_s,
        "flops_per_step_xla": flops_xla,
        "flops_per_step_model": flops_model,
        "xla_over_model": flops_xla / flops_model if flops_xla else None,
        "achieved_flops": flops_model / step_s,
        "peak_flops": statistics.median(peaks),
        "peak_source": f"stated {mc.dtype}"
        if fixed_peak
        else f"max(XLA, numpy) matmul {bench.peak_n}^3 {mc.dtype}",
        **{f"peak_{k}_flops": statistics.median(v) for k, v in by_source.items()},
        "mfu": statistics.median(mfu_rounds),
        "mfu_rounds": mfu_rounds,
        "mfu_xla": statistics.median(
            [flops_xla / t / p for t, p in zip(per_round, peaks, strict=True)]
        )
        if flops_xla
        else None,
        "final_loss": loss,
        **{"memory_" + k: v for k, v in memory_bytes(compiled).items()},
        **peak_memory_bytes(),
    }
    if bench.data:
        result.update(time_data(bench))
        result["data_over_step"] = result["data_batch_s"] / step_s
    log(
        f"{bench.preset}: {step_s * 1e3:.1f} ms/step, {result['tokens_per_s']:.0f} tok/s, "
        f"MFU {result['mfu']:.1%} (rounds {', '.join(f'{m:.1%}' for m in mfu_rounds)})",
        file=sys.stderr,
    )
    return result


def cli_main(settings_type, run_fn, argv, description: str, table=None) -> dict:
    """A benchmark's command line: flags from the frozen dataclass `settings_type` (tyro),
    `run_fn(settings) -> record`, a ValueError printed as `error: ...` with exit status 2,
    `table(record)` printed when given, and the record written to its `out` path."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    cfg = tyro.cli(settings_type, args=argv, description=description)
    try:
        result = run_fn(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if table is not None:
        print(table(result))
    write_result(result, cfg.out)
    return result


def write_result(result: dict, out: str) -> None:
    """A benchmark's JSON record to `out` ({time} becomes a UTC timestamp; empty: nothing)."""
    if not out:
        return
    path = out.replace("{time}", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
