"""Sampling speed: network calls, wall time and the sampler's overhead per method.

    python -m jif.bench.sampling                       # the `cpu` preset at random init
    python -m jif.bench.sampling --checkpoint runs/x   # a trained model
    python -m jif.bench.sampling --methods ddpm ddpm_cache --steps 500 --length 128 --batch 8

For each method: network calls, wall time per batch (median over repeats, compilation
excluded), and the time per network call relative to one plain jitted forward pass of the
same batch, timed just before each run (wall / (n_calls x forward); 1.0 means the sampler
itself costs nothing beyond its network calls). Random-init logits are nearly uniform, so
the number of calls is the same as for a trained model (ancestral reveal steps do not depend
on the logits) and the per-call costs are the same too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jif import hostmem, sampling
from jif import model as model_lib
from jif.checkpoint import load_for_inference


def _denoiser(checkpoint: str | None, preset: str, seed: int):
    """(denoise_fn, mask_id, description) for a checkpoint or a random-init preset."""
    if checkpoint:
        loaded = load_for_inference(checkpoint)
        return loaded.denoise_fn, loaded.tokenizer.mask_id, f"{loaded.path} (step {loaded.step})"
    config = model_lib.make_config(preset)
    model = model_lib.build_model(config, jax.random.key(seed))
    mask_id = config.vocab_size - 1  # the mask is the last id (n_bpe + 1)
    fn = jax.jit(model_lib.make_denoise_fn(model, mask_id=mask_id))
    return fn, mask_id, f"preset {preset!r} at random init"


def _median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(
    *,
    checkpoint: str | None = None,
    preset: str = "cpu",
    methods: tuple[str, ...] = tuple(sampling.METHODS),
    steps: int = 500,
    length: int = 128,
    batch: int = 8,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Measure every method; returns {"forward_s", "methods": {name: {...}}, settings...}."""
    denoise_fn, mask_id, model_desc = _denoiser(checkpoint, preset, seed)
    tokens = np.full((batch, length), mask_id, np.int32)
    tokens[:, 0] = mask_id - 1  # end-of-text as BOS, like the training data

    # One plain forward pass on a half-masked batch (the average state of a run), timed next
    # to every sampling run so that both see the same load on a shared machine.
    half = jnp.asarray(np.where(np.arange(length) % 2 == 0, tokens, 7))
    jax.block_until_ready(denoise_fn(half))
    forward = lambda: _median_time(lambda i: denoise_fn(half), 7)

    results, forward_all = {}, []
    for method in methods:
        go = lambda i, method=method: sampling.sample(
            denoise_fn,
            jax.random.key(seed + 1 + i),
            tokens,
            mask_id=mask_id,
            steps=steps,
            method=method,
        )
        start = time.perf_counter()
        jax.block_until_ready(go(-1))
        compile_s = time.perf_counter() - start
        calls, times, fwds = [], [], []
        for i in range(repeats):
            fwds.append(forward())
            start = time.perf_counter()
            calls.append(int(jax.block_until_ready(go(i)).n_calls))
            times.append(time.perf_counter() - start)
        forward_all += fwds
        ratios = [t / (c * f) for t, c, f in zip(times, calls, fwds, strict=True)]
        results[method] = {
            "n_calls": statistics.median(calls),
            "wall_s": statistics.median(times),
            "forward_s": statistics.median(fwds),
            "first_call_s": compile_s,
            # time per network call over one plain forward pass = wall / (calls x forward)
            "per_call_over_forward": statistics.median(ratios),
        }
    forward_s = statistics.median(forward_all)
    return {
        "model": model_desc,
        "steps": steps,
        "length": length,
        "batch": batch,
        "repeats": repeats,
        "forward_s": forward_s,
        "expected_calls_per_row_ddpm_cache": sampling.expected_calls(steps, length - 1),
        "methods": results,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
    }


def format_table(result: dict) -> str:
    lines = [
        f"sampling: {result['model']}, steps {result['steps']}, length {result['length']}, "
        f"batch {result['batch']}; forward pass {1e3 * result['forward_s']:.2f} ms "
        f"({result['machine']})",
        f"{'method':<12} {'calls':>6} {'wall s':>8} {'fwd ms':>7} {'wall / (calls x fwd)':>21}",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"{name:<12} {r['n_calls']:>6.0f} {r['wall_s']:>8.3f} {1e3 * r['forward_s']:>7.2f} "
            f"{r['per_call_over_forward']:>21.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="run or step folder (default: none)")
    parser.add_argument("--preset", default="cpu", help="model preset without --checkpoint")
    parser.add_argument("--methods", nargs="+", default=list(sampling.METHODS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/sampling.json", help="JSON output")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(sampling.METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(sampling.METHODS)}")
    result = run(
        checkpoint=args.checkpoint,
        preset=args.preset,
        methods=tuple(args.methods),
        steps=args.steps,
        length=args.length,
        batch=args.batch,
        repeats=args.repeats,
        seed=args.seed,
    )
    print(format_table(result))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
