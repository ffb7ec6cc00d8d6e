"""jif.live: a sampler's network calls reach a stream as they happen, without changing the
samples; a stream can stop the run, and its errors come out as themselves."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jif import ar, live, sampling

V, L, B, MASK = 11, 12, 2, 10


def denoise(tokens):
    """Logits that depend on the input (so a stale call would show): favour (t + j) % 9."""
    shift = jnp.sum(tokens == MASK, axis=1, keepdims=True) % 3  # [B, 1]
    target = (jnp.arange(L)[None] + shift) % 9  # [B, L]
    return jax.nn.one_hot(target, V) * 4.0 - 2.0


def start():
    tokens = np.full((B, L), MASK, np.int32)
    tokens[:, 0] = 9
    tokens[:, 5] = 3  # a fixed token inside
    return tokens


@pytest.mark.parametrize("method", ["ddpm_cache", "confidence", "threshold", "remdm_conf"])
def test_stream_sees_every_call_and_changes_nothing(method):
    tokens = start()
    common = dict(mask_id=MASK, steps=6, method=method, return_trajectory=True)
    plain = sampling.sample(denoise, jax.random.key(1), tokens, **common)
    calls = []
    streamed = sampling.sample(denoise, jax.random.key(1), tokens, **common, stream=calls.append)
    np.testing.assert_array_equal(plain.tokens, streamed.tokens)
    assert len(calls) == int(plain.n_calls) > 0
    np.testing.assert_array_equal(calls[0].tokens, tokens)  # the first call sees the input
    for c in calls:  # each call's prediction, computed again here from its input
        logp = jax.nn.log_softmax(jnp.asarray(denoise(c.tokens)).at[..., MASK].set(-jnp.inf))
        np.testing.assert_array_equal(c.top_ids[..., 0], np.argmax(logp, axis=-1))
        np.testing.assert_allclose(c.top_probs[..., 0], np.exp(np.max(logp, -1)), rtol=1e-5)
        logp = np.asarray(logp)
        want = -np.sum(np.exp(logp) * np.where(np.isfinite(logp), logp, 0.0), axis=-1)
        np.testing.assert_allclose(c.entropy, want, rtol=1e-4, atol=1e-6)
        assert (c.tokens[:, 5] == 3).all() and (c.tokens[:, 0] == 9).all()
    # Tokens only ever go from mask to a value, except for a remasking sampler.
    masks = [int((c.tokens == MASK).sum()) for c in calls]
    if method != "remdm_conf":
        assert masks == sorted(masks, reverse=True)


def test_live_run_frames_and_reveals_match_the_trajectory():
    tokens = start()
    run = live.LiveRun(
        lambda s: sampling.sample(
            denoise, jax.random.key(2), tokens, mask_id=MASK, steps=8, method="confidence",
            return_trajectory=True, stream=s,
        ),
        mask_id=MASK,
    )  # fmt: skip
    run.join()
    assert run.error is None and run.done and not run.stopped
    traj = run.result.trajectory
    assert len(run.frames) == traj.n_steps + 1
    for c, frame in enumerate(run.frames):
        want = sampling.replay(traj, run.result.tokens, c, MASK)
        np.testing.assert_array_equal(frame, want)
    np.testing.assert_array_equal(run.reveal_frame, sampling.first_frame(traj))
    assert run.seconds >= run.first_call_s > 0


def test_a_stream_stops_the_run_or_fails_it_with_its_own_error():
    tokens = start()
    seen = []

    def stop_at_3(call):
        seen.append(call)
        if len(seen) == 3:
            raise live.Stopped

    run = lambda stream: sampling.sample(
        denoise, jax.random.key(0), tokens, mask_id=MASK, steps=8, method="confidence",
        stream=stream,
    )  # fmt: skip
    with pytest.raises(live.Stopped):
        run(stop_at_3)
    assert len(seen) == 3, "the run ended at the call that asked"

    def broken(call):
        raise KeyError("a bug in the page")

    with pytest.raises(KeyError, match="a bug in the page"):
        run(broken)
    go = threading.Event()  # the run starts only once stop() was called: no race with it

    def after_stop(stream):
        go.wait()
        return run(stream)

    job = live.LiveRun(after_stop, mask_id=MASK)
    job.stop()
    go.set()
    job.join()
    assert job.stopped and job.error is None and job.result is None


def test_left_to_right_stream_reveals_one_position_a_call():
    tokens = start()
    calls = []
    out = ar.sample(denoise, jax.random.key(0), tokens, mask_id=MASK, stream=calls.append)
    plain = ar.sample(denoise, jax.random.key(0), tokens, mask_id=MASK)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    assert len(calls) == int(out.n_calls) == L - 1
    for i, c in enumerate(calls, start=1):  # call i predicts position i only
        assert (c.tokens[:, i:] == np.asarray(tokens)[:, i:]).all()
        assert np.isfinite(c.entropy[:, i]).all() and np.isnan(np.delete(c.entropy, i, 1)).all()
