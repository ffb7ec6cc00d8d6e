"""The autoregressive reference: the same DiT with a causal mask and a next-token loss.

    python -m jif.train --objective ar                  # ModelConfig.causal=True, this loss
    loss, aux = loss(model, batch, key, mask_id=m)      # jif.objectives.OBJECTIVES["ar"]
    nll = token_nll(model, tokens, mask_id=m)           # [B, L - 1] nats of tokens 1..L-1
    out = eval_nll(model, batches, mask_id=m)           # {"nelbo": NLL per window token, ...}
    result = sample(denoise_fn, key, tokens, mask_id=m, temperature=0.8, top_p=0.9)

Every row starts with the end-of-text token (jif.data's BOS). It is given, never predicted:
the logits at position i predict token i + 1, so a window of L tokens has L - 1 predicted
tokens. The mask token is never predicted (its logit is -inf, as in the diffusion model's
SUBS parameterisation), so both models spread probability over the same tokens.

Units. The training loss is the mean over the L - 1 predicted tokens. Evaluation (`eval_nll`)
reports nats per window token: the window's total NLL divided by L, the BOS costing 0, which
is the denominator of the diffusion NELBO (`jif.diffusion.eval_nelbo` divides by L too, and
its BOS, always the same token, costs nearly 0), so the two are per token of the same
windows. The NLL is exact, so it is also a (tight) bound: it is reported as "nelbo".

Shapes: B batch, L sequence length, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jif import diffusion, draw, live
from jif import model as model_lib
from jif.sampling import SampleResult, Trajectory

# ----------------------------------------------------------------------------- the loss


def next_token_nll(logits: jax.Array, tokens: jax.Array, mask_id: int) -> jax.Array:
    """logits [B, L, V] of a causal model on tokens int32 [B, L] -> -log p(tokens[:, 1:] |
    the tokens before) [B, L - 1], with the mask token excluded from the softmax."""
    logp = jax.nn.log_softmax(diffusion.without_mask_logit(logits[:, :-1], mask_id))
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def _logits(model, tokens: jax.Array) -> jax.Array:
    """The causal DiT's logits [B, L, V]; its noise level (adaLN only) is 0: nothing masked."""
    return model_lib.apply_logits(model, tokens, jnp.zeros(tokens.shape[:1], jnp.float32))


def loss(model, batch: jax.Array, key: jax.Array, *, mask_id: int):
    """Next-token cross-entropy in nats, the mean over the B * (L - 1) predicted tokens (the
    BOS is not predicted), and metrics: loss, bits_per_token, ppl, accuracy (argmax right)."""
    del key  # the loss is deterministic
    logits = _logits(model, batch)
    nll = next_token_nll(logits, batch, mask_id)
    mean = jnp.mean(nll)
    guess = draw.argmax(diffusion.without_mask_logit(logits[:, :-1], mask_id))
    aux = {
        "loss": mean,
        "bits_per_token": mean / math.log(2.0),
        "ppl": jnp.exp(mean),
        "accuracy": jnp.mean(guess == batch[:, 1:]),
    }
    return mean, aux


# ----------------------------------------------------------------------------- likelihood


@functools.partial(jax.jit, static_argnames=("mask_id",))
def _rows(model, tokens, mask_id):
    """(nll [B, L - 1], argmax right [B, L - 1]) for one batch; compiled once per shape."""
    logits = _logits(model, tokens)
    guess = draw.argmax(diffusion.without_mask_logit(logits[:, :-1], mask_id))
    return next_token_nll(logits, tokens, mask_id), guess == tokens[:, 1:]


def token_nll(model, tokens, *, mask_id: int) -> np.ndarray:
    """-log p(token i | tokens < i) of tokens int32 [B, L] at i = 1..L-1, float [B, L - 1]."""
    return np.asarray(_rows(model, jnp.asarray(tokens, jnp.int32), mask_id)[0])


