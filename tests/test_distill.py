"""SDTT (jif.sdtt, jif.distill): the divergences, the teacher's composed target, the loss's
zero and its gradient, and the CLI end to end (two rounds, resume, errors, jif.sample)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jif import checkpoint as ckpt
from jif import diffusion, distill, distill_measure, floor, optim, sample, sdtt, train
from jif import model as model_lib

V, MASK, B, L = 48, 47, 4, 24


@pytest.fixture(scope="module")
def net():
    """A tiny DiT with random weights everywhere (its readout starts at zero, which would
    make every prediction uniform and context-free): (unbound, params, logits_fn)."""
    cfg = model_lib.make_config("tiny", vocab_size=V, vocab_multiple=8)
    unbound, params = ckpt.init_model(cfg, 0)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [
        x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    params = jax.tree_util.tree_unflatten(tree, noisy)
    apply = jax.jit(lambda p, x, r: model_lib.apply_logits(ckpt.bind_params(unbound, p), x, r))
    return unbound, params, apply


def _xt(seed=1, rate=0.7):
    x0 = jax.random.randint(jax.random.key(seed), (B, L), 0, MASK)
    masked = jax.random.uniform(jax.random.key(seed + 1), (B, L)) < rate
    return jnp.where(masked, MASK, x0).astype(jnp.int32)


def _logp_np(logits):
    """log-softmax over real tokens in numpy, the mask column at 0 (as jif.sdtt stores it)."""
    z = np.array(logits, np.float64)
    z[..., MASK] = -np.inf
    z = z - z.max(-1, keepdims=True)
    out = z - np.log(np.exp(z).sum(-1, keepdims=True))
    out[..., MASK] = 0.0
    return out


def _divergence_np(logq, logp, masked, name):
    q, p = np.exp(logq), np.exp(logp)
    q[..., MASK] = p[..., MASK] = 0.0
    d = {
        "kl": (q * (logq - logp)).sum(-1),
        "kl_forward": (p * (logp - logq)).sum(-1),
        "tvd": 0.5 * np.abs(q - p).sum(-1),
        "mse": ((logq - logp) ** 2).mean(-1),
    }[name]
    return d[masked].mean()


def _target_np(apply, params, xt, t, dt, target):
    """The composed target rebuilt independently from the teacher's reveal steps: step 0's
    prediction at x_t where step 0 revealed, else step 1's at x_{t-dt} (x_t with step 0's
    tokens filled in)."""
    x_mid = jnp.where(target.revealed_at == 0, target.x_end, xt)
    p0 = _logp_np(apply(params, xt, diffusion.mask_rate(t)))
    p1 = _logp_np(apply(params, x_mid, diffusion.mask_rate(t - dt)))
    first = np.asarray(target.revealed_at == 0)[..., None]
    return np.where(first, p0, p1)


def test_divergences_match_numpy_and_vanish_only_at_equality():
    logits_q = jax.random.normal(jax.random.key(0), (B, L, V)) * 2
    logits_p = jax.random.normal(jax.random.key(1), (B, L, V)) * 2
    xt = _xt()
    masked = np.asarray(xt == MASK)
    logp = sdtt.log_probs(logits_p, MASK)
    target = sdtt.Target(logp, jnp.zeros((B, L), jnp.int32), xt)
    for name in sdtt.DIVERGENCES:
        loss, aux = sdtt.distill_loss(logits_q, target, xt, mask_id=MASK, divergence=name)
        expected = _divergence_np(_logp_np(logits_q), _logp_np(logits_p), masked, name)
        assert float(loss) == pytest.approx(expected, rel=1e-4) and expected > 1e-3
        same, _ = sdtt.distill_loss(logits_p, target, xt, mask_id=MASK, divergence=name)
        assert abs(float(same)) < 1e-6, name  # a student whose prediction is the target
        # clean positions and the mask logit do not count
        shifted = logits_p.at[..., MASK].add(5.0)
        shifted = jnp.where((xt == MASK)[..., None], shifted, logits_q)
        off, _ = sdtt.distill_loss(shifted, target, xt, mask_id=MASK, divergence=name)
        assert abs(float(off)) < 1e-6, name
    assert float(aux["mask_frac"]) == pytest.approx(masked.mean())
    with pytest.raises(ValueError, match="divergence 'l1'"):
        sdtt.distill_loss(logits_q, target, xt, mask_id=MASK, divergence="l1")


def test_target_is_the_teacher_prediction_where_each_token_was_revealed(net):
    _, params, apply = net
    xt, t, dt = _xt(rate=0.9), jnp.full((B,), 0.8), 0.25
    fn = lambda x, r: apply(params, x, r)
    target = sdtt.teacher_target(fn, xt, t, dt, jax.random.key(3), mask_id=MASK, n_steps=2)
    masked, at = np.asarray(xt == MASK), np.asarray(target.revealed_at)
    assert (at[~masked] == -1).all() and set(np.unique(at[masked])) == {0, 1, 2}
    # each step reveals with probability (t_i - t_{i+1}) / t_i; nothing else changes
    x_end = np.asarray(target.x_end)
    assert (x_end[~masked] == np.asarray(xt)[~masked]).all()
    assert (x_end[(at == 0) | (at == 1)] != MASK).all() and (x_end[at == 2] == MASK).all()
    assert abs((at[masked] < 2).mean() - 2 * dt / 0.8) < 0.15  # 0.625 of 87 positions
    expected = _target_np(apply, params, xt, t, dt, target)
    got = np.asarray(target.logp)
    np.testing.assert_allclose(got[masked], expected[masked], atol=1e-5)
    # a teacher step that reaches t = 0 reveals every masked token
    end = sdtt.teacher_target(fn, xt, jnp.full((B,), 0.3), 0.5, jax.random.key(4), mask_id=MASK)
    assert (np.asarray(end.revealed_at)[masked] == 0).all()


def test_loss_is_zero_exactly_when_student_and_two_step_teacher_agree(net):
    """Student = teacher agrees with the two-step target only where the teacher's first
    step changed no context: a context-free teacher, or steps too small to reveal a token.
    The same weights with steps that reveal tokens disagree (loss > 0)."""
    unbound, params, apply = net
    xt, t = _xt(), jnp.full((B,), 0.7)
    rate = diffusion.mask_rate(t)
    table = jax.random.normal(jax.random.key(5), (1, L, V)) * 3
    context_free = lambda x, r: jnp.broadcast_to(table, (*x.shape, V))
    for name in sdtt.DIVERGENCES:
        target = sdtt.teacher_target(context_free, xt, t, 0.3, jax.random.key(6), mask_id=MASK)
        loss, _ = sdtt.distill_loss(context_free(xt, rate), target, xt, mask_id=MASK, divergence=name)  # fmt: skip
        assert abs(float(loss)) < 1e-6, name
    # the training loss (make_loss) of a student equal to its teacher
    loss_fn = lambda dt: sdtt.make_loss(
        lambda w: ckpt.bind_params(unbound, w), model_lib.apply_logits, dt=dt, n_steps=2,
        divergence="kl",
    )  # fmt: skip
    student = ckpt.bind_params(unbound, params)
    batch = {"tokens": jnp.asarray(np.asarray(xt) % MASK), "teacher": params}
    tiny, aux = loss_fn(1e-9)(student, batch, jax.random.key(8), mask_id=MASK)
    assert float(aux["revealed"]) == 0.0 and abs(float(tiny)) < 1e-6
    big, aux = loss_fn(0.25)(student, batch, jax.random.key(8), mask_id=MASK)
    assert float(aux["revealed"]) > 0.2 and float(big) > 1e-3


def test_gradient_moves_the_student_toward_the_two_step_prediction(net):
    unbound, params, apply = net
    xt, t, dt = _xt(rate=0.9), jnp.full((B,), 0.9), 0.3
    fn = lambda x, r: apply(params, x, r)
    target = sdtt.teacher_target(fn, xt, t, dt, jax.random.key(9), mask_id=MASK)
    expected = _target_np(apply, params, xt, t, dt, target)  # computed on its own
    masked = np.asarray(xt == MASK)
    rate = diffusion.mask_rate(t)

    def loss(p, name):
        return sdtt.distill_loss(apply(p, xt, rate), target, xt, mask_id=MASK, divergence=name)[0]

    # Not "tvd": where the teacher's first step revealed a token, target = student exactly,
    # the kink of |q - p|, so any step raises those terms at first order (a subgradient).
    for name in ("kl", "kl_forward", "mse"):
        grads = jax.grad(loss)(params, name)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
        before = _divergence_np(_logp_np(apply(params, xt, rate)), expected, masked, name)
        # a step whose first-order decrease is 2% of the divergence
        norm2 = sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads))
        scale = 0.02 * float(loss(params, name)) / norm2
        step = jax.tree_util.tree_map(lambda p, g, s=scale: p - s * g, params, grads)
        after = _divergence_np(_logp_np(apply(step, xt, rate)), expected, masked, name)
        assert before > 1e-3 and after < 0.995 * before, (name, before, after)


# ----------------------------------------------------------------------------- the CLI

TINY = dict(preset="tiny", batch_size=4, seq_len=32, eval_every=0, n_samples=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train.run(train.configure(**TINY, steps=3, out=str(out), progress=False), progress=False)
    return str(out)


def _flags(teacher, out, *extra, steps=4):
    flags = ["--teacher", teacher, "--out", str(out), "--teacher-steps", "8", "--steps", str(steps)]
    return [*flags, "--ckpt-every", "2", "--log-every", "1", "--no-progress", *extra]


def _ema(path):
    return {k: np.asarray(v.data_array) for k, v in ckpt.load_for_inference(path).params.items()}


def test_cli_two_rounds_then_sample_and_resume(teacher, tmp_path, capsys):
    out = tmp_path / "sdtt"
    result = distill.main(_flags(teacher, out, "--rounds", "2"))
    assert [r["sampling_steps"] for r in result["rounds"]] == [4, 2]
    assert all(np.isfinite(r["loss_smoothed"]) for r in result["rounds"])
    # each round is a run folder; checkpoints count the steps of every round
    for k, steps in ((1, [2, 4]), (2, [6, 8])):
        infos = ckpt.list_checkpoints(str(out / f"round-{k}"))
        assert sorted(i.step for i in infos) == steps
        config = json.loads((out / f"round-{k}" / "config.json").read_text())
        assert config["seq_len"] == 32 and config["distill"]["round"] == k
        assert config["distill"]["student_sampling_steps"] == 8 // 2**k
        rows = [json.loads(x) for x in (out / f"round-{k}" / "metrics.jsonl").open()]
        assert [r["step"] for r in rows] == list(range(4 * k - 3, 4 * k + 1))
    # round 2 starts from round 1's student (EMA), which starts from the teacher's EMA
    r1 = json.loads((out / "round-2" / "config.json").read_text())["distill"]
    assert r1["teacher_of_round"] == str(out / "round-1")
    loaded = ckpt.load_for_inference(str(out))  # --checkpoint <out>: the last round
    assert loaded.path == str(out / "round-2" / "checkpoints" / "8")
    capsys.readouterr()
    sample.main(["--checkpoint", str(out), "--steps", "2", "--num", "1", "--method", "ddpm_cache"])
    assert "round-2/checkpoints/8" in capsys.readouterr().out

    # kill after round 2's step 6: resume repeats steps 7-8 to the same weights
    final = _ema(str(out / "round-2"))
    shutil.rmtree(out / "round-2" / "checkpoints" / "8")
    again = distill.main(_flags(teacher, out, "--rounds", "2", "--resume"))
    assert again["rounds"][0]["loss_smoothed"] is None  # round 1 was done: not retrained
    resumed = _ema(str(out / "round-2"))
    for k in final:
        np.testing.assert_array_equal(final[k], resumed[k])
    rows = [json.loads(x) for x in (out / "round-2" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    # a third round on resume: its teacher is round 2's student
    more = distill.main(_flags(teacher, out, "--rounds", "3", "--resume"))
    assert more["rounds"][2]["sampling_steps"] == 1
    assert ckpt.load_for_inference(str(out)).path.endswith("round-3/checkpoints/12")


def test_cli_errors_exit_2_with_a_message(teacher, tmp_path, capsys):
    def error(*flags):
        with pytest.raises(SystemExit) as e:
            distill.main(list(flags))
        assert e.value.code == 2
        return capsys.readouterr().err

    out = tmp_path / "x"
    assert "--divergence 'l2'" in error(*_flags(teacher, out, "--divergence", "l2"))
    assert "cannot be divided by 2 4 times" in error(*_flags(teacher, out, "--rounds", "4"))
    assert "no checkpoint at" in error(*_flags(str(tmp_path / "none"), out))
    distill.main(_flags(teacher, out, "--rounds", "1", steps=2))
    assert "Pass --resume" in error(*_flags(teacher, out, "--rounds", "1", steps=2))
    msg = error(*_flags(teacher, out, "--rounds", "1", "--resume", "--lr", "1", steps=2))
    assert "cannot resume" in msg and "lr" in msg
    assert not os.path.exists(out / "round-2")


def test_measure_samples_once_and_plots(teacher, tmp_path):
    out, fig = tmp_path / "m", tmp_path / "q.png"
    argv = ["--models", f"t={teacher}", "--samples", "3", "--steps", "2", "4"]
    argv += ["--methods", "ddpm_cache", "--out", str(out), "--batch-size", "2"]
    rows = distill_measure.main([*argv, "--figure", str(fig)])
    assert [(r["model"], r["steps"]) for r in rows] == [("t", 2), ("t", 4)] and fig.stat().st_size
    tokens = np.load(out / "t-ddpm_cache-4.npy")
    assert (
        tokens.shape == (3, 32)
        and (tokens != ckpt.load_for_inference(teacher).tokenizer.mask_id).all()
    )
    tok = ckpt.load_for_inference(teacher).tokenizer
    texts = [tok.decode(r[1:].tolist()) for r in tokens]
    assert rows[1]["story_level"] == floor.check_stories(texts, window=True).story_level
    stamp = os.path.getmtime(out / "t-ddpm_cache-4.npy")
    again = distill_measure.main(argv)  # nothing missing: nothing drawn again
    assert again == rows and os.path.getmtime(out / "t-ddpm_cache-4.npy") == stamp
    with pytest.raises(SystemExit) as e:
        distill_measure.main(["--models", teacher, "--out", str(out)])
    assert e.value.code == 2


def test_optim_config_keeps_or_drops_the_teachers_modula_settings():
    """A Modula teacher's momentum and blocks mass carry over to a Modula student and are
    dropped, not refused, when the student trains with another optimizer."""
    teacher = {"optim": {"optimizer": "modula", "lr": 0.1, "momentum": 0.9, "blocks_mass": 3.0}}
    same = distill.optim_config(distill.DistillConfig(teacher="t", out="o"), teacher, 128)
    assert (same.optimizer, same.momentum, same.blocks_mass) == ("modula", 0.9, 3.0)
    assert same.lr == pytest.approx(0.01)
    cfg = distill.DistillConfig(teacher="t", out="o", optimizer="adamw")
    other = distill.optim_config(cfg, teacher, 128)
    assert other.optimizer == "adamw"
    assert (other.momentum, other.blocks_mass) == tuple(optim.modula_only_defaults().values())
