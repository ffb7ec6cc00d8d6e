"""MDLM objective: masked diffusion with a log-linear schedule and the SUBS parameterisation.

Sahoo et al. 2024 ("Simple and Effective Masked Diffusion Language Models"). A clean
sequence x0 is corrupted by masking each token independently with probability
1 - alpha_t; the denoiser predicts x0 at the masked positions. The continuous-time NELBO is

    NELBO = E_t E_{x_t ~ q(.|x0)} [ -alpha'_t / (1 - alpha_t) * sum_{l masked} -log p(x0_l | x_t) ]

reported per token (divided by the sequence length L), in nats. With the log-linear schedule
alpha_t = 1 - (1 - eps) t (MDLM's LogLinearNoise: sigma_t = -log(1 - (1 - eps) t)), the weight
-alpha'_t / (1 - alpha_t) = dsigma / expm1(sigma) equals 1 / t.

Shapes: B batch, L sequence length, V vocabulary. Times t are float32 [B] in (0, 1].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-3  # MDLM's LogLinearNoise eps: alpha_1 = eps, so x_1 is almost but not fully masked
SAMPLING_EPS = 1e-3  # MDLM's sampling_eps: training times are drawn from [1e-3, 1]
BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)  # noise-level (t) buckets for the loss breakdown

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (xt [B,L] int32, mask_rate [B]) -> [B,L,V]


# ----------------------------------------------------------------------------- schedule


def alpha(t: jax.Array, eps: float = EPS) -> jax.Array:
    """Probability that a token is still clean at time t: [B] -> [B]."""
    return 1.0 - (1.0 - eps) * t


def mask_rate(t: jax.Array, eps: float = EPS) -> jax.Array:
    """1 - alpha_t, the probability that a token is masked at time t: [B] -> [B]."""
    return (1.0 - eps) * t


def nelbo_weight(t: jax.Array, eps: float = EPS) -> jax.Array:
    """-alpha'_t / (1 - alpha_t) = dsigma_t / expm1(sigma_t), written like MDLM: [B] -> [B]."""
    sigma = -jnp.log1p(-(1.0 - eps) * t)
    dsigma = (1.0 - eps) / (1.0 - (1.0 - eps) * t)
    return dsigma / jnp.expm1(sigma)


def sample_t(key: jax.Array, batch_size: int, sampling_eps: float = SAMPLING_EPS) -> jax.Array:
    """Low-discrepancy times [B]: an evenly spaced grid shifted by ONE uniform offset, mod 1,
    mapped into [sampling_eps, 1]."""
    u = jax.random.uniform(key, ())
    grid = (u + jnp.arange(batch_size) / batch_size) % 1.0
    return sampling_eps + (1.0 - sampling_eps) * grid


# ----------------------------------------------------------------------------- forward process


def q_xt(key: jax.Array, x0: jax.Array, rate: jax.Array, mask_id: int):
    """Masks each token of x0 [B, L] independently with probability rate [B].

    Returns (xt int32 [B, L], masked bool [B, L]).
    """
    masked = jax.random.uniform(key, x0.shape) < rate[:, None]
    return jnp.where(masked, mask_id, x0).astype(x0.dtype), masked


# ----------------------------------------------------------------------------- SUBS


def without_mask_logit(logits: jax.Array, mask_id: int) -> jax.Array:
    """float32 logits with the mask token's at -inf: SUBS never predicts the mask."""
    is_mask_col = jnp.arange(logits.shape[-1]) == mask_id
    return jnp.where(is_mask_col, -jnp.inf, logits.astype(jnp.float32))


def subs_log_probs(logits: jax.Array, xt: jax.Array, mask_id: int) -> jax.Array:
    """SUBS parameterisation: logits [B, L, V], xt [B, L] -> log p(x0 | xt) [B, L, V].

    The mask token is never predicted (log-prob -inf); unmasked positions carry over their
    token (log-prob 0 on xt, -inf elsewhere); masked positions get a softmax over real tokens.
    """
    logp = jax.nn.log_softmax(without_mask_logit(logits, mask_id))
    carry = jnp.where(jnp.arange(logits.shape[-1]) == xt[..., None], 0.0, -jnp.inf)
    return jnp.where((xt == mask_id)[..., None], logp, carry)


