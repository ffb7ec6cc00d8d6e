"""Generative perplexity: a model's unprompted samples scored by an autoregressive judge.

    python -m jif.eval --checkpoint runs/diffusion --judge runs/ar --samples 64 \
        --method confidence --steps 128

The samples are drawn the way jif.train's evaluation draws them (rows of BOS + masks, the
sampler of the generator's objective: jif.sampling for diffusion, jif.ar for an AR model),
and the judge (a checkpoint trained with `--objective ar`) scores them by its per-token
negative log-likelihood: gen_ppl = exp(total NLL / predicted tokens). A low perplexity is
easy to get with repetitive text, so the samples' unigram entropy and their share of
repeated 4-grams are reported beside it, with the same numbers for real text of the
generator's data (`reference`) for comparison.

Tokenisation: when generator and judge share a tokenizer (jif's defaults) the sample tokens
are scored directly; otherwise each sample is decoded to text and re-encoded with the
judge's tokenizer (BOS + the text, cut to the judge's context), which the output says.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import scipy.stats

from jif import ar, objectives
from jif import checkpoint as ckpt

NGRAM = 4  # repetition is measured on 4-grams of tokens


def ratio_interval(num, den, level: float = 0.95) -> tuple[float, float]:
    """sum(num) / sum(den) and the half-width of its `level` confidence interval, from K
    independent units (num [K], den [K]; e.g. nats and tokens per batch): the delta-method
    standard error of a ratio, sqrt(sum (num - R den)^2 / (K (K - 1))) / mean(den), times
    Student's t quantile with K - 1 degrees of freedom. NaN half-width for K < 2."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    ratio = float(num.sum() / den.sum())
    k = len(num)
    if k < 2:
        return ratio, math.nan
    se = math.sqrt(np.sum((num - ratio * den) ** 2) / (k * (k - 1))) / float(den.mean())
    return ratio, float(scipy.stats.t.ppf(0.5 + level / 2, k - 1) * se)


def sample_stats(tokens: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """Diversity of token rows int32 [N, L] (position 0, the BOS, left out; `valid` bool
    [N, L] marks the other positions to count): entropy, the mean over rows of the entropy
    of each row's unigram distribution in nats (as Zheng et al. 2024 report for masked
    diffusion samples); entropy_pooled, that of all rows' tokens together; repeated_4grams,
    the mean over rows of 1 - distinct 4-grams / 4-grams (0: no 4-gram occurs twice)."""
    tokens = np.asarray(tokens)
    valid = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool)
    rows = [r[1:][v[1:]] for r, v in zip(tokens, valid, strict=True)]

    def entropy(x: np.ndarray) -> float:
        p = np.unique(x, return_counts=True)[1] / max(len(x), 1)
        return float(-np.sum(p * np.log(p)))

    def repeated(x: np.ndarray) -> float:
        grams = [tuple(x[i : i + NGRAM]) for i in range(len(x) - NGRAM + 1)]
        return 1.0 - len(set(grams)) / len(grams) if grams else 0.0

    return {
        "entropy": float(np.mean([entropy(r) for r in rows])),
        "entropy_pooled": entropy(np.concatenate(rows)),
        "repeated_4grams": float(np.mean([repeated(r) for r in rows])),
    }


def draw_samples(loaded, key, *, n: int, batch_size: int, **options) -> np.ndarray:
    """n unprompted samples int32 [n, L] (L: the generator's training length): rows of BOS +
    masks through the generator's objective's sampler (options: steps, method, temperature,
    top_p, top_k, block_length)."""
    tok, length = loaded.tokenizer, int(loaded.config.get("seq_len", 128))
    generate = objectives.OBJECTIVES[objectives.objective_of(loaded.config)].generate
    out = []
    for i in range(0, n, batch_size):
        rows = np.full((min(batch_size, n - i), length), tok.mask_id, np.int32)
        rows[:, 0] = tok.eot_id
        k = jax.random.fold_in(key, i)
        out.append(
            np.asarray(generate(loaded.denoise_fn, k, rows, mask_id=tok.mask_id, **options).tokens)
        )
    return np.concatenate(out)


