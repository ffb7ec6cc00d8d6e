"""The autoregressive reference (jif.ar): loss, likelihood, left-to-right sampling, training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from penzai import pz

from jif import ar, loop, objectives
from jif import checkpoint as ckpt
from jif import model as M

V, MASK = 64, 63  # a small vocabulary: ids 0..61 text, 62 end of text, 63 mask
EOT = 62


def causal_model(seed=0, vocab=V):
    """A tiny causal DiT with random (non-zero) output and attention weights, frozen."""
    m = M.build_model(M.make_config("tiny", causal=True, vocab_size=vocab), jax.random.key(seed))
    _, params = pz.unbind_params(m)
    for i, p in enumerate(params):
        noise = jax.random.normal(jax.random.key(100 + i), p.value.data_array.shape)
        p.value = p.value + pz.nx.wrap(0.3 * noise).tag(*p.value.named_shape)
    return pz.freeze_params(m)


def rows(b=3, length=12, seed=0):
    x = np.random.default_rng(seed).integers(0, EOT, (b, length)).astype(np.int32)
    x[:, 0] = EOT
    return x


def numpy_nll(logits, x):
    """Independent next-token cross-entropy: log-softmax over all ids but the mask."""
    z = np.asarray(logits, np.float64)[:, :-1].copy()
    z[..., MASK] = -np.inf
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, x[:, 1:, None], -1)[..., 0]


def test_objective_registry_entry():
    entry = objectives.OBJECTIVES["ar"]
    assert entry.loss is ar.loss and entry.model_overrides == {"causal": True}
    assert objectives.objective_of({}) == "mdlm"  # checkpoints from before objectives
    with pytest.raises(ValueError, match="'nope'"):
        objectives.objective_of({"objective": "nope"})


def test_loss_equals_numpy_cross_entropy():
    model, x = causal_model(), rows()
    logits = M.apply_logits(model, jnp.asarray(x), jnp.zeros(3))
    want = numpy_nll(logits, x)
    loss, aux = jax.jit(lambda m, b: ar.loss(m, b, None, mask_id=MASK))(model, jnp.asarray(x))
    np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["bits_per_token"]), want.mean() / math.log(2), rtol=1e-5)
    guess = np.argmax(np.where(np.arange(V) == MASK, -np.inf, np.asarray(logits)[:, :-1]), -1)
    np.testing.assert_allclose(float(aux["accuracy"]), np.mean(guess == x[:, 1:]), atol=1e-6)
    np.testing.assert_allclose(ar.token_nll(model, x, mask_id=MASK), want, rtol=1e-5)
    # the likelihood of fixed batches: nats per window token (the BOS is free), per predicted
    out = ar.eval_nll(model, [x[:2], x[2:]], mask_id=MASK)
    np.testing.assert_allclose(out["nelbo"], want.sum() / x.size, rtol=1e-5)
    np.testing.assert_allclose(out["nll_predicted"], want.mean(), rtol=1e-5)
    assert out["n_sequences"] == 3


def test_loss_at_initialisation_is_uniform():
    """The zero-initialised output layer predicts uniformly over the V - 1 real ids."""
    model = pz.freeze_params(
        M.build_model(M.make_config("tiny", causal=True, vocab_size=V), jax.random.key(0))
    )
    loss, _ = ar.loss(model, jnp.asarray(rows()), None, mask_id=MASK)
    np.testing.assert_allclose(float(loss), math.log(V - 1), rtol=1e-6)


def test_span_scores_are_the_masked_positions_nll():
    model, x = causal_model(), rows()
    mask = np.zeros(x.shape, bool)
    mask[0, 3:5], mask[1, 0], mask[2, 11] = True, True, True  # position 0 is never scored
    nll = numpy_nll(M.apply_logits(model, jnp.asarray(x), jnp.zeros(3)), x)
    nats, exact = ar.span_scores(model, x, mask, mask_id=MASK)
    np.testing.assert_allclose(nats, [nll[0, 2:4].sum(), 0.0, nll[2, 10]], rtol=1e-5)
    assert exact[1]  # nothing to predict
    np.testing.assert_allclose(ar.span_logprob(model, x, mask, mask, mask_id=MASK), -nats)


def test_training_on_a_fixed_batch_overfits():
    """jif.loop's step with objective "ar" on one batch: the next-token loss falls from
    log(V - 1) towards 0 (each row is a fixed random sequence, so it can be memorised)."""
    cfg = M.make_config("tiny", vocab_size=V, **objectives.OBJECTIVES["ar"].model_overrides)
    unbound, params = ckpt.split_params(M.build_model(cfg, jax.random.key(0)))
    tx = optax.adamw(1e-2)
    step = jax.jit(loop.make_train_step(unbound, tx, seed=0, ema=0.9, mask_id=MASK, objective="ar"))
    state = loop.init_state(params, tx)
    batch = jnp.asarray(rows(4, 16))
    losses = []
    for _ in range(200):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - math.log(V - 1)) < 1e-4
    assert np.mean(losses[-10:]) < 0.1 * losses[0], losses[-10:]
    assert float(metrics["accuracy"]) > 0.95


def test_sampler_follows_a_known_causal_model():
    """A fake causal model whose next token is (previous + 1) mod 5 is followed exactly at
    temperature 0; the prompt stays; the trajectory reveals position s + 1 at step s."""

    def fake(tokens):  # logits [B, L, V]: position i puts all mass on (tokens[i] + 1) % 5
        return 10.0 * jax.nn.one_hot((tokens + 1) % 5, V)

    x = np.full((2, 8), MASK, np.int32)
    x[:, 0], x[1, 1] = 2, 0  # row 1 has a prompt token
    out = ar.sample(
        fake, jax.random.key(0), x, mask_id=MASK, temperature=0.0, return_trajectory=True
    )
    np.testing.assert_array_equal(out.tokens[0], [2, 3, 4, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(out.tokens[1], [2, 0, 1, 2, 3, 4, 0, 1])
    assert int(out.n_calls) == 7  # from the first masked position to the end
    reveal = np.asarray(out.trajectory.reveal_step)
    np.testing.assert_array_equal(reveal[0], [-1, 0, 1, 2, 3, 4, 5, 6])
    assert reveal[1, 1] == -1 and out.trajectory.n_steps == 7
    # the chosen token's probability: e^10 against 62 other real ids at 0 (mask excluded)
    want = math.exp(10) / (math.exp(10) + 62)
    np.testing.assert_allclose(np.asarray(out.trajectory.prob)[0, 1:], want, rtol=1e-5)


def test_greedy_sampling_of_an_adaln_model_is_greedy_decoding():
    """With adaLN the noise level changes the logits; the sampler never shows the model a
    mask, so a denoise_fn that reads the mask fraction (jif.model.make_denoise_fn, as
    checkpoints load) decodes like the model at noise level 0, the level it trained at."""
    cfg = M.make_config("tiny", causal=True, adaln=True, vocab_size=V)
    m = M.build_model(cfg, jax.random.key(0))
    _, params = pz.unbind_params(m)
    for i, p in enumerate(params):  # every parameter random, the adaLN ones included
        noise = jax.random.normal(jax.random.key(i), p.value.data_array.shape)
        p.value = p.value + pz.nx.wrap(noise).tag(*p.value.named_shape)
    m = pz.freeze_params(m)
    logits = lambda x, r: np.array(M.apply_logits(m, jnp.asarray(x), jnp.full(2, r)))
    x = np.full((2, 10), MASK, np.int32)
    x[:, 0], x[1, 1] = EOT, 5
    denoise = jax.jit(M.make_denoise_fn(m, mask_id=MASK))
    got = ar.sample(denoise, jax.random.key(0), x, mask_id=MASK, temperature=0.0)
    want = x.copy()
    for i in range(1, 10):  # independent greedy decoding at noise level 0
        z = logits(np.where(want == MASK, 0, want), 0.0)[:, i - 1]
        z[:, MASK] = -np.inf
        want[:, i] = np.where(want[:, i] == MASK, z.argmax(-1), want[:, i])
    np.testing.assert_array_equal(got.tokens, want)
    assert np.abs(logits(want, 0.5) - logits(want, 0.0)).max() > 1e-3  # the level matters


def test_sampler_draws_from_the_model_distribution():
    """At temperature 1 the first generated token follows softmax(logits) (here a fixed
    distribution over 4 ids), and top_p keeps only the most likely ids."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    table = np.full(V, -np.inf)
    table[:4] = np.log(p)

    def fake(tokens):
        return jnp.broadcast_to(jnp.asarray(table, jnp.float32), (*tokens.shape, V))

    x = np.full((4000, 2), MASK, np.int32)
    x[:, 0] = EOT
    drawn = np.asarray(ar.sample(fake, jax.random.key(1), x, mask_id=MASK).tokens[:, 1])
    freq = np.bincount(drawn, minlength=4)[:4] / len(drawn)
    np.testing.assert_allclose(freq, p, atol=0.025)
    top = np.asarray(ar.sample(fake, jax.random.key(1), x, mask_id=MASK, top_p=0.7).tokens[:, 1])
    assert set(np.unique(top)) == {0, 1}


def test_sampler_refuses_bad_input():
    fake = lambda tokens: jnp.zeros((*tokens.shape, V))
    with pytest.raises(ValueError, match="position 0"):
        ar.sample(fake, jax.random.key(0), np.full((1, 4), MASK), mask_id=MASK)
    with pytest.raises(ValueError, match="temperature"):
        ar.sample(fake, jax.random.key(0), rows(1, 4), mask_id=MASK, temperature=-1)


def test_an_ar_run_trains_evaluates_and_samples_left_to_right(tmp_path):
    """One run folder layout for both objectives: jif.train writes it, jif.sample reads it."""
    from test_train import TINY

    from jif import sample, train

    out = str(tmp_path / "ar")
    cfg = train.configure(**TINY, objective="ar", steps=2, eval_every=2, ckpt_every=2, out=out)
    result = train.run(cfg)
    assert np.isfinite(result["val_nelbo"]) and not result["diverged"]
    got = sample.run(sample.SampleConfig(checkpoint=out, num=2, length=16, prompt="Once"))
    assert got["method"] == "left to right" and got["steps"] is None
    assert 0 < got["n_calls"] < 16  # one call per generated position
    assert all(t.startswith("Once") for t in got["texts"])
