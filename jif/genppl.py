"""Generative perplexity: a model's unprompted samples scored by an autoregressive judge.

    python -m jif.eval --checkpoint runs/diffusion --judge runs/ar --samples 64 \
        --method confidence --steps 128
    python -m jif.eval --checkpoint runs/diffusion --judge gpt2-large   # pip install -e ".[judge]"

The samples are drawn the way jif.train's evaluation draws them (rows of BOS + masks, the
sampler of the generator's objective: jif.sampling for diffusion, jif.ar for an AR model),
and the judge scores them by its per-token negative log-likelihood: gen_ppl = exp(total NLL
/ predicted tokens). A low perplexity is easy to get with repetitive text, so the samples'
unigram entropy and their share of repeated 4-grams are reported beside it, with the same
numbers for real text of the generator's data (`reference`) for comparison.

Judges (`open_judge`):
- a jif checkpoint trained with `--objective ar` (a run or step folder): the offline default;
- a Hugging Face causal LM, a hub id or a local folder loaded with `AutoModelForCausalLM`
  (gpt2-large is what MDLM reports). It needs PyTorch: `pip install -e ".[judge]"`. Hub ids
  fail fast offline (jif.hub) with a message naming the local-folder alternative.

Tokenisation: when generator and a jif judge share a tokenizer (jif's defaults) the sample
tokens are scored directly; otherwise each sample goes through text, as MDLM does: it is
decoded with the generator's tokenizer and re-encoded with the judge's (BOS + the text, cut
to the judge's context; for a Hugging Face judge each end-of-text of the sample becomes the
judge's eos), which the output says. Sample statistics are counted in the judge's tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np
import scipy.stats

from jif import ar, hub, interference, objectives
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
    fn = loaded.denoise_fn
    if options.get("method") == "interference":  # its probe, where the run has one
        fn = interference.denoise_fn_for(loaded)[0]
    out = []
    for i in range(0, n, batch_size):
        rows = np.full((min(batch_size, n - i), length), tok.mask_id, np.int32)
        rows[:, 0] = tok.eot_id
        k = jax.random.fold_in(key, i)
        out.append(np.asarray(generate(fn, k, rows, mask_id=tok.mask_id, **options).tokens))
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


def hf_retokenize(rows: np.ndarray, source, judge_tokenizer, length: int):
    """Rows of `source` (jif) tokens -> (rows int32 [N, length] of a Hugging Face tokenizer's
    ids, valid bool): the text of each row after its BOS, story by story (split at source's
    end-of-text), re-encoded behind the judge's BOS with its eos between stories, cut to
    `length` and padded (padding not valid)."""
    bos = judge_tokenizer.bos_token_id
    eos = judge_tokenizer.eos_token_id
    start = bos if bos is not None else eos
    if start is None:
        raise ValueError("the judge's tokenizer has neither a BOS nor an EOS token to start rows")
    sep = eos if eos is not None else start
    out = np.full((len(rows), length), sep, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        row = np.asarray(row)[1:]
        ends = [*np.flatnonzero(row == source.eot_id).tolist(), len(row)]
        ids, at = [start], 0
        for k, end in enumerate(ends):
            text = source.decode(row[at:end].tolist())
            ids += ([sep] if k else []) + judge_tokenizer.encode(text, add_special_tokens=False)
            at = end + 1
        ids = ids[:length]
        out[i, : len(ids)], valid[i, : len(ids)] = ids, True
    return out, valid


@dataclasses.dataclass(frozen=True, kw_only=True)
class Judge:
    """An autoregressive model that scores token rows (`open_judge`)."""

    name: str
    """What it was opened from: a jif step folder, a hub id or a Hugging Face folder."""
    step: int | None
    """Training steps of a jif judge (None for a Hugging Face model)."""
    context: int
    """Longest row it scores."""
    tokenizer: object
    """A jif Tokenizer (jif judge) or a transformers tokenizer (Hugging Face judge)."""
    token_nll: Callable
    """(rows int32 [B, L], valid bool [B, L]) -> -log p(token i | tokens < i), [B, L - 1]."""
    hf: bool = False
    """A Hugging Face causal LM (samples always go through text)."""


def judge_scores(judge: Judge, rows: np.ndarray, valid: np.ndarray, *, batch_size: int) -> dict:
    """The judge's NLL of rows int32 [N, L] at the valid positions 1..L-1: nll (nats per
    predicted token), its 95% interval half-width over rows, gen_ppl = exp(nll)."""
    nats, count = [], []
    for i in range(0, len(rows), batch_size):
        nll = judge.token_nll(rows[i : i + batch_size], valid[i : i + batch_size])
        v = valid[i : i + batch_size, 1:]
        nats.append(np.sum(np.where(v, nll, 0.0), axis=-1))
        count.append(v.sum(axis=-1))
    nll, half = ratio_interval(np.concatenate(nats), np.concatenate(count))
    return {"nll": nll, "nll_ci95_halfwidth": half, "gen_ppl": math.exp(nll)}


def torch_installed() -> bool:
    """Whether PyTorch can be imported (the `judge` extra)."""
    return importlib.util.find_spec("torch") is not None


def open_hf_judge(name: str) -> Judge:
    """A Hugging Face causal LM (hub id or local folder) as a Judge, float32, on a GPU where
    torch sees one; ValueError naming the install or the offline alternative."""
    local = os.path.isdir(name)
    if not torch_installed():
        what = "" if local else " (no such folder: read as a hub id)"
        raise ValueError(
            f"--judge {name}{what}: a Hugging Face causal LM needs PyTorch, which is not "
            'installed: pip install -e ".[judge]" (or judge with a jif run trained with '
            "--objective ar)"
        )
    import torch  # the optional `judge` extra
    import transformers

    why_not = None if local else hub.unavailable()
    try:
        args = dict(local_files_only=local or why_not is not None)
        model = transformers.AutoModelForCausalLM.from_pretrained(name, **args)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **args)
    except Exception as e:
        if local:
            raise ValueError(
                f"--judge {name}: AutoModelForCausalLM cannot load this folder ({e}); it should "
                "hold a causal LM and its tokenizer (model.save_pretrained, tokenizer."
                "save_pretrained)"
            ) from e
        why = f"it is not cached and the hub cannot be used ({why_not})" if why_not else str(e)
        raise ValueError(
            f"--judge {name!r}: no such folder, and as a hub id {why}. Offline, use a local "
            f"folder: where the hub is reachable, save AutoModelForCausalLM.from_pretrained("
            f"{name!r}) and its AutoTokenizer with save_pretrained('path/to/folder'), then "
            "pass --judge path/to/folder"
        ) from e
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.float().to(device).eval()
    cfg = model.config
    context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024)

    def token_nll(rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=device)
        attention = torch.as_tensor(np.asarray(valid), dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        return nll.cpu().numpy()

    return Judge(
        name=name,
        step=None,
        context=int(context),
        tokenizer=tokenizer,
        token_nll=token_nll,
        hf=True,
    )


def _is_hf_model_folder(folder: str) -> bool:
    """A folder whose config.json is a transformers model config (it names a model_type)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def open_judge(name: str, *, ema: bool = True) -> Judge:
    """`--judge`: a jif AR checkpoint (run or step folder), else a Hugging Face causal LM (a
    folder with config.json but no jif checkpoint, or a hub id). CheckpointError /
    ValueError naming the fix for anything else."""
    if os.path.isdir(name) and _is_hf_model_folder(name) and not ckpt.list_checkpoints(name):
        return open_hf_judge(name)
    if not os.path.exists(name) and not name.startswith((".", "/", "~")) and name.count("/") < 2:
        return open_hf_judge(name)  # a hub id ("name" or "owner/name")
    judge = ckpt.load_for_inference(name, ema=ema)  # or its CheckpointError
    if objectives.objective_of(judge.config) != "ar":
        raise ckpt.CheckpointError(
            f"--judge {name}: {judge.path} was trained with objective "
            f"{judge.config.get('objective', 'mdlm')!r}; the judge must be an autoregressive "
            "checkpoint (python -m jif.train --objective ar) or a Hugging Face causal LM."
        )
    mask_id = judge.tokenizer.mask_id
    return Judge(
        name=judge.path,
        step=judge.step,
        context=int(judge.config.get("seq_len", 128)),
        tokenizer=judge.tokenizer,
        token_nll=lambda rows, valid: ar.token_nll(judge.model, rows, mask_id=mask_id),
    )


