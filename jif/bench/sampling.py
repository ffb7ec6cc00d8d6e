"""Sampling speed: network calls, wall time and the sampler's overhead per method; with
--judge, sample quality too.

    python -m jif.bench.sampling                       # the `cpu` preset at random init
    python -m jif.bench.sampling --checkpoint runs/x   # a trained model
    python -m jif.bench.sampling --methods ddpm ddpm_cache --steps 500 --length 128 --batch 8
    python -m jif.bench.sampling --checkpoint runs/x --judge runs/x-ar --samples 64 \
        --steps 16 32 128 --methods confidence interference --figure docs/figures/x.png

For each method: network calls, wall time per batch (median over repeats, compilation
excluded), and the time per network call relative to one plain jitted forward pass of the
same batch, timed just before each run (wall / (n_calls x forward); 1.0 means the sampler
itself costs nothing beyond its network calls). Random-init logits are nearly uniform, so
the number of calls is the same as for a trained model (ancestral reveal steps do not depend
on the logits) and the per-call costs are the same too. "interference" uses the
checkpoint's probe when it has one (`jif.interference.denoise_fn_for`).

With --judge (an AR checkpoint) each method and step count instead draws --samples
unprompted samples (batches of 32 with jif.eval's keys, so the samples are those of
`python -m jif.eval --judge`) and reports the whole-story rate (`jif.floor.check_stories`,
window=True, as jif.eval's training-time samples), generative perplexity and unigram
entropy under the judge (`jif.genppl`), network calls per sample and wall time.
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
from matplotlib.figure import Figure

from jif import floor, genppl, hostmem, interference, sampling, threshold
from jif import model as model_lib
from jif.checkpoint import load_for_inference

FLAG = "--self-condition"


def _denoiser(checkpoint: str | None, preset: str, seed: int):
    """(denoise_fn of a method, mask_id, description) for a checkpoint or a random-init
    preset; "interference" gets the checkpoint's probe if it has one."""
    if checkpoint:
        loaded = load_for_inference(checkpoint)
        by_method = lambda m: (
            interference.denoise_fn_for(loaded)[0] if m == "interference" else loaded.denoise_fn
        )
        return by_method, loaded.tokenizer.mask_id, f"{loaded.path} (step {loaded.step})"
    config = model_lib.make_config(preset)
    model = model_lib.build_model(config, jax.random.key(seed))
    mask_id = config.vocab_size - 1  # the mask is the last id (n_bpe + 1)
    fn = jax.jit(model_lib.make_denoise_fn(model, mask_id=mask_id))
    return lambda m: fn, mask_id, f"preset {preset!r} at random init"


def calls_per_sample(method: str, result) -> float:
    """Mean network calls a row would take alone: its distinct reveal steps for the methods
    that call a row only at its own steps (every "expected"-plan method, ddpm_cache); the
    batch's calls for the others (ddpm: every step; remdm_*: steps after a change)."""
    if method == "ddpm_cache" or sampling.METHODS[method].planner == "expected":
        return float(np.mean(threshold.calls_per_row(result.trajectory.reveal_step)))
    return float(result.n_calls)


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
    denoiser, mask_id, model_desc = _denoiser(checkpoint, preset, seed)
    denoise_fn = denoiser("ddpm")
    tokens = np.full((batch, length), mask_id, np.int32)
    tokens[:, 0] = mask_id - 1  # end-of-text as BOS, like the training data

    # One plain forward pass on a half-masked batch (the average state of a run), timed next
    # to every sampling run so that both see the same load on a shared machine.
    half = jnp.asarray(np.where(np.arange(length) % 2 == 0, tokens, 7))
    jax.block_until_ready(denoise_fn(half))
    forward = lambda: _median_time(lambda i: denoise_fn(half), 7)

    results, forward_all = {}, []
    for method in methods:
        go = lambda i, method=method, fn=denoiser(method): sampling.sample(
            fn,
            jax.random.key(seed + 1 + i),
            tokens,
            mask_id=mask_id,
            steps=steps,
            method=method,
            return_trajectory=True,
        )
        start = time.perf_counter()
        jax.block_until_ready(go(-1))
        compile_s = time.perf_counter() - start
        calls, times, fwds, per_row = [], [], [], []
        for i in range(repeats):
            fwds.append(forward())
            start = time.perf_counter()
            out = jax.block_until_ready(go(i))
            times.append(time.perf_counter() - start)
            calls.append(int(out.n_calls))
            per_row.append(calls_per_sample(method, out))
        forward_all += fwds
        ratios = [t / (c * f) for t, c, f in zip(times, calls, fwds, strict=True)]
        results[method] = {
            "n_calls": statistics.median(calls),
            "calls_per_sample": statistics.median(per_row),
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
        f"{'method':<12} {'calls':>6} {'/sample':>7} {'wall s':>8} {'fwd ms':>7} "
        f"{'wall / (calls x fwd)':>21}",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"{name:<12} {r['n_calls']:>6.0f} {r['calls_per_sample']:>7.1f} {r['wall_s']:>8.3f} "
            f"{1e3 * r['forward_s']:>7.2f} {r['per_call_over_forward']:>21.3f}"
        )
    return "\n".join(lines)


