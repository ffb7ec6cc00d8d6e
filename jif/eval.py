"""Evaluation: during training (`Evaluator`) and of a checkpoint (`python -m jif.eval`).

    evaluator = Evaluator(EvalConfig(), tokenizer, data="stories", seq_len=128, ...)
    row = evaluator(unbound, ema_params, key)   # {"val_nelbo": ..., "samples": [...], ...}

    python -m jif.eval --checkpoint runs/x                      # its training data, held out
    python -m jif.eval --checkpoint runs/x --data notes.txt --split all --json
    python -m jif.eval --checkpoint runs/diffusion --judge runs/ar --samples 64

The validation set is fixed by (data, seq_len, seed, packing), the NELBO's time grid and masks
by `eval_times` and a fixed key, so the same weights always get the same number. Every measure
comes from the checkpoint's objective (jif.objectives): the diffusion NELBO for "mdlm", the
exact next-token NLL for "ar", both in nats per window token (see jif.ar on units).

`python -m jif.eval` reports nats/token, bits/token and bits/byte with 95% intervals. The
windows are `--sequences` rows of `--seq-len` tokens (BOS + the packed stream, as jif.data
makes them); they are evaluated in batches of `--batch-size` with independent masks per
batch (seed, batch index), and the interval is Student's t over batches: each batch's NELBO
is an unbiased estimate of the same mean (at the fixed `--times` midpoint grid), so the
spread of the batch means holds both the sequences' spread and the masks' noise. Bytes are
those of the UTF-8 text the tokens stand for: each BPE token's byte string (byte-level BPE:
one byte per symbol), 0 for end-of-text; a window's count equals the UTF-8 length of its
decoded text without special tokens (exactly, even where a window cuts a character).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np
import tyro

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import floor, genppl, hostmem, objectives, probes, sampling, stories, windows
from jif import model as model_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """When and how a training run evaluates its EMA weights."""

    eval_every: int = 1000
    """Validation NELBO and samples every N steps and at the end (0: never)."""
    eval_sequences: int = 64
    """Number of fixed validation sequences."""
    eval_times: int = 8
    """Number of fixed noise levels of the validation NELBO."""
    n_samples: int = 4
    """Samples decoded at each evaluation."""
    sample_steps: int = 128
    """Denoising steps per sample."""
    sample_method: str = "confidence"
    """Sampler of those samples (jif.sampling.METHODS): confidence-ordered unmasking by default."""
    sample_temperature: float = 1.0
    """Temperature of those samples (0: argmax)."""

    def validate(self) -> EvalConfig:
        """ValueError naming any out-of-range setting."""
        for name in ("eval_sequences", "eval_times"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("eval_every", "n_samples"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.n_samples:  # the samplers' own checks, with this config's flag names
            sampling.check_settings(
                method=self.sample_method,
                steps=self.sample_steps,
                temperature=self.sample_temperature,
                batch=self.n_samples,
                names={
                    "method": "--sample-method",
                    "steps": "--sample-steps",
                    "temperature": "--sample-temperature",
                    "batch": "--n-samples",
                },
            )
        return self


def batched(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """[N, L] -> consecutive [batch_size, L] batches (the last one may be smaller)."""
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def val_nelbo(model, batches, *, mask_id: int, n_times: int, objective: str = "mdlm") -> dict:
    """The objective's validation measure of a bound DiT on fixed batches (seed 0): for
    "mdlm" `jif.diffusion.eval_nelbo` (one compile serves every model of the same shape),
    for "ar" the exact NLL (jif.ar.eval_nll); both report "nelbo" in nats per window token."""
    return objectives.OBJECTIVES[objective].evaluate(
        model, batches, mask_id=mask_id, n_times=n_times, seed=0
    )


def objective_of_model(unbound) -> str:
    """ "ar" for a causal DiT, else "mdlm" (for callers that do not pass the objective)."""
    return "ar" if getattr(getattr(unbound, "config", None), "causal", False) else "mdlm"


class Evaluator:
    """The fixed validation set and probes of a run; calling it evaluates some weights."""

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer,
        *,
        data: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        packing: str = "pack",
        objective: str | None = None,
    ):
        """objective: the run's (jif.objectives); None: "ar" for a causal model, else "mdlm"."""
        self.cfg, self.tokenizer, self.data, self.seq_len = cfg, tokenizer, data, seq_len
        self.objective = objective
        val = data_lib.validation_tokens(
            data,
            tokenizer,
            seq_len=seq_len,
            n_sequences=cfg.eval_sequences,
            seed=seed,
            packing=packing,
        )
        self.val_batches = batched(val, batch_size)
        self.probes = self.friends = self.floor = None
        if data == "stories":  # the floor: what a perfect model scores on these windows
            self.floor = floor.floor(
                tokenizer,
                seq_len=seq_len,
                n_sequences=cfg.eval_sequences,
                seed=seed,
                packing=packing,
            )
            self.probes = probes.name_probes(tokenizer, seq_len=seq_len, seed=seed)
            self.friends = probes.friend_probes(tokenizer, seq_len=seq_len, seed=seed)

    def __call__(self, unbound, params, key) -> dict:
        """The objective's validation measure of `params` on the fixed validation set
        (val_nelbo; for "ar" the exact NLL, also as val_nll), plus decoded samples and (for
        the embedded stories) the grammar checker's scores, how well the model copies names
        (val_name_nats, val_name_exact) and how often it names the friend after the hero
        (val_hero_as_friend); an AR model predicts names from the text before them only."""
        mask_id, name = self.tokenizer.mask_id, self.objective or objective_of_model(unbound)
        objective, model = objectives.OBJECTIVES[name], ckpt.bind_params(unbound, params)
        result = val_nelbo(
            model, self.val_batches, mask_id=mask_id, n_times=self.cfg.eval_times, objective=name
        )
        out = {
            "val_" + k: float(v)
            for k, v in result.items()
            if np.ndim(v) == 0 and isinstance(v, int | float | np.floating | jax.Array)
        }
        if name == "ar":
            out["val_nll"] = out["val_nelbo"]
        if self.floor is not None:
            out["val_floor"] = self.floor.nats_per_token
        if self.probes is not None and len(self.probes.tokens):
            p = self.probes
            nats, exact = objective.span_scores(model, p.tokens, p.mask, mask_id=mask_id)
            out["val_name_nats"] = float(nats.mean())
            out["val_name_exact"] = float(exact.mean())
        if self.friends is not None and len(self.friends.tokens):
            f = self.friends
            logp = objective.span_logprob(model, f.tokens, f.mask, f.span, mask_id=mask_id)
            out["val_hero_as_friend"] = float(np.exp(logp).mean())
        if self.cfg.n_samples > 0:
            out.update(self.samples(model, key, objective=name))
        return out

    def samples(self, model, key, objective: str = "mdlm") -> dict:
        """A few unconditional samples (BOS + masks) decoded to text, with grammar scores."""
        cfg, tok = self.cfg, self.tokenizer
        tokens = np.full((cfg.n_samples, self.seq_len), tok.mask_id, np.int32)
        tokens[:, 0] = tok.eot_id
        denoise = jax.jit(model_lib.make_denoise_fn(model, mask_id=tok.mask_id))
        result = objectives.OBJECTIVES[objective].generate(
            denoise,
            key,
            tokens,
            mask_id=tok.mask_id,
            steps=cfg.sample_steps,
            method=cfg.sample_method,
            temperature=cfg.sample_temperature,
        )
        texts = [tok.decode(np.asarray(row)[1:].tolist()) for row in result.tokens]
        out: dict[str, Any] = {"samples": texts}
        if self.data == "stories":
            checks = [stories.check_text(text, window=True) for text in texts]
            n_sentences = max(sum(c.n_sentences for c in checks), 1)
            out["grammar_score"] = sum(c.n_valid for c in checks) / n_sentences
            out["grammatical"] = sum(c.n_grammatical for c in checks) / n_sentences
            report = floor.check_stories(texts, window=True)  # whole stories, and diversity
            out["story_level"] = report.story_level
            out["distinct_4grams"] = report.distinct_4grams
        return out


