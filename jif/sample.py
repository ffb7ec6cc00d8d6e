"""Print samples from a trained checkpoint.

    python -m jif.sample --checkpoint runs/x
    python -m jif.sample --checkpoint runs/x --method confidence --steps 128 --temperature 0.8
    python -m jif.sample --checkpoint runs/x --prompt "Once upon a time,"
    python -m jif.sample --checkpoint runs/x --template "Once upon a time, [MASK:20] was happy."

A prompt is continued up to --length tokens; in a template each [MASK:n] is filled with n
tokens (and the text after the template is continued too). Markers are spelled exactly
[MASK] or [MASK:n], 1 <= n <= the context; every option is checked by
jif.sampling.check_settings before anything is loaded or allocated (exit status 2). Models
trained on the embedded stories also get the grammar checker's score per sample.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np
import tyro

from jif import hostmem, interference, objectives, sampling, threshold
from jif.checkpoint import load_for_inference
from jif.stories import check_text
from jif.tokenizer import encode_template


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Options of `python -m jif.sample`."""

    checkpoint: str
    """Run folder (its newest checkpoint) or one step folder."""
    method: str = "confidence"
    """Sampler: one of ddpm, ddpm_cache, confidence, margin, entropy, random, threshold,
    remdm_cap, remdm_conf, interference (confidence writes the most whole stories on the
    default model: README, Samplers; the others: docs/sampling.md)."""
    steps: int = 128
    """Denoising steps (a multiple of the number of blocks)."""
    num: int = 4
    """Number of samples."""
    length: int | None = None
    """Tokens per sample including the leading end-of-text token; default the training length."""
    seed: int = 0
    """Random seed."""
    temperature: float = 1.0
    """Softmax temperature; 0 takes the most likely token."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 keeps every token."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps every token."""
    block_length: int | None = None
    """Generate blocks of this many tokens left to right (semi-autoregressive); default: one."""
    threshold: float = 0.9
    """threshold: also reveal every token whose probability is above this, in (0, 1]."""
    eta: float = 0.02
    """remdm_cap: the most a revealed token is remasked per step, in [0, 1]."""
    probe: str | None = None
    """interference: the probe folder (default <run>/probe, from python -m jif.probe)."""
    self_condition: str = "fresh"
    """A self-conditioned model's input at each call: fresh (its own first pass over the same
    tokens, two passes a call) or previous (the previous call's prediction, one pass a call;
    not with ddpm_cache, remdm_cap, remdm_conf)."""
    prompt: str = ""
    """Text to continue."""
    template: str = ""
    """Infilling template, e.g. 'Once upon a time, [MASK:20] was very happy.'"""
    ema: bool = True
    """Use the EMA weights (--no-ema for the raw weights)."""
    json: bool = False
    """Print one JSON object instead of text."""


FLAGS = {
    "batch": "--num",
    **{k: "--" + k.replace("_", "-") for k in ("method", "steps", "temperature", "top_p")},
    **{k: "--" + k.replace("_", "-") for k in ("top_k", "block_length", "length", "seed")},
    **{k: "--" + k for k in ("threshold", "eta")},
    "self_condition": "--self-condition",
}  # how check_settings' messages name the options


def settings(cfg: SampleConfig, **known) -> dict:
    """`jif.sampling.check_settings` of the options (ValueError naming a bad one)."""
    return sampling.check_settings(
        method=cfg.method,
        steps=cfg.steps,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        block_length=cfg.block_length if known.get("length") else None,
        batch=cfg.num,
        seed=cfg.seed,
        threshold=cfg.threshold,
        eta=cfg.eta,
        self_condition=cfg.self_condition,
        names=FLAGS,
        **known,
    )


