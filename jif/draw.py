"""Drawing tokens from logits: filtering, Gumbel noise from a counter-based stream, Gumbel-max,
and the scores that rank masked positions (which ones a confidence-ordered step reveals).

`jif.sampling` draws every token as argmax(filtered logits + Gumbel noise). The noise of a
position comes from its own seed (`noise_bits`), so it is the same whenever it is computed:
the samplers that call the network at every step and those that reuse logits draw identical
tokens without storing [B, L, V] noise. Everything here is pure and jit-friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(
    logits: jax.Array,
    *,
    mask_id: int,
    temperature: float | jax.Array,
    top_k: int,
    top_p: float | jax.Array,
    use_top_p: bool | None = None,
) -> jax.Array:
    """Log-probabilities up to a constant, [B, L, V] float32; mask and filtered tokens at -inf.

    The maximum is subtracted before dividing by the temperature, so the logits that can win
    keep their full float32 precision at any temperature. temperature=0 leaves them unscaled
    (the caller takes the argmax). temperature and top_p may be traced; top_k and use_top_p
    (whether to apply top_p at all; default: top_p < 1) are static.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if mask_id < vocab:
        logits = jnp.where(jnp.arange(vocab) == mask_id, -jnp.inf, logits)
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    logits = jnp.where(
        temperature > 0, logits / jnp.where(temperature > 0, temperature, 1.0), logits
    )
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p is None:
        use_top_p = top_p < 1.0
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _fmix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 that mixes every bit into every bit."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def noise_bits(seed: jax.Array, vocab: int, counter: jax.Array | int = 0) -> jax.Array:
    """Random uint32 [..., vocab] from per-position seeds uint32 [...] (threefry draws).

    A counter-based stream (SplitMix-style: a Weyl sequence over the vocabulary through two
    bijective mixes), so the noise of any subset of positions is computed on the spot, the
    same whenever it is computed: "ddpm" and "ddpm_cache" draw identical tokens without
    storing [B, L, V] noise, and `counter` gives fresh noise per call where needed.
    """
    v = jnp.arange(vocab, dtype=jnp.uint32)
    x = _fmix32(seed[..., None] + v * jnp.uint32(0x9E3779B9))
    salt = jnp.asarray(counter).astype(jnp.uint32) * jnp.uint32(0x632BE5AB) + jnp.uint32(1)
    return _fmix32(x ^ salt)


def gumbel_from_bits(bits: jax.Array) -> jax.Array:
    """Standard Gumbel noise from uniform uint32 bits, float32 with a faithful upper tail.

    G = -log(E), E = -log1p(-v) ~ Exponential(1). v is built from all 32 bits so that it is
    fine-grained near 0, where E is small and G large: the largest G is about 22.9
    (probability of exceeding it 1e-10), where the usual -log(-log(u)) with a 23-bit u stops
    at about 16.
    """
    v = (bits.astype(jnp.float32) + 0.5) * 2.0**-32  # in (0, 1]
    v = jnp.minimum(v, 1.0 - 2.0**-24)  # largest float32 below 1: E stays finite
    return -jnp.log(-jnp.log1p(-v))


def gumbel(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard Gumbel noise [shape], float32 (see gumbel_from_bits)."""
    return gumbel_from_bits(jax.random.bits(key, shape, jnp.uint32))


def argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis, int32 [...] (first index on ties). Two vectorised max
    reductions: XLA's CPU argmax (a (value, index) reduction) is several times slower."""
    m = jnp.max(x, axis=-1, keepdims=True)
    neg_iota = -jnp.arange(x.shape[-1], dtype=jnp.float32)
    return (-jnp.max(jnp.where(x == m, neg_iota, -jnp.inf), axis=-1)).astype(jnp.int32)


def gumbel_max(logits: jax.Array, noise: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """Gumbel-max over filtered logits [..., V] with noise [..., V] (argmax at temperature 0).

    Returns (chosen int32 [...], log-probability of the chosen token under softmax(logits)).
    """
    chosen = argmax(jnp.where(temperature > 0, logits + noise, logits))
    picked = jnp.take_along_axis(logits, chosen[..., None], axis=-1)[..., 0]
    return chosen, picked - jax.nn.logsumexp(logits, axis=-1)


# ----------------------------------------------------------------------------- position scores


def score_confidence(logits, chosen_logp, rand) -> jax.Array:
    """Probability of the sampled token, [B, L]."""
    return jnp.exp(chosen_logp)


def score_margin(logits, chosen_logp, rand) -> jax.Array:
    """Top-1 minus top-2 probability, [B, L], from logits [B, L, V] (any offset): three
    vectorised reductions (lax.top_k and a full softmax are slow on CPU)."""
    top1 = jnp.max(logits, axis=-1, keepdims=True)
    z = jnp.sum(jnp.exp(logits - top1), axis=-1)
    second = jnp.max(jnp.where(logits == top1, -jnp.inf, logits), axis=-1)
    second = jnp.where(jnp.sum(logits == top1, axis=-1) > 1, top1[..., 0], second)
    return (1.0 - jnp.exp(second - top1[..., 0])) / z


def score_entropy(logits, chosen_logp, rand) -> jax.Array:
    """Negative entropy sum_v p log p (lowest entropy first), [B, L], from logits [B, L, V]:
    with e = exp(l - max), Z = sum e, it is sum(e (l - max)) / Z - log Z."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(shifted)
    z = jnp.sum(e, axis=-1)
    return jnp.sum(jnp.where(e > 0, e * shifted, 0.0), axis=-1) / z - jnp.log(z)


def score_random(logits, chosen_logp, rand) -> jax.Array:
    """Uniform random order, [B, L]."""
    return rand
