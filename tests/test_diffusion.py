"""MDLM objective: schedule, sampling of times, SUBS, NELBO against numpy, evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jif import diffusion as D

V, MASK = 11, 10  # tiny vocabulary whose last id is the mask


def fake_logits_fn(record=None):
    """Deterministic 'denoiser': logits depend on the token, its position and the mask rate."""
    table = np.random.default_rng(0).normal(size=(V, V)).astype(np.float32)

    def numpy_logits(xt, rate):
        pos = np.arange(xt.shape[1], dtype=np.float32)[None, :, None]
        return table[xt] + 0.1 * pos * np.cos(np.arange(V, dtype=np.float32)) + rate[:, None, None]

    def logits_fn(xt, rate):
        if record is not None:
            record.append((np.asarray(xt), np.asarray(rate)))
        table_j = jnp.asarray(table)
        pos = jnp.arange(xt.shape[1], dtype=jnp.float32)[None, :, None]
        cosv = jnp.cos(jnp.arange(V, dtype=jnp.float32))
        return table_j[xt] + 0.1 * pos * cosv + rate[:, None, None]

    return logits_fn, numpy_logits


def numpy_nelbo(x0, xt, t, logits, eps=1e-3):
    """MDLM continuous-time NELBO (nats/token) written from the formula, in float64."""
    t = t.astype(np.float64)
    a = 1 - (1 - eps) * t  # alpha_t
    dsigma = (1 - eps) / a  # -alpha'_t / alpha_t
    expm1_sigma = (1 - eps) * t / a  # 1/alpha_t - 1
    weight = dsigma / expm1_sigma
    z = logits.astype(np.float64).copy()
    z[..., MASK] = -np.inf  # SUBS: the mask is never predicted
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    total = 0.0
    B, L = x0.shape
    for b in range(B):
        s = sum(-logp[b, i, x0[b, i]] for i in range(L) if xt[b, i] == MASK)
        total += weight[b] * s / L
    return total / B


def test_loss_matches_numpy():
    x0 = np.random.default_rng(1).integers(0, MASK, size=(4, 12)).astype(np.int32)
    t = np.array([0.1, 0.35, 0.6, 0.95], np.float32)
    record = []
    fn, numpy_logits = fake_logits_fn(record)
    loss, aux = D.mdlm_loss(fn, jnp.asarray(x0), jnp.asarray(t), jax.random.key(3), mask_id=MASK)
    ((xt, rate),) = record
    np.testing.assert_allclose(rate, (1 - 1e-3) * t, rtol=1e-6)
    assert np.all((xt == x0) | (xt == MASK)) and (xt == MASK).any()
    expected = numpy_nelbo(x0, xt, t, numpy_logits(xt, rate))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(aux["bits_per_token"]), expected / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(float(aux["ppl_bound"]), math.exp(expected), rtol=1e-5)
    # buckets [0,.25) [.25,.5) [.5,.75) [.75,1] hold exactly one row each
    per_row = [
        numpy_nelbo(x0[i : i + 1], xt[i : i + 1], t[i : i + 1], numpy_logits(xt, rate)[i : i + 1])
        for i in range(4)
    ]
    buckets = [aux[k] for k in sorted(k for k in aux if k.startswith("loss_t"))]
    np.testing.assert_allclose(np.array(buckets, float), per_row, rtol=1e-5)


def test_weight_is_one_over_t():
    t = jnp.linspace(0.01, 1.0, 50)
    np.testing.assert_allclose(D.nelbo_weight(t), 1 / t, rtol=1e-4)
    np.testing.assert_allclose(D.alpha(jnp.array([0.0, 1.0])), [1.0, 1e-3], rtol=1e-4)


def test_sample_t_low_discrepancy():
    for seed in range(3):
        t = np.sort(np.asarray(D.sample_t(jax.random.key(seed), 16)))
        assert t.min() >= 1e-3 and t.max() <= 1.0
        np.testing.assert_allclose(np.diff(t), (1 - 1e-3) / 16, rtol=1e-4)


def test_q_xt_masks_at_rate():
    x0 = jnp.zeros((4, 4000), jnp.int32)
    rate = jnp.array([0.0, 0.2, 0.7, 1.0])
    xt, masked = D.q_xt(jax.random.key(0), x0, rate, MASK)
    np.testing.assert_array_equal(xt == MASK, masked)
    np.testing.assert_allclose(masked.mean(1), rate, atol=0.03)


def test_subs_properties():
    logits = jax.random.normal(jax.random.key(0), (2, 6, V)) * 3
    xt = jnp.array([[MASK, 1, 2, MASK, 4, MASK], [0, MASK, MASK, 3, 3, 9]])
    logp = D.subs_log_probs(logits, xt, MASK)
    p = np.exp(np.asarray(logp))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert np.all(p[..., MASK] == 0.0)  # mask never predicted
    unmasked = np.asarray(xt != MASK)
    onehot = np.eye(V)[np.asarray(xt)]
    np.testing.assert_array_equal(p[unmasked], onehot[unmasked])  # carry-over
    # masked positions: softmax over the real tokens only
    ref = jax.nn.softmax(logits[..., :MASK], -1)
    np.testing.assert_allclose(p[~unmasked][:, :MASK], np.asarray(ref)[~unmasked], rtol=1e-5)
    # masked_nll is the gather of -subs_log_probs at x0
    x0 = jnp.where(xt == MASK, 7, xt)
    nll = D.masked_nll(logits, x0, xt == MASK, MASK)
    ref_nll = -jnp.take_along_axis(logp, x0[..., None], -1)[..., 0]
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-6)


def test_loss_gradients_finite():
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, MASK, (3, 8)), jnp.int32)
    w = jax.random.normal(jax.random.key(1), (V, V))

    def loss(w):
        return D.mdlm_loss(
            lambda xt, r: w[xt], x0, jnp.array([0.2, 0.5, 0.9]), jax.random.key(0), mask_id=MASK
        )[0]

    g = jax.grad(loss)(w)
    assert np.isfinite(np.asarray(g)).all() and np.abs(g).sum() > 0
    assert np.all(np.asarray(g)[:, MASK] == 0)  # no gradient into the never-predicted logit


def test_uniform_denoiser_known_answer():
    """Zero logits predict uniformly over V-1 real tokens: NELBO = (1 - eps) log(V - 1)."""
    x0 = np.random.default_rng(0).integers(0, MASK, (16, 256)).astype(np.int32)
    zero = lambda xt, r: jnp.zeros((*xt.shape, V))
    res = D.eval_nelbo(zero, x0, mask_id=MASK, n_times=8)
    np.testing.assert_allclose(res["nelbo"], (1 - 1e-3) * math.log(V - 1), rtol=0.02)
    np.testing.assert_allclose(res["masked_ce"], math.log(V - 1), rtol=1e-5)


def test_eval_nelbo_deterministic():
    fn, _ = fake_logits_fn()
    x0 = np.random.default_rng(2).integers(0, MASK, (8, 16)).astype(np.int32)
    batches = [x0[:4], x0[4:]]
    a = D.eval_nelbo(fn, batches, mask_id=MASK, n_times=4, seed=0)
    b = D.eval_nelbo(fn, iter(batches), mask_id=MASK, n_times=4, seed=0)
    c = D.eval_nelbo(fn, batches, mask_id=MASK, n_times=4, seed=1)
    assert a == b
    assert a["nelbo"] != c["nelbo"]
    assert a["n_sequences"] == 8 and math.isfinite(a["nelbo"])
    np.testing.assert_allclose(a["bits_per_token"], a["nelbo"] / math.log(2))
    assert all(
        a[f"loss_t{lo:.2f}-{hi:.2f}"] is not None
        for lo, hi in zip(D.BUCKETS[:-1], D.BUCKETS[1:], strict=True)
    )


def test_eval_nelbo_rejects_empty():
    fn, _ = fake_logits_fn()
    with pytest.raises(ValueError, match="no sequences"):
        D.eval_nelbo(fn, [], mask_id=MASK)


def test_span_scores_match_numpy():
    """Each row's masked tokens scored in one call: -sum of SUBS log-probs, and whether
    every masked token is the argmax. The logits depend on position, on the mask rate passed
    and on the masks seen in xt, so numpy recomputes them."""
    rng = np.random.default_rng(0)
    table, by_rate, by_count = (rng.normal(size=(9, V)).astype(np.float32) for _ in range(3))
    x0 = rng.integers(0, MASK, (5, 9)).astype(np.int32)
    mask = rng.random((5, 9)) < 0.4
    mask[:, 0], mask[1] = True, False  # row 1: nothing masked

    def logits_fn(xt, r):
        count = jnp.sum(xt == MASK, -1)[:, None, None]
        return table + r[:, None, None] * by_rate + 0.1 * count * by_count

    rate, count = mask.mean(-1)[:, None, None], mask.sum(-1)[:, None, None]
    logits = table + rate * by_rate + 0.1 * count * by_count
    x0[0] = np.argmax(logits[0, :, :MASK], -1)  # row 0: every token the most likely one
    nats, exact = D.span_scores(logits_fn, x0, mask, mask_id=MASK, batch_size=2)
    logp = logits - np.log(np.exp(logits[..., :MASK]).sum(-1, keepdims=True))
    truth = np.take_along_axis(logp, x0[..., None], -1)[..., 0]
    np.testing.assert_allclose(nats, -(truth * mask).sum(-1), rtol=1e-5)
    right = (np.argmax(logits[..., :MASK], -1) == x0) | ~mask
    np.testing.assert_array_equal(exact, right.all(-1))
    assert exact[0] and exact[1] and nats[1] == 0 and not exact.all()


def test_span_logprob_chain_rule_matches_numpy():
    """A span's tokens revealed left to right, other masks kept: numpy recomputes each call's
    logits (they depend on the tokens seen, on the mask count and on the rate passed)."""
    rng = np.random.default_rng(1)
    table, by_rate, by_token = (rng.normal(size=(9, V)).astype(np.float32) for _ in range(3))
    x0 = rng.integers(0, MASK, (4, 9)).astype(np.int32)
    mask = rng.random((4, 9)) < 0.5
    span = np.zeros_like(mask)
    span[0, [2, 3, 6]] = span[1, 4] = span[3, [0, 1]] = True  # row 2: empty span
    mask |= span

    def numpy_logits(xt, r):
        seen = np.where(xt == MASK, 0, xt).sum(-1)[:, None, None] % 5  # depends on revealed
        return table + r[:, None, None] * by_rate + 0.1 * seen * by_token

    def logits_fn(xt, r):
        seen = jnp.sum(jnp.where(xt == MASK, 0, xt), -1)[:, None, None] % 5
        return table + r[:, None, None] * by_rate + 0.1 * seen * by_token

    got = D.span_logprob(logits_fn, x0, mask, span, mask_id=MASK, batch_size=3)
    for n in range(4):
        total, hidden = 0.0, mask[n].copy()
        for pos in np.flatnonzero(span[n]):
            xt = np.where(hidden, MASK, x0[n])[None]
            lg = numpy_logits(xt, hidden.mean()[None])[0, pos, :MASK]
            total += lg[x0[n, pos]] - np.log(np.exp(lg).sum())
            hidden[pos] = False
        np.testing.assert_allclose(got[n], total, rtol=1e-5, atol=1e-6)
    assert got[2] == 0.0 and np.all(got[[0, 1, 3]] < 0)
    with pytest.raises(ValueError, match="span"):
        D.span_logprob(logits_fn, x0, np.zeros_like(mask), span, mask_id=MASK)


def test_loss_with_readout_at_masked_rows_only_is_the_same():
    """mdlm_loss reading out masked positions only (masked_rows_nll) equals the full loss,
    value and gradients, whichever branch runs. The readout marks the branch: it adds 0.5 to
    token 0's logit when it gets all B * L rows, so the two branches differ detectably."""
    rng = np.random.default_rng(3)
    B, L, Dm = 4, 16, 6
    emb = jnp.asarray(rng.normal(size=(V, Dm)), jnp.float32)
    x0 = jnp.asarray(rng.integers(0, MASK, (B, L)), jnp.int32)
    t = D.sample_t(jax.random.key(1), B)

    def loss(w, capacity, split, full_bonus):
        features = lambda xt, r: jnp.tanh(emb[xt] + r[:, None, None])
        first = jnp.arange(V) == 0  # a bonus on one token's logit changes the softmax
        readout = lambda h: h @ w + full_bonus * (h.shape[0] == B * L) * first
        if split:
            return D.mdlm_loss(
                features,
                x0,
                t,
                jax.random.key(2),
                mask_id=MASK,
                readout_fn=readout,
                capacity=capacity,
            )[0]
        return D.mdlm_loss(
            lambda xt, r: readout(features(xt, r).reshape(B * L, Dm)).reshape(B, L, V),
            x0,
            t,
            jax.random.key(2),
            mask_id=MASK,
        )[0]

    w = jnp.asarray(rng.normal(size=(Dm, V)), jnp.float32)
    n_masked = int(D.q_xt(jax.random.key(2), x0, D.mask_rate(t), MASK)[1].sum())
    assert 0 < n_masked < B * L
    ref, ref_grad = jax.value_and_grad(loss)(w, None, False, 0.0)
    for capacity, bonus_seen in [(n_masked, False), (B * L - 8, False), (n_masked - 1, True)]:
        f = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
        got, grad = f(w, capacity, True, 0.0)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
        marked = f(w, capacity, True, 0.5)[0]  # the all-rows branch ran iff the loss moved
        assert (abs(float(marked) - float(ref)) > 1e-4) == bonus_seen, capacity
    assert D.readout_capacity(16, 128) == 1224 and D.readout_capacity(1, 128) == 128