def retokenize(rows: np.ndarray, source, target, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `source` tokens -> (rows int32 [N, length] of `target` tokens, valid bool):
    each row's text after its BOS, re-encoded behind target's BOS, cut to `length` and
    padded with end-of-text (padding not valid)."""
    out = np.full((len(rows), length), target.eot_id, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids = [target.eot_id] + target.encode(source.decode(np.asarray(row)[1:].tolist()))
        ids = ids[:length]
        out[i, : len(ids)], valid[i, : len(ids)] = ids, True
    return out, valid


def judge_scores(judge, rows: np.ndarray, valid: np.ndarray, *, batch_size: int) -> dict:
    """The judge's NLL of rows int32 [N, L] at the valid positions 1..L-1: nll (nats per
    predicted token), its 95% interval half-width over rows, gen_ppl = exp(nll)."""
    nats, count = [], []
    for i in range(0, len(rows), batch_size):
        nll = ar.token_nll(judge.model, rows[i : i + batch_size], mask_id=judge.tokenizer.mask_id)
        v = valid[i : i + batch_size, 1:]
        nats.append(np.sum(np.where(v, nll, 0.0), axis=-1))
        count.append(v.sum(axis=-1))
    nll, half = ratio_interval(np.concatenate(nats), np.concatenate(count))
    return {"nll": nll, "nll_ci95_halfwidth": half, "gen_ppl": math.exp(nll)}


def generative_perplexity(
    loaded,
    judge_path: str,
    *,
    n_samples: int,
    seed: int = 0,
    batch_size: int = 32,
    ema: bool = True,
    reference: np.ndarray | None = None,
    **options,
) -> dict:
    """Samples of `loaded` (a jif.checkpoint.LoadedModel) scored by the AR checkpoint at
    judge_path: gen_ppl, nll, entropy, entropy_pooled, repeated_4grams, the settings, how
    tokens were matched, and the same statistics for `reference` rows of real text (int32
    [N, L] in the generator's tokens) when given. options: the sampler's (see
    draw_samples). CheckpointError / ValueError for a judge that is not an AR checkpoint."""
    judge = ckpt.load_for_inference(judge_path, ema=ema)
    if objectives.objective_of(judge.config) != "ar":
        raise ckpt.CheckpointError(
            f"--judge {judge_path}: {judge.path} was trained with objective "
            f"{judge.config.get('objective', 'mdlm')!r}; the judge must be an autoregressive "
            "checkpoint (python -m jif.train --objective ar)."
        )
    context = int(judge.config.get("seq_len", 128))
    same = loaded.tokenizer == judge.tokenizer

    def score(rows: np.ndarray) -> dict:
        if same and rows.shape[1] <= context:
            valid = np.ones(rows.shape, bool)
        else:
            rows, valid = retokenize(rows, loaded.tokenizer, judge.tokenizer, context)
        return {
            **judge_scores(judge, rows, valid, batch_size=batch_size),
            **sample_stats(rows, valid),
        }

    samples = draw_samples(
        loaded, jax.random.key(seed), n=n_samples, batch_size=batch_size, **options
    )
    out = {
        "judge": judge.path,
        "judge_step": judge.step,
        "n_samples": n_samples,
        "sample_length": int(samples.shape[1]),
        "seed": seed,
        **options,
        "tokenization": (
            "same tokenizer: sample tokens scored directly"
            if same
            else "different tokenizers: samples decoded to text and re-encoded with the judge's"
        ),
        **score(samples),
        "texts": [loaded.tokenizer.decode(r[1:].tolist()) for r in samples[:4]],
    }
    if reference is not None:
        out["reference"] = {"n_rows": len(reference), **score(np.asarray(reference))}
    return out