def score_rows(judge: Judge, rows: np.ndarray, tokenizer, *, batch_size: int = 32) -> dict:
    """Rows int32 [N, L] of `tokenizer`'s ids (BOS first) scored by `judge`: judge_scores and
    sample_stats. Tokens go through text (decode, the judge's encoding) unless the judge has
    the same tokenizer and context enough."""
    if judge.hf:
        rows, valid = hf_retokenize(rows, tokenizer, judge.tokenizer, judge.context)
    elif tokenizer == judge.tokenizer and rows.shape[1] <= judge.context:
        valid = np.ones(rows.shape, bool)
    else:
        rows, valid = retokenize(rows, tokenizer, judge.tokenizer, judge.context)
    return {
        **judge_scores(judge, rows, valid, batch_size=batch_size),
        **sample_stats(rows, valid),
    }


def generative_perplexity(
    loaded,
    judge: str | Judge,
    *,
    n_samples: int,
    seed: int = 0,
    batch_size: int = 32,
    ema: bool = True,
    reference: np.ndarray | None = None,
    **options,
) -> dict:
    """Samples of `loaded` (a jif.checkpoint.LoadedModel) scored by `judge` (a Judge, or what
    `open_judge` opens): gen_ppl, nll, entropy, entropy_pooled, repeated_4grams, the settings,
    how tokens were matched, and the same statistics for `reference` rows of real text (int32
    [N, L] in the generator's tokens) when given. options: the sampler's (see
    draw_samples). CheckpointError / ValueError for a judge that cannot be opened."""
    if not isinstance(judge, Judge):
        judge = open_judge(judge, ema=ema)
    same = not judge.hf and loaded.tokenizer == judge.tokenizer

    def score(rows: np.ndarray) -> dict:
        return score_rows(judge, rows, loaded.tokenizer, batch_size=batch_size)

    samples = draw_samples(
        loaded, jax.random.key(seed), n=n_samples, batch_size=batch_size, **options
    )
    out = {
        "judge": judge.name,
        "judge_step": judge.step,
        "n_samples": n_samples,
        "sample_length": int(samples.shape[1]),
        "seed": seed,
        **options,
        "tokenization": (
            "same tokenizer: sample tokens scored directly"
            if same
            else "retokenised through text, as MDLM does: samples decoded to text and "
            "re-encoded with the judge's tokenizer"
        ),
        **score(samples),
        "texts": [loaded.tokenizer.decode(r[1:].tolist()) for r in samples[:4]],
    }
    if reference is not None:
        out["reference"] = {"n_rows": len(reference), **score(np.asarray(reference))}
    return out