def masked_nll(logits: jax.Array, x0: jax.Array, masked: jax.Array, mask_id: int) -> jax.Array:
    """-log p_SUBS(x0 | xt) per position [B, L]: 0 where unmasked (SUBS carries them over).

    Equals -take(subs_log_probs(logits, xt), x0) but gathers before building [B, L, V] masks.
    """
    logp = jax.nn.log_softmax(without_mask_logit(logits, mask_id))
    nll = -jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]
    return jnp.where(masked, nll, 0.0)


def masked_rows_nll(
    features_fn: Callable[[jax.Array, jax.Array], jax.Array],
    readout_fn: Callable[[jax.Array], jax.Array],
    xt: jax.Array,
    rate: jax.Array,
    x0: jax.Array,
    masked: jax.Array,
    mask_id: int,
    capacity: int,
) -> jax.Array:
    """masked_nll(logits, x0, masked) [B, L] with logits computed only where they count.

    features_fn(xt, rate) -> [B, L, D] is the network up to its readout; readout_fn [N, D] ->
    logits [N, V] maps each position on its own. The loss needs logits at masked positions
    only, so the readout runs on `capacity` of the B * L positions, masked ones first; when
    more than `capacity` are masked it runs on all of them (`lax.cond`: one branch runs), so
    the result is exact either way.
    """
    h = features_fn(xt, rate)
    n = masked.size
    flat_h, flat_x0, flat_m = h.reshape(n, h.shape[-1]), x0.reshape(n), masked.reshape(n)

    def some():
        rows = jnp.argsort(~flat_m, stable=True)[:capacity]  # masked first; all distinct
        nll = masked_nll(readout_fn(flat_h[rows]), flat_x0[rows], flat_m[rows], mask_id)
        return jnp.zeros(n, nll.dtype).at[rows].set(nll)

    @jax.checkpoint  # its residuals would be [B * L, V] buffers that the common branch fills
    def every():
        return masked_nll(readout_fn(flat_h), flat_x0, flat_m, mask_id)

    if capacity >= n:
        return every().reshape(masked.shape)
    fits = all_runs(jnp.sum(flat_m) <= capacity)
    return jax.lax.cond(fits, some, every).reshape(masked.shape)


@jax.custom_batching.custom_vmap
def all_runs(pred: jax.Array) -> jax.Array:
    """`pred` (a bool scalar); under jax.vmap, one unbatched bool: whether it holds for every
    run. A batched predicate would turn masked_rows_nll's lax.cond into a select that runs
    both branches (the all-rows readout in every step); with this one the batch takes the
    exact all-rows branch only when some run needs it."""
    return pred


@all_runs.def_vmap
def _all_runs_vmap(axis_size, in_batched, pred):
    (batched,) = in_batched
    return (jnp.all(pred) if batched else pred), False


def readout_capacity(batch_size: int, seq_len: int, sigmas: float = 6.0) -> int:
    """Positions the training loss reads out per batch (see masked_rows_nll): the number
    masked when times come from `sample_t` is at most seq_len * (batch_size + 1) / 2 on
    average (the grid's mean mask rate is within 1 / (2 batch_size) of 1/2), plus `sigmas`
    standard deviations of the Bernoulli draws (variance below n / 4), rounded up to 8."""
    n = batch_size * seq_len
    mean = seq_len * (batch_size + 1) / 2
    return min(n, 8 * math.ceil((mean + sigmas * math.sqrt(n / 4)) / 8))


# ----------------------------------------------------------------------------- loss


def bucket_means(values: jax.Array, t: jax.Array, edges=BUCKETS) -> dict[str, jax.Array]:
    """Mean of values [B] over the rows whose t [B] falls in each bucket (NaN if none)."""
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (t >= lo) & ((t < hi) | (hi == edges[-1]))
        n = jnp.sum(inside)
        out[f"loss_t{lo:.2f}-{hi:.2f}"] = jnp.where(
            n > 0, jnp.sum(jnp.where(inside, values, 0.0)) / jnp.maximum(n, 1), jnp.nan
        )
    return out