def quality(
    *,
    checkpoint: str,
    judge: str,
    methods: tuple[str, ...],
    steps: tuple[int, ...],
    samples: int = 64,
    seed: int = 0,
    threshold_value: float = threshold.THRESHOLD,
    eta: float = sampling.ETA,
    self_condition: str = "fresh",
    progress=print,
) -> dict:
    """Sample quality of every method at every step count (see the module's docstring);
    self_condition: as in jif.sampling.sample."""
    loaded, judged = load_for_inference(checkpoint), genppl.open_judge(judge)
    sampling.check_self_condition(self_condition, loaded.model_config, {"self_condition": FLAG})
    tok, length = loaded.tokenizer, int(loaded.config.get("seq_len", 128))
    notes, rows_out = {}, []
    for n_steps in steps:
        for method in methods:
            fn = loaded.denoise_fn
            if method == "interference":
                fn, notes[method] = interference.denoise_fn_for(loaded)
            toks, per_row, start = [], [], time.perf_counter()
            for i in range(0, samples, 32):  # jif.genppl.draw_samples' batches and keys
                rows = np.full((min(32, samples - i), length), tok.mask_id, np.int32)
                rows[:, 0] = tok.eot_id
                out = sampling.sample(
                    fn,
                    jax.random.fold_in(jax.random.key(seed), i),
                    rows,
                    mask_id=tok.mask_id,
                    steps=n_steps,
                    method=method,
                    return_trajectory=True,
                    threshold=threshold_value,
                    eta=eta,
                    self_condition=self_condition,
                )
                toks.append(np.asarray(out.tokens))
                per_row.append(calls_per_sample(method, out) * len(rows))
            wall = time.perf_counter() - start
            toks = np.concatenate(toks)
            texts = [tok.decode(r[1:].tolist()) for r in toks]
            stories = floor.check_stories(texts, window=True)
            row = {
                "method": method,
                "steps": n_steps,
                "calls_per_sample": sum(per_row) / samples,
                "story_level": stories.story_level,
                "sentence_level": stories.sentence_level,
                **genppl.score_rows(judged, toks, tok, batch_size=32),
                "wall_s": wall,
            }
            rows_out.append(row)
            progress(format_quality_row(row))
    return {
        "model": f"{loaded.path} (step {loaded.step})",
        "judge": f"{judged.name} (step {judged.step})",
        "samples": samples,
        "seed": seed,
        "threshold": threshold_value,
        "eta": eta,
        "self_condition": self_condition,
        "notes": notes,
        "rows": rows_out,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
    }


QUALITY_HEADER = (
    f"{'method':<13} {'steps':>5} {'calls':>6} {'stories':>7} {'gen PPL':>8} {'entropy':>7} "
    f"{'wall s':>7}"
)


def format_quality_row(r: dict) -> str:
    return (
        f"{r['method']:<13} {r['steps']:>5} {r['calls_per_sample']:>6.1f} "
        f"{r['story_level']:>7.3f} {r['gen_ppl']:>8.2f} {r['entropy']:>7.3f} {r['wall_s']:>7.1f}"
    )


def quality_figure(result: dict, path: str) -> None:
    """Whole-story rate and generative perplexity against calls per sample, per method."""
    fig = Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = sorted(
            (r for r in result["rows"] if r["method"] == method), key=lambda r: r["steps"]
        )
        calls = [r["calls_per_sample"] for r in rows]
        ax1.plot(calls, [r["story_level"] for r in rows], "o-", label=method, markersize=4)
        ax2.plot(calls, [r["gen_ppl"] for r in rows], "o-", label=method, markersize=4)
    for ax, label in ((ax1, "whole-story rate"), (ax2, "gen. perplexity (AR judge)")):
        ax.set_xscale("log")
        ax.set_xlabel("network calls per sample")
        ax.set_ylabel(label)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['samples']} samples per point; {result['model']}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> dict:
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="run or step folder (default: none)")
    parser.add_argument("--preset", default="cpu", help="model preset without --checkpoint")
    parser.add_argument("--methods", nargs="+", default=list(sampling.METHODS))
    parser.add_argument("--steps", type=int, nargs="+", default=[500])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", default=None, help="AR checkpoint: measure sample quality")
    parser.add_argument("--samples", type=int, default=64, help="samples per point (--judge)")
    parser.add_argument("--threshold", type=float, default=threshold.THRESHOLD)
    parser.add_argument("--eta", type=float, default=sampling.ETA, help="remdm_cap's cap")
    parser.add_argument(
        FLAG,
        default="fresh",
        choices=sampling.SELF_CONDITION,
        help="a self-conditioned model's input (--judge; jif.sampling.sample)",
    )
    parser.add_argument("--figure", default=None, help="PNG of the quality plot (--judge)")
    parser.add_argument("--out", default="runs/bench/sampling.json", help="JSON output")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(sampling.METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(sampling.METHODS)}")
    if args.judge:
        if not args.checkpoint or args.samples < 1:
            parser.error("--judge needs --checkpoint and --samples >= 1")
        try:
            for n in args.steps:
                for m in args.methods:
                    sampling.check_settings(
                        method=m,
                        steps=n,
                        threshold=args.threshold,
                        eta=args.eta,
                        self_condition=args.self_condition,
                        names={"self_condition": FLAG},
                    )
            print(QUALITY_HEADER)
            result = quality(
                checkpoint=args.checkpoint,
                judge=args.judge,
                methods=tuple(args.methods),
                steps=tuple(args.steps),
                samples=args.samples,
                seed=args.seed,
                threshold_value=args.threshold,
                eta=args.eta,
                self_condition=args.self_condition,
            )
        except ValueError as e:  # bad settings, checkpoint or judge
            parser.exit(2, f"error: {e}\n")
        for note in result["notes"].values():
            print(note)
        if args.figure:
            quality_figure(result, args.figure)
            print(f"wrote {args.figure}")
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {args.out}")
        return result
    if len(args.steps) > 1:
        parser.error("several --steps need --judge (the speed table is for one step count)")
    result = run(
        checkpoint=args.checkpoint,
        preset=args.preset,
        methods=tuple(args.methods),
        steps=args.steps[0],
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