def eval_nll(
    model,
    batches: Iterable[np.ndarray] | np.ndarray,
    *,
    mask_id: int,
    n_times: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The exact NLL of fixed batches int32 [B, L] (an array [N, L] is one batch). Returns
    nelbo (nats per window token: total / (N L), see the module docstring), nll_predicted
    (nats per predicted token: total / (N (L - 1))), bits_per_token, ppl_bound (exp of the
    nelbo), accuracy and n_sequences. n_times and seed are accepted for the same signature
    as the diffusion NELBO and ignored: nothing is sampled."""
    del n_times, seed
    if isinstance(batches, np.ndarray | jax.Array) and np.ndim(batches) == 2:
        batches = [batches]
    total = right = n_seq = n_pred = n_tok = 0
    for batch in batches:
        nll, ok = _rows(model, jnp.asarray(batch, jnp.int32), mask_id)
        total, right = total + float(jnp.sum(nll)), right + int(jnp.sum(ok))
        n_seq, n_pred, n_tok = n_seq + batch.shape[0], n_pred + nll.size, n_tok + batch.size
    if n_seq == 0:
        raise ValueError("eval_nll got no sequences: batches is empty.")
    nelbo = total / n_tok
    return {
        "nelbo": nelbo,
        "nll_predicted": total / n_pred,
        "bits_per_token": nelbo / math.log(2.0),
        "ppl_bound": math.exp(nelbo),
        "accuracy": right / n_pred,
        "n_sequences": n_seq,
    }


def span_scores(model, tokens, mask, *, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The masked tokens of each row predicted from the tokens before them (teacher forcing):
    (nats [N]: their summed NLL, exact [N]: each is the argmax). tokens int32 [N, L], mask
    bool [N, L] (position 0, the BOS, is never scored). The left-context analogue of
    jif.diffusion.span_scores."""
    nll, ok = _rows(model, jnp.asarray(tokens, jnp.int32), mask_id)
    scored = np.asarray(mask)[:, 1:]
    nats = np.sum(np.where(scored, np.asarray(nll), 0.0), axis=-1)
    return nats, np.all(np.asarray(ok) | ~scored, axis=-1)


def span_logprob(model, tokens, mask, span, *, mask_id: int) -> np.ndarray:
    """log p(the tokens in `span` | the tokens before them), [N]; the other masked positions
    of jif.diffusion.span_logprob come after the span in jif.probes, where a causal model
    does not look, so `mask` is not needed."""
    del mask
    return -span_scores(model, tokens, span, mask_id=mask_id)[0]


# ----------------------------------------------------------------------------- sampling


@functools.partial(
    jax.jit,
    static_argnames=("logits_fn", "mask_id", "top_k", "use_top_p", "trajectory", "stream"),
)
def _sample(
    logits_fn,
    key,
    tokens,
    start,
    stream_id,
    *,
    mask_id,
    temperature,
    top_p,
    use_top_p,
    top_k,
    trajectory,
    stream,
):
    batch, length = tokens.shape
    filt = functools.partial(
        draw.filter_logits,
        mask_id=mask_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_top_p=use_top_p,
    )

    def body(i, carry):
        tokens, prob = carry
        # The positions still to come hold id 0, not masks: the causal model cannot see them,
        # and a denoise_fn that reads the mask fraction as noise level (adaLN) sees 0, as in
        # training.
        seen = jnp.where(tokens == mask_id, 0, tokens)
        full = logits_fn(seen)
        if stream:  # position j is predicted by the logits at j - 1; this call predicts i only
            here = jnp.broadcast_to(jnp.arange(length) == i, tokens.shape)
            live.report(stream_id, tokens, jnp.roll(full, 1, axis=1), mask_id, here)
        logits = jax.lax.dynamic_index_in_dim(full, i - 1, axis=1, keepdims=False)
        logits = filt(logits)
        noise = draw.gumbel(jax.random.fold_in(key, i), logits.shape)
        chosen, chosen_logp = draw.gumbel_max(logits, noise, temperature)
        todo = tokens[:, i] == mask_id
        tokens = tokens.at[:, i].set(jnp.where(todo, chosen, tokens[:, i]))
        prob = prob.at[:, i].set(jnp.where(todo, jnp.exp(chosen_logp), prob[:, i]))
        return tokens, prob

    prob = jnp.ones((batch, length), jnp.float32)
    masked = tokens == mask_id
    tokens, prob = jax.lax.fori_loop(start, length, body, (tokens, prob))
    traj = None
    if trajectory:  # step s generates position s + 1
        reveal = jnp.where(masked, jnp.arange(length) - 1, -1).astype(jnp.int32)
        where = jnp.where(reveal >= 0, reveal, length - 1)  # out of range: dropped
        counts = jnp.zeros((batch, length - 1), jnp.int32)
        counts = counts.at[jnp.arange(batch)[:, None], where].add(1, mode="drop")
        traj = Trajectory(reveal, prob, counts)
    return SampleResult(tokens, (length - start) * jnp.ones((), jnp.int32), traj)


def sample(
    denoise_fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    tokens,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    return_trajectory: bool = False,
    stream=None,
) -> SampleResult:
    """Left-to-right sampling from a causal model: each `mask_id` position of tokens int32
    [B, L] is drawn, first to last, from the logits one position before it; other tokens
    stay fixed and are read as context when they come before (a causal model never sees
    text after a position, so a template's later text does not steer it).

    denoise_fn: tokens int32 [B, L] -> logits [B, L, V] of a causal model (for example
    jif.checkpoint.load_for_inference(ar_run).denoise_fn); it is never shown a mask. Tokens are drawn the way
    jif.sampling draws them (jif.draw: temperature, top-k, top-p, Gumbel-max; temperature 0
    is argmax). One network call per position from the first mask to the end (no key/value
    cache: each call runs the whole window). Returns jif.sampling.SampleResult(tokens,
    n_calls, trajectory): with return_trajectory, step s reveals position s + 1 (a
    jif.sampling.Trajectory of L - 1 steps, which the app replays). stream: as
    jif.sampling.sample's, called at every network call (`jif.live`)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}.")
    masked = np.asarray(tokens == mask_id)
    if masked[:, 0].any():
        raise ValueError(
            "position 0 is a mask: a left-to-right model needs a first token to start from "
            "(jif.data's rows start with the end-of-text token)."
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is argmax).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 keeps every token).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token).")
    start = int(np.argmax(masked.any(axis=0))) if masked.any() else tokens.shape[1]
    with live.registered(stream) as sid:
        out = _sample(
            denoise_fn,
            key,
            tokens,
            start,
            jnp.int32(sid),
            mask_id=int(mask_id),
            temperature=jnp.float32(temperature),
            top_p=jnp.float32(top_p),
            use_top_p=bool(top_p < 1.0),
            top_k=int(top_k),
            trajectory=bool(return_trajectory),
            stream=stream is not None,
        )
        return out if stream is None else jax.block_until_ready(out)