def nelbo_terms(
    logits_fn: LogitsFn,
    x0: jax.Array,
    t: jax.Array,
    key: jax.Array,
    mask_id: int,
    readout_fn: Callable[[jax.Array], jax.Array] | None = None,
    capacity: int | None = None,
):
    """Per-sequence NELBO estimates in nats/token [B] and the mask [B, L] they used.

    With readout_fn, logits_fn returns features and only masked positions are read out
    (masked_rows_nll, `capacity` positions; default: readout_capacity)."""
    rate = mask_rate(t)
    xt, masked = q_xt(key, x0, rate, mask_id)
    if readout_fn is None:
        nll = masked_nll(logits_fn(xt, rate), x0, masked, mask_id)
    else:
        capacity = capacity if capacity is not None else readout_capacity(*x0.shape)
        nll = masked_rows_nll(logits_fn, readout_fn, xt, rate, x0, masked, mask_id, capacity)
    return nelbo_weight(t) * jnp.mean(nll, axis=-1), masked, nll


def mdlm_loss(
    logits_fn: LogitsFn,
    x0: jax.Array,
    t: jax.Array,
    key: jax.Array,
    *,
    mask_id: int,
    readout_fn: Callable[[jax.Array], jax.Array] | None = None,
    capacity: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MDLM NELBO in nats/token (scalar) for x0 int32 [B, L] at times t [B], and metrics.

    readout_fn: logits_fn then gives the network's features [B, L, D] and readout_fn maps
    [N, D] -> logits [N, V]; the loss is the same, with logits computed at masked positions
    only (see masked_rows_nll). Metrics: loss, bits_per_token, ppl_bound (exp of the NELBO
    per token), masked_ce (plain cross-entropy on masked tokens), mask_frac, and
    loss_t{lo}-{hi} per noise-level bucket.
    """
    per_seq, masked, nll = nelbo_terms(logits_fn, x0, t, key, mask_id, readout_fn, capacity)
    loss = jnp.mean(per_seq)
    n_masked = jnp.sum(masked)
    aux = {
        "loss": loss,
        "bits_per_token": loss / math.log(2.0),
        "ppl_bound": jnp.exp(loss),
        "masked_ce": jnp.sum(nll) / jnp.maximum(n_masked, 1),
        "mask_frac": n_masked / masked.size,
        **bucket_means(per_seq, t),
    }
    return loss, aux


# ----------------------------------------------------------------------------- evaluation


def eval_times(n_times: int) -> np.ndarray:
    """Fixed midpoint grid of n_times times in (0, 1) (midpoint rule for the t-integral)."""
    return (np.arange(n_times, dtype=np.float32) + 0.5) / n_times


@functools.partial(jax.jit, static_argnames=("logits_fn", "mask_id"))
def _nelbo_sums(logits_fn, model, x0, t, key, mask_id):
    """(sum of per-sequence NELBOs, masked NLL sum, masked count) of one batch at times t."""
    per_seq, masked, nll = nelbo_terms(lambda xt, r: logits_fn(model, xt, r), x0, t, key, mask_id)
    return jnp.sum(per_seq), jnp.sum(nll), jnp.sum(masked)


def eval_nelbo(
    logits_fn: LogitsFn,
    x0_batches: Iterable[np.ndarray] | np.ndarray,
    *,
    mask_id: int,
    n_times: int = 8,
    seed: int = 0,
    model=None,
) -> dict[str, float]:
    """Validation NELBO with a fixed time grid and fixed masks: same weights -> same number.

    x0_batches: an int32 array [N, L] (one batch) or an iterable of [B, L] batches. Every
    sequence is evaluated at each of the n_times midpoint times, with masks drawn from keys
    fixed by (seed, batch index, time index). Returns nelbo (nats/token), bits_per_token,
    ppl_bound, masked_ce, n_sequences, and loss_t{lo}-{hi} per noise-level bucket.

    With `model` given, logits_fn is called as logits_fn(model, xt, rate): a module-level
    logits_fn (e.g. jif.model.apply_logits) then compiles once for every model of one shape.
    """
    if isinstance(x0_batches, np.ndarray | jax.Array) and np.ndim(x0_batches) == 2:
        x0_batches = [x0_batches]
    if n_times < 1:
        raise ValueError(f"n_times={n_times} must be >= 1.")
    if model is None:
        logits_fn = (lambda fn: lambda _, xt, r: fn(xt, r))(logits_fn)
    terms = lambda x0, t, key: _nelbo_sums(logits_fn, model, x0, t, key, mask_id)

    times = eval_times(n_times)
    per_time = np.zeros(n_times)
    total_nll, total_masked, n_seq = 0.0, 0, 0
    base = jax.random.key(seed)
    for b, x0 in enumerate(x0_batches):
        x0 = jnp.asarray(x0, jnp.int32)
        for k, tk in enumerate(times):
            key = jax.random.fold_in(jax.random.fold_in(base, b), k)
            s, nll, m = terms(x0, jnp.full((x0.shape[0],), tk, jnp.float32), key)
            per_time[k] += float(s)
            total_nll, total_masked = total_nll + float(nll), total_masked + int(m)
        n_seq += x0.shape[0]
    if n_seq == 0:
        raise ValueError("eval_nelbo got no sequences: x0_batches is empty.")
    per_time /= n_seq
    nelbo = float(np.mean(per_time))
    out = {
        "nelbo": nelbo,
        "bits_per_token": nelbo / math.log(2.0),
        "ppl_bound": math.exp(nelbo),
        "masked_ce": total_nll / max(total_masked, 1),
        "n_sequences": n_seq,
    }
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:], strict=True):
        inside = (times >= lo) & (times < hi)
        out[f"loss_t{lo:.2f}-{hi:.2f}"] = float(per_time[inside].mean()) if inside.any() else None
    return out


def span_scores(
    logits_fn: LogitsFn, x0: np.ndarray, mask: np.ndarray, *, mask_id: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's masked tokens, predicted from the rest of the row in one network call.

    x0 int32 [N, L], mask bool [N, L]. Returns (nats [N]: -sum of the masked tokens' SUBS
    log-probabilities, exact [N]: every masked token is the model's most likely one).
    The network sees the row's mask rate (mask.mean(-1)) as its noise level.
    """

    @jax.jit
    def score(x0, mask):
        xt = jnp.where(mask, mask_id, x0)
        logits = logits_fn(xt, jnp.mean(mask, axis=-1, dtype=jnp.float32))
        nll = masked_nll(logits, x0, mask, mask_id)
        guess = jnp.argmax(without_mask_logit(logits, mask_id), -1)
        return jnp.sum(nll, -1), jnp.all((guess == x0) | ~mask, -1)

    nats, exact = [], []
    for i in range(0, len(x0), batch_size):
        n, e = score(
            jnp.asarray(x0[i : i + batch_size], jnp.int32), jnp.asarray(mask[i : i + batch_size])
        )
        nats.append(np.asarray(n))
        exact.append(np.asarray(e))
    return np.concatenate(nats), np.concatenate(exact)


def span_logprob(
    logits_fn: LogitsFn,
    x0: np.ndarray,
    mask: np.ndarray,
    span: np.ndarray,
    *,
    mask_id: int,
    batch_size: int = 64,
) -> np.ndarray:
    """log p(x0's tokens in `span`) with every `mask` position masked, by the chain rule.

    x0 int32 [N, L]; mask, span bool [N, L] with span inside mask. The span's tokens are
    revealed left to right, one network call each (the longest span sets the number of
    calls); the other masked positions stay masked. The network sees the current mask rate.
    Returns log-probabilities [N] (0 for a row with an empty span).
    """
    if np.any(span & ~mask):
        raise ValueError("span_logprob: every span position must also be masked.")
    order = np.cumsum(span, axis=-1) * span  # 1, 2, ... along each row's span; 0 elsewhere
    n_calls = int(order.max(initial=0))

    @jax.jit
    def step(x0, mask, order, j):
        hidden = mask & ~((order > 0) & (order <= j))  # span tokens before the j+1-th revealed
        xt = jnp.where(hidden, mask_id, x0)
        logits = logits_fn(xt, jnp.mean(hidden, axis=-1, dtype=jnp.float32))
        nll = masked_nll(logits, x0, order == j + 1, mask_id)
        return -jnp.sum(nll, -1)

    out = []
    for i in range(0, len(x0), batch_size):
        rows = [jnp.asarray(a[i : i + batch_size]) for a in (x0.astype(np.int32), mask, order)]
        out.append(sum(np.asarray(step(*rows, j)) for j in range(n_calls)))
    return np.concatenate(out) if out else np.zeros(0)
