"""Self-conditioning (`--self-condition`): the second pass reads the first pass's prediction,
starts as a no-op, trains, keeps cached samplers exact, and goes through the whole CLI."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import penzai.pz as pz
import pytest
from test_bench import _dot_flops  # same folder: pytest puts it on sys.path
from test_train import TINY

from jif import checkpoint, data, flops, loop, optim, sampling, tokenizer, train
from jif import eval as eval_lib
from jif import model as model_lib
from jif import sample as sample_cli

V, L, B = 300, 16, 2


def build(seed=0, **overrides):
    config = model_lib.make_config("tiny", vocab_size=V, self_condition=True, **overrides)
    return model_lib.build_model(config, jax.random.key(seed))


def with_projection(model, seed=1):
    """The model with random (non-zero) self-conditioning projection and unembedding (both
    start at zero; jitted with the model as constants, XLA:CPU 0.10.2 reduces the logits of
    an all-zero unembedding to garbage, so no test relies on one)."""
    unbound, params = checkpoint.split_params(model)
    for i, label in enumerate(("dit/self_cond", "dit/out/unembed")):
        w = params[label]
        new = jax.random.normal(jax.random.key(seed + i), w.data_array.shape, w.dtype) * 0.05
        params = {**params, label: pz.nx.wrap(new).tag(*w.named_shape)}
    return checkpoint.bind_params(unbound, params)


def tokens_and_rate(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, V - 1)
    tokens = tokens.at[:, ::3].set(V - 1)  # some masks
    return tokens, jnp.mean(tokens == V - 1, axis=1, dtype=jnp.float32)


def test_zero_initialised_projection_makes_both_passes_equal():
    model = build()
    tokens, rate = tokens_and_rate()
    two = model_lib.apply_logits(model, tokens, rate)
    one = model_lib.apply_features(model, tokens, rate, self_condition=False)
    one = model_lib.apply_readout(model, one.reshape(-1, one.shape[-1])).reshape(two.shape)
    np.testing.assert_array_equal(np.asarray(two), np.asarray(one))


def test_second_pass_reads_the_first_pass_prediction():
    model = with_projection(build())
    tokens, rate = tokens_and_rate()
    features = lambda use: model_lib.apply_features(model, tokens, rate, use)
    two, one = features(True), features(False)
    assert float(jnp.max(jnp.abs(two - one))) > 1e-3, "the second pass changes the output"
    # A traced flag (training's coin) takes the same branches as the Python bools.
    traced = jax.jit(lambda use: model_lib.apply_features(model, tokens, rate, use))
    np.testing.assert_allclose(traced(jnp.array(True)), two, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traced(jnp.array(False)), one, rtol=1e-5, atol=1e-6)
    # Without the projection the same weights give the first pass exactly.
    plain = pz.select(model).at(lambda m: m.self_cond).set(None)
    again = model_lib.apply_features(plain, tokens, rate)
    np.testing.assert_allclose(again, one, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_the_projection_only_through_the_second_pass():
    unbound, params = checkpoint.split_params(build())
    tokens, rate = tokens_and_rate()
    names = {k: tuple(v.named_shape) for k, v in params.items()}
    fill = {"dit/self_cond": 0.05, "dit/out/unembed": 0.01}  # non-zero, so gradients flow
    params = {k: pz.nx.wrap(jnp.full(v.data_array.shape, fill[k])).tag(*names[k]) if k in fill
              else v for k, v in params.items()}  # fmt: skip

    def loss(a, use):
        w = pz.nx.wrap(a).tag(*names["dit/self_cond"])
        m = checkpoint.bind_params(unbound, {**params, "dit/self_cond": w})
        h = model_lib.apply_features(m, tokens, rate, use)
        return jnp.sum(model_lib.apply_readout(m, h.reshape(-1, h.shape[-1])) ** 2)

    a = params["dit/self_cond"].data_array
    g_on, g_off = jax.grad(lambda a: loss(a, True))(a), jax.grad(lambda a: loss(a, False))(a)
    assert float(jnp.abs(g_on).max()) > 0 and float(jnp.abs(g_off).max()) == 0


def test_training_overfits_one_batch_and_trains_the_projection():
    """The training step of jif.loop on one batch, with four fixed noise draws (the step
    counter cycles 0-3), so the loss can only fall by learning."""
    cfg = train.configure(**TINY, self_condition=True, steps=40, lr=3e-3, warmup=0)
    tok = tokenizer.load_tokenizer(cfg.n_bpe)
    model_config = train.resolve_model_config(cfg, tok.vocab_size)
    assert model_config.self_condition
    unbound, params = checkpoint.init_model(model_config, 0)
    opt = dataclasses.replace(cfg.optim, schedule="constant")
    tx, _ = optim.make_optimizer(opt, 40, model_config, params)
    step = jax.jit(loop.make_train_step(unbound, tx, seed=0, ema=0.9, mask_id=tok.mask_id))
    batch = next(data.TokenBatches("stories", tok, split="train", batch_size=4, seq_len=32))
    state, losses = loop.init_state(params, tx), []
    for i in range(40):
        state, metrics = step({**state, "step": jnp.asarray(i % 4, jnp.int32)}, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses[::8]
    trained = state["params"]["dit/self_cond"].data_array
    assert float(jnp.abs(trained).max()) > 0, "the projection learnt from the second pass"


def test_cached_sampler_stays_exact():
    model = with_projection(build())
    denoise = model_lib.make_denoise_fn(model, mask_id=V - 1)
    tokens = np.full((B, L), V - 1, np.int32)
    tokens[:, 0] = 5
    run = lambda m: sampling.sample(
        denoise, jax.random.key(4), tokens, mask_id=V - 1, steps=8, method=m
    )
    np.testing.assert_array_equal(run("ddpm").tokens, run("ddpm_cache").tokens)


def test_flops_count_both_passes():
    model = with_projection(build())
    tokens, rate = tokens_and_rate()
    jaxpr = jax.make_jaxpr(lambda t, r: model_lib.apply_logits(model, t, r))(tokens, rate).jaxpr
    assert flops.flops_per_token(model.config, L) * B * L == _dot_flops(jaxpr)


def test_cli_trains_samples_and_evaluates_a_self_conditioned_run(tmp_path, capsys):
    out = tmp_path / "sc"
    train.main(
        ["--preset", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "32"]
        + ["--self-condition", "--out", str(out), "--eval-every", "0", "--no-progress"]
    )
    assert "self-conditioned" in capsys.readouterr().out
    loaded = checkpoint.load_for_inference(str(out))
    assert loaded.model_config.self_condition and loaded.model.self_cond is not None
    tokens = np.full((2, 32), loaded.tokenizer.mask_id, np.int32)
    tokens[:, 0] = loaded.tokenizer.eot_id
    got = sampling.sample(
        loaded.denoise_fn, jax.random.key(0), tokens, mask_id=loaded.tokenizer.mask_id,
        steps=4, method="confidence",
    )  # fmt: skip
    assert not (np.asarray(got.tokens) == loaded.tokenizer.mask_id).any()
    # jif.sample and jif.eval take the mode; a model without self-conditioning refuses it.
    flags = ["--checkpoint", str(out), "--num", "2", "--steps", "8", "--method", "ddpm"]
    got = sample_cli.main(flags + ["--self-condition", "previous", "--json"])
    assert len(got["texts"]) == 2
    capsys.readouterr()
    plain = tmp_path / "plain"
    train.main(["--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "32"]
               + ["--out", str(plain), "--eval-every", "0", "--no-progress"])  # fmt: skip
    with pytest.raises(SystemExit):
        sample_cli.main(["--checkpoint", str(plain), "--self-condition", "previous"])
    assert "trained without --self-condition" in capsys.readouterr().err
    cfg = eval_lib.MeasureConfig(checkpoint=str(plain), self_condition="previous")
    with pytest.raises(ValueError, match="trained without --self-condition"):
        eval_lib.measure(cfg)
    with pytest.raises(ValueError, match="'previous' with --method='ddpm_cache'"):
        dataclasses.replace(cfg, judge="x", method="ddpm_cache").validate()
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--steps", "1", "--self-condition", "--arch", "modula"])
    assert e.value.code == 2
    assert "self_condition=True needs the standard" in capsys.readouterr().err


def test_prediction_input_replaces_the_first_pass():
    """prediction=p is one pass fed p: the first pass's own probabilities give the two-pass
    output, all zeros the pass without self-conditioning."""
    model = with_projection(build())
    tokens, rate = tokens_and_rate()
    two = model_lib.apply_logits(model, tokens, rate)
    one = model_lib.apply_features(model, tokens, rate, self_condition=False)
    first = model_lib.apply_readout(model, one.reshape(-1, one.shape[-1])).reshape(two.shape)
    fed = model_lib.apply_logits(model, tokens, rate, jax.nn.softmax(first, axis=-1))
    np.testing.assert_allclose(fed, two, rtol=1e-5, atol=1e-6)
    zeros = model_lib.apply_logits(model, tokens, rate, jnp.zeros(two.shape))
    np.testing.assert_allclose(zeros, first, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(two - first))) > 1e-3  # the two are told apart


def counting_denoiser(vocab: int):
    """A denoiser whose answer is known: with no prediction (all zeros) it favours token 1;
    given a prediction favouring token k it favours k + 1 (never above threshold's 0.9, so
    every sampler keeps its plan). Under "previous" the n-th call favours token n."""

    def fn(tokens, prediction=None):
        b, n = tokens.shape
        if prediction is None:
            return jnp.broadcast_to(2.0 * jax.nn.one_hot(1, vocab), (b, n, vocab))
        k = jnp.where(prediction.sum(-1) > 0, jnp.argmax(prediction, -1) + 1, 1)
        return 2.0 * jax.nn.one_hot(k, vocab)

    return fn


@pytest.mark.parametrize("method", ["ddpm", "confidence", "threshold", "interference"])
def test_previous_mode_feeds_each_call_the_last_calls_prediction(method):
    vocab, length = 40, 12
    tokens = np.full((2, length), vocab - 1, np.int32)
    tokens[:, 0] = 7  # a fixed token stays
    run = lambda mode: sampling.sample(
        counting_denoiser(vocab), jax.random.key(3), tokens, mask_id=vocab - 1, steps=6,
        method=method, temperature=0.0, return_trajectory=True, self_condition=mode,
    )  # fmt: skip
    out = run("previous")
    got, step = np.asarray(out.tokens), np.asarray(out.trajectory.reveal_step)
    assert (got[:, 0] == 7).all() and (step[:, 1:] >= 0).all()
    # ddpm calls at every step (call n at step n - 1); the others only at steps that reveal,
    # so a token revealed at the j-th distinct reveal step of its row came from call j.
    for row_tokens, row_steps in zip(got, step, strict=True):
        calls = {s: i + 1 for i, s in enumerate(sorted(set(row_steps[1:])))}
        want = [s + 1 if method == "ddpm" else calls[s] for s in row_steps[1:]]
        np.testing.assert_array_equal(row_tokens[1:], want)
    assert (np.asarray(run("fresh").tokens)[:, 1:] == 1).all()  # never given a prediction


@pytest.mark.parametrize("method", ["ddpm_cache", "remdm_cap", "remdm_conf"])
def test_previous_mode_is_refused_where_logits_are_reused(method):
    tokens = np.full((1, 8), 39, np.int32)
    with pytest.raises(ValueError, match=f"'previous' with method='{method}'.*reuses logits"):
        sampling.sample(
            counting_denoiser(40), jax.random.key(0), tokens, mask_id=39, steps=4,
            method=method, self_condition="previous",
        )  # fmt: skip
    with pytest.raises(ValueError, match="must be one of \\('fresh', 'previous'\\)"):
        sampling.check_settings(method="ddpm", steps=4, self_condition="last")
