"""The interference-aware sampler against denoisers whose right answer is known."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import (
    LENGTH,
    MASK,
    MASK_FAKE,
    UNCOND,
    assert_distribution,
    exact_denoise_fn,
    fake_denoise_fn,
    fake_input,
)

from jif.interference import choose_interference
from jif.plans import plan_expected
from jif.sampling import sample

# Two pairs of positions: x1 = x0 + 1 (mod 3), x3 = x2, x0 and x2 independent and uniform,
# so every masked position's marginal is uniform (a choice by confidence cannot favour any
# value) but revealing one of a pair fixes the other. 9 sequences, each 1/9.
PAIR_SEQS = np.array(
    [s for s in itertools.product(range(3), repeat=4) if s[1] == (s[0] + 1) % 3 and s[3] == s[2]],
    np.int32,
)
PAIR_JOINT = np.full(len(PAIR_SEQS), 1 / len(PAIR_SEQS))
PAIR_EMB = np.array([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]], np.float32)  # 9 nats


def pair_logits(tokens):
    """Exact conditionals of the pair joint by enumeration, logits [B, 4, 4] (mask: 50)."""
    seqs = jnp.asarray(PAIR_SEQS)
    consistent = jnp.all((tokens[:, None, :] == MASK) | (tokens[:, None, :] == seqs[None]), -1)
    marginal = jnp.einsum("bs,slv->blv", consistent.astype(jnp.float32), jax.nn.one_hot(seqs, 3))
    logits = jnp.log(marginal / marginal.sum(-1, keepdims=True))
    return jnp.concatenate([logits, jnp.full(logits.shape[:2] + (1,), 50.0)], axis=-1)


def pair_with_probe(tokens):
    return pair_logits(tokens), jnp.broadcast_to(jnp.asarray(PAIR_EMB), tokens.shape + (2,))


PAIR_UNCOND = np.full((6000, 4), MASK, np.int32)


def test_probe_keeps_dependent_positions_apart_and_is_exact():
    # Two steps of two reveals: the probe's interference makes the first step take one
    # position of each pair (independent), the second step's are then determined: exact.
    out = sample(
        pair_with_probe,
        jax.random.key(0),
        PAIR_UNCOND,
        mask_id=MASK,
        steps=2,
        method="interference",
    )
    assert int(out.n_calls) == 2
    assert_distribution(np.asarray(out.tokens), PAIR_JOINT, PAIR_SEQS)
    # Confidence order (ties: the first positions) reveals both of a pair independently, and
    # 2/3 of its samples break x1 = x0 + 1.
    conf = sample(
        pair_logits, jax.random.key(0), PAIR_UNCOND, mask_id=MASK, steps=2, method="confidence"
    )
    got = np.asarray(conf.tokens)
    assert abs(np.mean(got[:, 1] != (got[:, 0] + 1) % 3) - 2 / 3) < 0.03


def test_fixed_token_conditions_the_rest():
    tokens = PAIR_UNCOND.copy()
    tokens[:, 2] = 1  # then x3 = 1; x0, x1 as before
    out = sample(
        pair_with_probe, jax.random.key(1), tokens, mask_id=MASK, steps=3, method="interference"
    )
    got = np.asarray(out.tokens)
    assert (got[:, 2] == 1).all() and (got[:, 3] == 1).all()
    keep = PAIR_SEQS[:, 2] == 1
    assert_distribution(
        got[:, :2], PAIR_JOINT[keep] / PAIR_JOINT[keep].sum(), PAIR_SEQS[keep][:, :2]
    )


@pytest.mark.parametrize("block_length", [None, 1])
def test_without_probe_it_is_confidence(block_length):
    for fn, tokens, mask, steps in (
        (exact_denoise_fn, UNCOND[:3000], MASK, LENGTH),
        (fake_denoise_fn, fake_input(), MASK_FAKE, 12),
    ):
        kw = dict(mask_id=mask, steps=steps, block_length=block_length)
        a = sample(fn, jax.random.key(2), tokens, method="confidence", **kw)
        b = sample(fn, jax.random.key(2), tokens, method="interference", **kw)
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        assert int(a.n_calls) == int(b.n_calls)


def greedy_reference(logp, emb, eligible, n):
    """The greedy choice written plainly, one row at a time."""
    cost = np.maximum(emb @ emb.T, 0.0)
    chosen = []
    for _ in range(n):
        gain = [
            logp[i] - sum(cost[i, j] for j in chosen)
            if eligible[i] and i not in chosen
            else -np.inf
            for i in range(len(logp))
        ]
        if not np.isfinite(max(gain)):
            break
        chosen.append(int(np.argmax(gain)))
    out = np.zeros(len(logp), bool)
    out[chosen] = True
    return out


def test_greedy_choice_against_a_plain_one():
    rng = np.random.default_rng(0)
    batch, length = 16, 10
    masked = rng.random((batch, length)) < 0.7
    plan = plan_expected(jax.random.key(0), jnp.asarray(masked), jnp.zeros(length, jnp.int32), 1, 3)
    step = jnp.zeros(batch, jnp.int32)
    logp = np.log(rng.random((batch, length))).astype(np.float32)
    emb = rng.normal(size=(batch, length, 3)).astype(np.float32)
    got = np.asarray(
        choose_interference(
            plan,
            jnp.asarray(masked),
            step,
            jnp.zeros(length, jnp.int32),
            jnp.asarray(logp),
            jnp.asarray(emb),
        )
    )
    n = np.asarray(plan.counts)[:, 0]
    for b in range(batch):
        np.testing.assert_array_equal(got[b], greedy_reference(logp[b], emb[b], masked[b], n[b]))
    assert (got.sum(1) == n).all()