def run(cfg: SampleConfig) -> dict:
    """Sample as configured; returns {"texts", "tokens", "scores" (or None), "n_calls", ...}."""
    if cfg.prompt and cfg.template:
        raise ValueError("give either --prompt or --template, not both.")
    settings(cfg)  # before loading anything
    loaded = load_for_inference(cfg.checkpoint, ema=cfg.ema)
    tok = loaded.tokenizer
    context = int(loaded.config.get("seq_len", 128))
    length = context if cfg.length is None else cfg.length
    settings(cfg, length=length, context=context, vocab=tok.vocab_size)  # before any [B, L]
    sampling.check_self_condition(cfg.self_condition, loaded.model_config, FLAGS)
    row = encode_template(tok, cfg.template or cfg.prompt, length=length)
    tokens = np.tile(row[None], (cfg.num, 1))
    start = time.perf_counter()
    objective = objectives.objective_of(loaded.config)  # "ar": left to right
    denoise_fn, extra, note = loaded.denoise_fn, {}, None
    if objective != "ar":
        extra = {"threshold": cfg.threshold, "eta": cfg.eta, "self_condition": cfg.self_condition}
        if cfg.method == "interference":
            denoise_fn, note = interference.denoise_fn_for(loaded, cfg.probe)
            print(note, file=sys.stderr)
    result = objectives.OBJECTIVES[objective].generate(
        denoise_fn,
        jax.random.key(cfg.seed),
        tokens,
        mask_id=tok.mask_id,
        steps=cfg.steps,
        method=cfg.method,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        block_length=cfg.block_length,
        return_trajectory=True,
        **extra,
    )
    out_tokens = np.asarray(result.tokens)
    per_row = objective != "ar" and sampling.METHODS[cfg.method].planner == "expected"
    calls = threshold.calls_per_row(result.trajectory.reveal_step) if per_row else None
    seconds = time.perf_counter() - start
    texts = [tok.decode(r[1:].tolist()) for r in out_tokens]  # without the leading BOS
    scores = grammatical = None
    if loaded.data == "stories":
        window = not (cfg.prompt or cfg.template)  # unprompted samples start mid-story
        checks = [check_text(t, window=window) for t in texts]
        scores = [c.score for c in checks]
        grammatical = [c.grammatical for c in checks]
    return {
        "checkpoint": loaded.path,
        "step": loaded.step,
        "data": loaded.data,
        "method": "left to right" if objective == "ar" else cfg.method,
        "steps": None if objective == "ar" else cfg.steps,
        "n_calls": int(result.n_calls),
        "calls_per_sample": None if calls is None else np.asarray(calls).tolist(),
        "probe": note,
        "seconds": seconds,
        "texts": texts,
        "tokens": out_tokens.tolist(),
        "scores": scores,
        "mean_score": None if scores is None else float(np.mean(scores)),
        "grammatical": grammatical,
        "mean_grammatical": None if grammatical is None else float(np.mean(grammatical)),
    }


def print_report(out: dict) -> None:
    for i, text in enumerate(out["texts"]):
        score = ""
        if out["scores"] is not None:
            score = (
                f"  grammar score {out['scores'][i]:.2f} in context, "
                f"{out['grammatical'][i]:.2f} sentence by sentence"
            )
        print(f"--- sample {i}{score}")
        print(text)
    how = out["method"] if out["steps"] is None else f"{out['method']} with {out['steps']} steps"
    summary = (
        f"--- {len(out['texts'])} samples from {out['checkpoint']} (step {out['step']}), "
        f"{how}: {out['n_calls']} network calls"
        + (
            ""
            if out["calls_per_sample"] is None
            else f" ({np.mean(out['calls_per_sample']):.1f} per sample)"
        )
        + ", "
        f"{out['seconds']:.2f} s including compilation"
    )
    if out["mean_score"] is not None:
        summary += (
            f", mean grammar score {out['mean_score']:.3f} in context"
            f" ({out['mean_grammatical']:.3f} sentence by sentence)"
        )
    print(summary)


def main(argv: list[str] | None = None) -> dict:
    """The CLI (see --help). Exits with status 2 and a message on a user mistake."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    cfg = tyro.cli(SampleConfig, args=argv, description=__doc__)
    try:
        out = run(cfg)
    except ValueError as e:  # bad options, template or checkpoint (CheckpointError)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except MemoryError:  # what check_settings could not foresee (other processes' memory)
        print(
            f"error: out of memory for {cfg.num} samples of length {cfg.length or 'context'}; "
            "use a smaller --num or --length.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    if cfg.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return out


if __name__ == "__main__":
    main()