def summary_line(row: dict) -> str:
    """One line for the terminal: the NELBO and, where measured, the probes' scores."""
    what = "NLL" if "val_nll" in row else "NELBO"
    value = row.get("val_nelbo", float("nan"))
    parts = [f"step {row['step']}: val {what} {value:.4f} nats/token"]
    if "val_floor" in row:
        parts[0] += f" (floor {row['val_floor']:.3f}: {value / row['val_floor'] - 1:+.0%})"
    if "story_level" in row:
        parts.append(f"whole stories {row['story_level']:.2f}")
    if "grammar_score" in row:
        parts.append(
            f"grammar {row['grammar_score']:.2f} in context"
            f" ({row['grammatical']:.2f} sentence by sentence)"
        )
    if "val_name_nats" in row:
        parts.append(
            f"repeated names {row['val_name_nats']:.2f} nats ({row['val_name_exact']:.0%} exact)"
        )
    if "val_hero_as_friend" in row:
        parts.append(f"friend named after the hero {row['val_hero_as_friend']:.0%}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- python -m jif.eval


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """Options of `python -m jif.eval`."""

    checkpoint: str
    """Run folder (its newest checkpoint) or one step folder."""
    data: str | None = None
    """stories, tinystories or a .txt/.jsonl/.json/.parquet file (default: the training data)."""
    split: str = "validation"
    """validation (held out: for a file the 5% of documents by text hash), train, or all (a
    file's every document: its train windows, then its validation windows)."""
    sequences: int = 1024
    """Windows evaluated (fewer if the split holds fewer; 0: skip the likelihood)."""
    times: int = 16
    """Midpoint time-grid points of the diffusion NELBO (not used for "ar")."""
    batch_size: int = 16
    """Windows per batch; the interval is over batches."""
    seq_len: int | None = None
    """Tokens per window (default and maximum: the checkpoint's training length)."""
    packing: str | None = None
    """pack, align or pad (jif.data; default: the checkpoint's)."""
    seed: int = 0
    """Which windows (the stories' stream, a file's document order) and the masks."""
    ema: bool = True
    """Evaluate the EMA weights (--no-ema for the raw weights)."""
    judge: str | None = None
    """Score --samples unprompted samples by a judge: a jif AR run (--objective ar), or a
    Hugging Face causal LM, hub id or local folder (e.g. gpt2-large; pip install -e ".[judge]")."""
    samples: int = 64
    """Samples drawn for --judge."""
    method: str = "confidence"
    """Sampler of those samples (jif.sampling.METHODS; an AR generator samples left to right)."""
    steps: int = 128
    """Denoising steps of those samples."""
    temperature: float = 1.0
    """Their temperature (0: argmax)."""
    top_p: float = 1.0
    """Their nucleus mass in (0, 1]."""
    block_length: int | None = None
    """Their block length (semi-autoregressive; default one block)."""
    self_condition: str = "fresh"
    """A self-conditioned generator's input at each call: fresh or previous (jif.sample)."""
    json: bool = False
    """Print one JSON object instead of text."""

    def validate(self) -> MeasureConfig:
        for name in ("sequences", "samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("times", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.split not in (*data_lib.SPLITS, "all"):
            raise ValueError(f"--split {self.split!r}: choose validation, train or all")
        if self.judge:
            sampling.check_settings(
                method=self.method,
                steps=self.steps,
                self_condition=self.self_condition,
                names={"method": "--method", "self_condition": "--self-condition"},
            )
        if self.judge and self.samples < 1:
            raise ValueError("--judge needs --samples >= 1")
        return self


def likelihood(
    model, rows: np.ndarray, tokenizer, *, objective: str, n_times: int, batch_size: int, seed: int
) -> dict:
    """The objective's measure of windows int32 [N, L], batch by batch (independent masks
    per batch), with 95% intervals over batches: nelbo (nats per window token; the exact NLL
    for "ar"), bits_per_token, bits_per_byte, and the counts behind them."""
    evaluate, length = objectives.OBJECTIVES[objective].evaluate, rows.shape[1]
    nats, tokens, nbytes = [], [], []
    for b, batch in enumerate(batched(rows, batch_size)):
        out = evaluate(
            model, [batch], mask_id=tokenizer.mask_id, n_times=n_times, seed=seed * 100_003 + b
        )
        nats.append(out["nelbo"] * batch.size)  # the batch's total nats
        tokens.append(batch.size)
        nbytes.append(int(windows.token_bytes(tokenizer)[batch].sum()))
    nelbo, half = genppl.ratio_interval(nats, tokens)
    bpb, bpb_half = genppl.ratio_interval(np.divide(nats, math.log(2.0)), nbytes)
    ci = lambda x, h: [x - h, x + h]
    return {
        "measure": "nll" if objective == "ar" else "nelbo",
        "nelbo": nelbo,
        "nelbo_ci95": ci(nelbo, half),
        "bits_per_token": nelbo / math.log(2.0),
        "bits_per_token_ci95": ci(nelbo / math.log(2.0), half / math.log(2.0)),
        "bits_per_byte": bpb,
        "bits_per_byte_ci95": ci(bpb, bpb_half),
        "ppl_bound": math.exp(nelbo),
        "n_sequences": len(rows),
        "n_times": n_times if objective == "mdlm" else None,
        "n_batches": len(nats),
        "n_tokens": int(sum(tokens)),
        "n_bytes": int(sum(nbytes)),
        "bytes_per_token": sum(nbytes) / sum(tokens),
        "window_tokens": length,
    }


def measure(cfg: MeasureConfig) -> dict:
    """Everything `python -m jif.eval` reports, as one dict (see --help and docs/eval.md)."""
    cfg.validate()
    start = time.perf_counter()
    judge = genppl.open_judge(cfg.judge, ema=cfg.ema) if cfg.judge else None  # fails first
    loaded = ckpt.load_for_inference(cfg.checkpoint, ema=cfg.ema)
    objective, tok = objectives.objective_of(loaded.config), loaded.tokenizer
    sampling.check_self_condition(
        cfg.self_condition, loaded.model_config, {"self_condition": "--self-condition"}
    )
    context = int(loaded.config.get("seq_len", 128))
    seq_len = context if cfg.seq_len is None else cfg.seq_len
    if not 2 <= seq_len <= context:
        raise ValueError(f"--seq-len {seq_len} must be between 2 and the checkpoint's {context}")
    out: dict[str, Any] = {
        "checkpoint": loaded.path,
        "step": loaded.step,
        "objective": objective,
        "ema": cfg.ema,
        "trained_on": loaded.data,
    }
    data_args = dict(
        split=cfg.split, seed=cfg.seed, packing=cfg.packing or loaded.config.get("packing", "pack")
    )
    if cfg.sequences:
        rows, out["data"] = windows.eval_windows(
            cfg.data or loaded.data, tok, seq_len=seq_len, n_sequences=cfg.sequences, **data_args
        )
        out.update(
            likelihood(
                loaded.model,
                rows,
                tok,
                objective=objective,
                n_times=cfg.times,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
            )
        )
    if cfg.judge:
        options = dict(
            steps=cfg.steps,
            method=cfg.method,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            block_length=cfg.block_length,
            **({"self_condition": cfg.self_condition} if objective == "mdlm" else {}),
        )
        if cfg.sequences and seq_len == context and len(rows) >= cfg.samples:
            reference = rows[: cfg.samples]  # real windows as long as the samples
        else:
            reference, _ = windows.eval_windows(
                cfg.data or loaded.data, tok, seq_len=context, n_sequences=cfg.samples, **data_args
            )
        out["generative"] = genppl.generative_perplexity(
            loaded,
            judge,
            n_samples=cfg.samples,
            seed=cfg.seed,
            ema=cfg.ema,
            reference=reference,
            **options,
        )
    out["seconds"] = time.perf_counter() - start
    return out


def print_report(out: dict) -> None:
    print(f"{out['checkpoint']} (step {out['step']}, objective {out['objective']})")
    if "nelbo" in out:
        d, what = out["data"], "NLL" if out["measure"] == "nll" else "NELBO"
        h = lambda key: (out[key + "_ci95"][1] - out[key + "_ci95"][0]) / 2
        times = f" x {out['n_times']} times" if out["n_times"] else ""
        print(
            f"data {d['data']} ({d['split']}): {out['n_sequences']} windows of "
            f"{out['window_tokens']} tokens{times}, {out['n_bytes']:,} bytes"
        )
        print(
            f"  {what} {out['nelbo']:.4f} +- {h('nelbo'):.4f} nats/token, "
            f"{out['bits_per_token']:.4f} +- {h('bits_per_token'):.4f} bits/token, "
            f"{out['bits_per_byte']:.4f} +- {h('bits_per_byte'):.4f} bits/byte (95%)"
        )
    g = out.get("generative")
    if g:
        print(
            f"{g['n_samples']} samples ({g['method']}, {g['steps']} steps) judged by {g['judge']}"
            f" ({g['tokenization']}):"
        )
        for name, r in [("samples", g)] + (
            [("real text", g["reference"])] if "reference" in g else []
        ):
            print(
                f"  {name}: gen PPL {r['gen_ppl']:.2f} (NLL {r['nll']:.4f} +- "
                f"{r['nll_ci95_halfwidth']:.4f}), unigram entropy {r['entropy']:.3f} nats, "
                f"repeated 4-grams {r['repeated_4grams']:.3f}"
            )
    print(f"{out['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    """The CLI (see --help). Exits with status 2 and `error: ...` on a user mistake."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    cfg = tyro.cli(MeasureConfig, args=argv, description=__doc__)
    try:
        out = measure(cfg)
    except ValueError as e:  # bad options, data or checkpoint (CheckpointError, DataError)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return out


if __name__ == "__main__":
    main()
