"""Sampler tests against denoisers whose right answer is known exactly."""

import gc
import itertools
import json
import math
import weakref
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jif import diffusion, draw, sampling, train
from jif import sample as sample_cli
from jif.checkpoint import load_for_inference
from jif.draw import filter_logits
from jif.sampling import METHODS, first_frame, replay, sample
from jif.tokenizer import encode_template

# ----------------------------------------------------------------------------- exact denoiser

N_VOCAB, LENGTH, MASK = 3, 3, 3  # token ids 0..2, mask id 3; the denoiser outputs 4 logits
SEQS = np.array(list(itertools.product(range(N_VOCAB), repeat=LENGTH)), np.int32)  # [27, 3]


def make_joint(seed=0) -> np.ndarray:
    """A strongly correlated distribution over the 27 sequences. (None is impossible: tokens
    revealed at the same step are drawn independently, so with 500 steps about 0.6% of the
    samples could land on a zero-probability sequence by design of the sampler.)"""
    rng = np.random.default_rng(seed)
    p = np.exp(1.5 * rng.normal(size=len(SEQS)))
    return p / p.sum()


JOINT = make_joint()


def exact_denoise_fn(tokens: jax.Array) -> jax.Array:
    """logits [B, L, 4]: log p(x_i = v | unmasked tokens) by enumeration; the mask logit is
    the largest of all, so a sampler that ever draws it fails."""
    seqs, joint = jnp.asarray(SEQS), jnp.asarray(JOINT, jnp.float32)
    consistent = jnp.all((tokens[:, None, :] == MASK) | (tokens[:, None, :] == seqs[None]), -1)
    weight = consistent * joint[None, :]  # [B, 27]
    onehot = jax.nn.one_hot(seqs, N_VOCAB)  # [27, L, 3]
    marginal = jnp.einsum("bs,slv->blv", weight, onehot)
    logits = jnp.log(marginal / marginal.sum(-1, keepdims=True))
    return jnp.concatenate([logits, jnp.full(logits.shape[:2] + (1,), 50.0)], axis=-1)


def chi2_threshold(df: int, z: float = 3.09) -> float:
    """Upper 1e-3 quantile of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_distribution(samples: np.ndarray, probs: np.ndarray, cells: np.ndarray):
    """Chi-square goodness of fit of rows of `samples` to `probs` over rows of `cells`."""
    index = {tuple(c): i for i, c in enumerate(cells)}
    counts = np.zeros(len(cells))
    for row, n in zip(*np.unique(samples, axis=0, return_counts=True), strict=True):
        assert tuple(row) in index and probs[index[tuple(row)]] > 0, f"impossible sample {row}"
        counts[index[tuple(row)]] += n
    support = probs > 0
    expected = probs[support] * len(samples)
    stat = float(np.sum((counts[support] - expected) ** 2 / expected))
    assert stat < chi2_threshold(int(support.sum()) - 1), (stat, counts, expected)


N_SAMPLES = 10_000
STEPS = 500  # two of three tokens share a step with probability about 0.6%
UNCOND = np.full((N_SAMPLES, LENGTH), MASK, np.int32)


@pytest.fixture(scope="module")
def ancestral_runs():
    key = jax.random.key(0)
    return {
        m: sample(exact_denoise_fn, key, UNCOND, mask_id=MASK, steps=STEPS, method=m)
        for m in ("ddpm", "ddpm_cache")
    }


@pytest.mark.parametrize("method", ["ddpm", "ddpm_cache"])
def test_ancestral_reproduces_joint(ancestral_runs, method):
    assert_distribution(np.asarray(ancestral_runs[method].tokens), JOINT, SEQS)


def test_ddpm_cache_same_samples_fewer_calls(ancestral_runs):
    a, b = ancestral_runs["ddpm"], ancestral_runs["ddpm_cache"]
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert int(a.n_calls) == STEPS + 1  # every step plus the final denoising step
    assert 1 <= int(b.n_calls) <= LENGTH  # at most one call per distinct reveal step


def test_random_order_one_token_per_step_is_exact():
    # Revealing one token per step from the exact conditional samples the joint exactly.
    out = sample(
        exact_denoise_fn, jax.random.key(1), UNCOND, mask_id=MASK, steps=3, method="random"
    )
    assert int(out.n_calls) == 3
    assert_distribution(np.asarray(out.tokens), JOINT, SEQS)


@pytest.mark.parametrize("method", ["ddpm", "ddpm_cache"])
def test_ancestral_conditional_with_fixed_position(method):
    tokens = UNCOND.copy()
    tokens[:, 1] = 2
    out = sample(
        exact_denoise_fn, jax.random.key(2), tokens, mask_id=MASK, steps=STEPS, method=method
    )
    out = np.asarray(out.tokens)
    assert (out[:, 1] == 2).all()
    keep = SEQS[:, 1] == 2
    assert_distribution(out[:, [0, 2]], JOINT[keep] / JOINT[keep].sum(), SEQS[keep][:, [0, 2]])


# ----------------------------------------------------------------------------- fake denoisers

V_FAKE, MASK_FAKE, L_FAKE = 9, 8, 12
TARGET = (3 * np.arange(L_FAKE) + 1) % MASK_FAKE  # the argmax at each position


def fake_logits(confidence: np.ndarray) -> np.ndarray:
    """[L, V] logits whose argmax at position i is TARGET[i] with softmax prob confidence[i]
    (the rest spread evenly) and a mask logit above everything."""
    logits = np.zeros((L_FAKE, V_FAKE), np.float32)
    rest = (1 - confidence) / (MASK_FAKE - 1)
    logits[:, :MASK_FAKE] = np.log(rest)[:, None]
    logits[np.arange(L_FAKE), TARGET] = np.log(confidence)
    logits[:, MASK_FAKE] = 100.0
    return logits


CONF = np.linspace(0.3, 0.9, L_FAKE)[np.random.default_rng(0).permutation(L_FAKE)]
FAKE = jnp.asarray(fake_logits(CONF))


def fake_denoise_fn(tokens):
    return jnp.broadcast_to(FAKE, tokens.shape + (V_FAKE,))


def fake_input(batch=3):
    tokens = np.full((batch, L_FAKE), MASK_FAKE, np.int32)
    tokens[:, 0] = 7  # a fixed token that differs from TARGET[0]
    tokens[1, 5] = 2
    return tokens


@pytest.mark.parametrize("block_length", [None, 4])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_argmax_at_temperature_zero(method, block_length):
    tokens = fake_input()
    masked = tokens == MASK_FAKE
    run = lambda temperature: sample(
        fake_denoise_fn,
        jax.random.key(3),
        tokens,
        mask_id=MASK_FAKE,
        steps=24,
        method=method,
        temperature=temperature,
        block_length=block_length,
        return_trajectory=True,
    )
    out = run(0.0)
    got = np.asarray(out.tokens)
    np.testing.assert_array_equal(got, np.where(masked, TARGET[None, :], tokens))
    traj = out.trajectory
    n_steps = traj.n_steps
    n_final = (3 if block_length else 1) * (METHODS[method].planner == "ancestral")
    assert n_steps == traj.counts.shape[1] == 24 + n_final  # a final denoising step a block
    np.testing.assert_array_equal(replay(traj, got, 0, MASK_FAKE), tokens)
    np.testing.assert_array_equal(replay(traj, got, n_steps, MASK_FAKE), got)
    for step in range(n_steps):  # each frame reveals exactly counts[:, step] more tokens
        before = replay(traj, got, step, MASK_FAKE) == MASK_FAKE
        after = replay(traj, got, step + 1, MASK_FAKE) == MASK_FAKE
        np.testing.assert_array_equal((before & ~after).sum(1), np.asarray(traj.counts[:, step]))
        np.testing.assert_array_equal(before & ~after, first_frame(traj) == step + 1)
    reveal = np.asarray(traj.reveal_step)
    assert (reveal[~masked] == -1).all() and (reveal[masked] >= 0).all()
    assert (first_frame(traj)[~masked] == 0).all()  # fixed tokens show from frame 0
    if block_length:  # blocks are generated left to right
        block_of_step = reveal // (n_steps // 3)
        block_of_pos = np.broadcast_to(np.arange(L_FAKE) // 4, tokens.shape)
        np.testing.assert_array_equal(block_of_step[masked], block_of_pos[masked])
    elif METHODS[method].planner == "expected":  # the expected number of reveals per step
        m = masked.sum(1)[:, None]
        remaining = (m * (24 - np.arange(25))) // 24
        np.testing.assert_array_equal(np.asarray(traj.counts), remaining[:, :-1] - remaining[:, 1:])
    if method != "random":
        want = np.broadcast_to(CONF, tokens.shape)[masked]
        np.testing.assert_allclose(np.asarray(traj.prob)[masked], want, rtol=1e-5)
    # At temperature 1 (same compiled program): no mask left, fixed tokens kept.
    hot = np.asarray(run(1.0).tokens)
    assert (hot != MASK_FAKE).all()
    np.testing.assert_array_equal(hot[~masked], tokens[~masked])
    assert (hot != got).any()


@pytest.mark.parametrize("method", ["confidence", "margin", "entropy"])
def test_orders_reveal_most_certain_first(method):
    # 12 masks over 24 steps: one token every other step; all three scores increase with CONF.
    # (Same shapes and options as test_argmax_at_temperature_zero, so no new compilation.)
    tokens = np.full((3, L_FAKE), MASK_FAKE, np.int32)
    out = sample(
        fake_denoise_fn,
        jax.random.key(4),
        tokens,
        mask_id=MASK_FAKE,
        steps=24,
        method=method,
        temperature=0.0,
        return_trajectory=True,
    )
    reveal = np.asarray(out.trajectory.reveal_step)
    assert len(np.unique(reveal[0])) == L_FAKE
    np.testing.assert_array_equal(np.argsort(reveal, axis=1), np.argsort(-CONF)[None].repeat(3, 0))
    assert int(out.n_calls) == L_FAKE  # steps that reveal nothing call nothing


# ----------------------------------------------------------------------------- top-k, top-p


def one_position_samples(logits: np.ndarray, n: int, **kw) -> np.ndarray:
    fn = lambda t: jnp.broadcast_to(jnp.asarray(logits, jnp.float32), t.shape + (len(logits),))
    tokens = np.full((n, 1), len(logits) - 1, np.int32)  # the last id is the mask
    out = sample(
        fn, jax.random.key(7), tokens, mask_id=len(logits) - 1, steps=1, method="ddpm", **kw
    )
    return np.asarray(out.tokens)[:, 0]


def test_low_temperature_is_exact_in_float32():
    # logits = T log p at T = 1e-4 must give back p: precision is kept by subtracting the max.
    p = np.array([0.5, 0.3, 0.2])
    logits = np.append(1e-4 * np.log(p) + 3.0, 0.0)
    got = one_position_samples(logits, 20_000, temperature=1e-4)
    assert_distribution(got[:, None], p, np.arange(3)[:, None])


def test_top_k_and_top_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(p))[None, None]
    finite = lambda **kw: np.isfinite(
        np.asarray(filter_logits(logits, mask_id=99, temperature=1.0, **kw))[0, 0]
    )
    np.testing.assert_array_equal(finite(top_k=2, top_p=1.0), [1, 1, 0, 0])
    np.testing.assert_array_equal(finite(top_k=0, top_p=0.7), [1, 1, 0, 0])
    np.testing.assert_array_equal(finite(top_k=0, top_p=0.4), [1, 0, 0, 0])
    np.testing.assert_array_equal(finite(top_k=0, top_p=0.81), [1, 1, 1, 0])
    got = one_position_samples(np.append(np.log(p), 0.0), 20_000, top_k=2)
    assert_distribution(got[:, None], p[:2] / p[:2].sum(), np.arange(2)[:, None])


def test_gumbel_moments():
    g = np.asarray(draw.gumbel(jax.random.key(8), (400_000,)), np.float64)
    assert abs(g.mean() - np.euler_gamma) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.02
    assert np.isfinite(g).all()


def test_noise_stream_is_uniform_and_uncorrelated():
    seeds = jax.random.bits(jax.random.key(11), (2000,), jnp.uint32)
    streams = [np.asarray(draw.noise_bits(seeds, 200, c), np.float64) / 2**32 for c in (0, 1)]
    for u in streams:
        assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
        assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01  # along v
        assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.01  # across seeds
    assert abs(np.corrcoef(streams[0].ravel(), streams[1].ravel())[0, 1]) < 0.01  # counters
    g = np.asarray(draw.gumbel_from_bits(draw.noise_bits(seeds, 200)), np.float64)
    assert abs(g.mean() - np.euler_gamma) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.03


# ----------------------------------------------------------------------------- noise conditioning


def test_time_conditioned_ddpm_sees_schedule_and_cache_refuses():
    # argmax is 0 while the noise level is above 0.5, else 1.
    def fn(tokens, mask_rate):
        logits = jnp.where(
            mask_rate[:, None, None] > 0.5, jnp.array([1.0, 0.0, -1.0]), jnp.array([0.0, 1.0, -1.0])
        )
        return jnp.broadcast_to(logits, tokens.shape + (3,))

    tokens = np.full((4, 16), 2, np.int32)
    out = sample(
        fn,
        jax.random.key(9),
        tokens,
        mask_id=2,
        steps=20,
        method="ddpm",
        temperature=0.0,
        time_conditioned=True,
        return_trajectory=True,
    )
    grid = sampling.ancestral_grid(20)
    level = diffusion.mask_rate(grid[np.asarray(out.trajectory.reveal_step)])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(level > 0.5, 0, 1))
    with pytest.raises(ValueError, match="noise level"):
        sample(
            fn,
            jax.random.key(9),
            tokens,
            mask_id=2,
            steps=20,
            method="ddpm_cache",
            time_conditioned=True,
        )


def test_bad_options_raise():
    tokens = fake_input()
    with pytest.raises(ValueError, match="method='nope'"):
        sample(fake_denoise_fn, jax.random.key(0), tokens, mask_id=MASK_FAKE, method="nope")
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        sample(
            fake_denoise_fn, jax.random.key(0), tokens, mask_id=MASK_FAKE, steps=10, block_length=5
        )
    with pytest.raises(ValueError, match="top_p"):
        sample(fake_denoise_fn, jax.random.key(0), tokens, mask_id=MASK_FAKE, top_p=0.0)
    for bad in (math.nan, math.inf):  # NaN once sampled only end-of-text, silently
        with pytest.raises(ValueError, match=f"temperature={bad}: must be a finite number"):
            sample(fake_denoise_fn, jax.random.key(0), tokens, mask_id=MASK_FAKE, temperature=bad)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=math.nan), "temperature=nan: must be a finite number in [0, inf)"),
        (dict(temperature=-0.1), "temperature=-0.1:"),
        (dict(temperature="1"), "temperature='1':"),
        (dict(top_p=0.0), "top_p=0.0: must be a finite number in (0, 1]"),
        (dict(top_p=1.5), "top_p=1.5:"),
        (dict(top_p=math.nan), "top_p=nan:"),
        (dict(top_k=-1), "top_k=-1: must be a whole number from 0"),
        (dict(top_k=2.5), "top_k=2.5:"),
        (dict(steps=0), "steps=0: must be a whole number from 1 to 1048576"),
        (dict(steps=2.5), "steps=2.5:"),
        (dict(steps=True), "steps=True:"),
        (dict(steps=10**9), "steps=1000000000:"),
        (dict(method="greedy"), "method='greedy': must be one of ['confidence',"),
        (dict(length=0), "length=0: must be a whole number from 1"),
        (dict(length=65, context=64), "length=65: must be a whole number from 1 to 64 (the mod"),
        (dict(block_length=0, length=16), "block_length=0: must be a whole number from 1 to 16"),
        (dict(block_length=17, length=16), "block_length=17:"),
        (dict(block_length=4, length=16, steps=6), "steps=6: must be a multiple of the number "),
        (dict(batch=0), "batch=0: must be a whole number from 1"),
        (dict(seed=-1), "seed=-1: must be a whole number from 0 to 4294967295"),
        (dict(seed=2**32), "seed=4294967296:"),
        (dict(batch=10**5, length=1024, vocab=50258), "GiB of logits per network call, more"),
        (dict(batch=0, names={"batch": "--num"}), "--num=0: must be"),
    ],
)
def test_check_settings_names_the_bad_value_and_the_range(settings, message):
    with pytest.raises(ValueError) as e:
        sampling.check_settings(**{"method": "ddpm", "steps": 8, **settings})
    assert message in str(e.value)


def test_check_settings_normalises_what_it_accepts():
    got = sampling.check_settings(
        method="confidence",
        steps=np.int64(8),
        temperature=0,
        top_p=np.float32(0.5),
        top_k=3.0,
        block_length=4,
        length=16,
        context=16,
        batch=2,
        vocab=2050,
        seed=7,
    )
    want = dict(method="confidence", steps=8, temperature=0.0, top_p=0.5, top_k=3)
    assert got == {**want, "block_length": 4, "length": 16, "batch": 2, "seed": 7}
    assert all(type(got[k]) is int for k in ("steps", "top_k", "block_length", "length"))


def test_compiled_samplers_are_bounded_and_freed(monkeypatch):
    """Every new step count compiles a program; only the MAX_COMPILED most recent are kept,
    and a dropped one is freed (nothing else holds its jitted function)."""
    monkeypatch.setattr(sampling, "_compiled", OrderedDict())
    monkeypatch.setattr(sampling, "MAX_COMPILED", 3)
    tokens = fake_input()
    run = lambda steps: sample(
        fake_denoise_fn, jax.random.key(0), tokens, mask_id=MASK_FAKE, steps=steps, method="random"
    )
    first = run(2)
    program = weakref.ref(next(iter(sampling._compiled.values())))
    np.testing.assert_array_equal(run(2).tokens, first.tokens)  # the same program again
    assert sampling.compiled_samplers() == 1
    for steps in (3, 4, 5, 6):
        run(steps)
    assert sampling.compiled_samplers() == 3
    assert [dict(k[1])["steps"] for k in sampling._compiled] == [4, 5, 6]
    gc.collect()
    assert program() is None, "a dropped sampler is still referenced"


# ----------------------------------------------------------------------------- calls


def test_expected_calls_matches_sampler():
    # One row of 64 masks: the mean number of cached calls is the expected number of distinct
    # reveal steps.
    tokens = np.full((1, 64), MASK_FAKE, np.int32)
    fn = lambda t: jnp.zeros(t.shape + (V_FAKE,))
    calls = [
        int(
            sample(
                fn, jax.random.key(i), tokens, mask_id=MASK_FAKE, steps=100, method="ddpm_cache"
            ).n_calls
        )
        for i in range(40)
    ]
    assert abs(np.mean(calls) - sampling.expected_calls(100, 64)) < 2.0


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_cli") / "run"
    train.main(
        ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "32"]
        + ["--out", str(out), "--eval-every", "0", "--n-samples", "0", "--no-progress"]
    )
    return str(out)


def test_cli_end_to_end(tiny_run, capsys):
    tok = load_for_inference(tiny_run).tokenizer
    template = "Once upon a time, [MASK:5] was happy."
    argv = ["--checkpoint", tiny_run, "--steps", "16", "--num", "2", "--template", template]
    out = sample_cli.main(argv + ["--json", "--method", "confidence", "--temperature", "0.5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["texts"] == out["texts"] and len(out["texts"]) == 2
    tokens = np.asarray(out["tokens"])
    row = encode_template(tok, template, length=32)
    assert tokens.shape == (2, 32) and (tokens != tok.mask_id).all()
    np.testing.assert_array_equal(
        tokens[:, row != tok.mask_id], np.tile(row[row != tok.mask_id], (2, 1))
    )
    assert out["data"] == "stories" and len(out["scores"]) == 2
    assert all(0.0 <= s <= g <= 1.0 for s, g in zip(out["scores"], out["grammatical"], strict=True))
    assert 1 <= out["n_calls"] <= 16

    sample_cli.main(["--checkpoint", tiny_run, "--steps", "8", "--num", "1", "--no-ema"])
    text = capsys.readouterr().out
    assert "--- sample 0  grammar score" in text and "confidence with 8 steps" in text


def test_cli_user_mistakes(tiny_run, tmp_path, capsys):
    spelling = "is not a mask marker: write [MASK] for one generated token or [MASK:n] for n"
    run = ["--checkpoint", tiny_run]
    for argv, message in (
        [
            (["--checkpoint", str(tmp_path / "nothing")], "does not exist"),
            ([*run, "--template", "[MASK:40]"], "must be from 1 to the sequence length 32"),
            ([*run, "--template", "x " * 40], "more than the sequence length 32"),
            (
                [*run, "--length", "64"],
                "--length=64: must be a whole number from 1 to 32 (the model",
            ),
            ([*run, "--length", "1"], "leaves nothing to generate"),
            (
                [*run, "--temperature", "nan"],
                "--temperature=nan: must be a finite number in [0, inf)",
            ),
            ([*run, "--top-p", "0"], "--top-p=0.0: must be a finite number in (0, 1]"),
            ([*run, "--top-k", "-2"], "--top-k=-2:"),
            ([*run, "--steps", "0"], "--steps=0:"),
            ([*run, "--seed", "-1"], "--seed=-1:"),
            ([*run, "--num", "0"], "--num=0:"),
            ([*run, "--num", "100000000"], "--num=100000000:"),
            ([*run, "--num", "1000000", "--steps", "8"], "GiB of logits"),  # 1 TB
            ([*run, "--block-length", "5", "--steps", "8"], "multiple of the number of blocks (7"),
            ([*run, "--method", "greedy"], "--method='greedy'"),
            ([*run, "--template", "[MASK:0]"], "'[MASK:0]' asks for 0 generated tokens"),
            ([*run, "--template", "[MASK:1000000000000]"], "asks for 1000000000000 generated"),
            ([*run, "--template", "a [MASK:10**12]"], spelling),
        ]
        + [([*run, "--template", f"Once {m} end"], spelling) for m in ["[MASK:x]", "[MASK:-3]"]]
        + [
            ([*run, "--prompt", f"Once {m} end"], spelling)
            for m in ["[MASK: 10]", "[mask:10]", "[MASK:abc]", "<|mask|>"]
        ]
    ):
        with pytest.raises(SystemExit) as e:
            sample_cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err, (argv, err)


@pytest.mark.parametrize("method", ["ddpm_cache", "random"])
def test_many_reveals_in_one_step(method):
    # One step reveals every mask (more than sampling.GATHER per row): drawn in chunks.
    tokens = fake_input()
    assert (tokens == MASK_FAKE).sum(1).min() > sampling.GATHER
    run = lambda t: sample(
        fake_denoise_fn,
        jax.random.key(10),
        tokens,
        mask_id=MASK_FAKE,
        steps=1,
        method=method,
        temperature=t,
    )
    got = np.asarray(run(0.0).tokens)
    np.testing.assert_array_equal(got, np.where(tokens == MASK_FAKE, TARGET[None, :], tokens))
    hot = np.asarray(run(1.0).tokens)
    assert (hot != MASK_FAKE).all() and (
        hot[tokens != MASK_FAKE] == tokens[tokens != MASK_FAKE]
    ).all()


def test_scores_against_direct_formulas():
    p = np.array([[0.4, 0.4, 0.2, 0.0], [0.6, 0.3, 0.1, 0.0]])
    with np.errstate(divide="ignore"):  # any offset, and a -inf (filtered) entry
        logits = jnp.asarray(np.log(p) + 5.0, jnp.float32)
    np.testing.assert_allclose(sampling.score_margin(logits, None, None), [0.0, 0.3], atol=1e-6)
    neg_entropy = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    np.testing.assert_allclose(sampling.score_entropy(logits, None, None), neg_entropy, atol=1e-6)
