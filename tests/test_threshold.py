"""The confidence-threshold sampler against denoisers whose right answer is known."""

import jax
import numpy as np
import pytest
from test_sampling import (
    CONF,
    JOINT,
    LENGTH,
    MASK,
    MASK_FAKE,
    SEQS,
    TARGET,
    UNCOND,
    assert_distribution,
    exact_denoise_fn,
    fake_denoise_fn,
    fake_input,
)

from jif import sampling
from jif.sampling import sample
from jif.threshold import calls_per_row


def run(tokens, fn=fake_denoise_fn, mask=MASK_FAKE, **kw):
    kw = {"steps": 12, "temperature": 0.0, "return_trajectory": True, **kw}
    return sample(fn, jax.random.key(3), tokens, mask_id=mask, method="threshold", **kw)


def test_threshold_one_is_confidence_exactly():
    # Nothing has probability above 1, so every step reveals the confidence plan's count.
    for fn, tokens, mask in (
        (exact_denoise_fn, UNCOND[:2000], MASK),
        (fake_denoise_fn, fake_input(), MASK_FAKE),
    ):
        for block_length in (None, 1):
            kw = dict(steps=LENGTH if mask == MASK else 12, block_length=block_length)
            a = sample(fn, jax.random.key(5), tokens, mask_id=mask, method="confidence", **kw)
            b = sample(
                fn, jax.random.key(5), tokens, mask_id=mask, method="threshold", threshold=1.0, **kw
            )
            np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
            assert int(a.n_calls) == int(b.n_calls)


@pytest.mark.parametrize("fixed", [None, 1])
def test_blocks_of_one_reproduce_joint(fixed):
    # Blocks of one position left to right: each token is drawn from its exact conditional
    # whatever the threshold (choosing by confidence among several would bias the draw, as
    # for "confidence"); a fixed position never changes and conditions the others.
    tokens = UNCOND.copy()
    if fixed is not None:
        tokens[:, fixed] = 2
    out = sample(
        exact_denoise_fn,
        jax.random.key(1),
        tokens,
        mask_id=MASK,
        steps=LENGTH,
        method="threshold",
        threshold=0.3,
        block_length=1,
    )
    got = np.asarray(out.tokens)
    if fixed is None:
        assert int(out.n_calls) == LENGTH
        assert_distribution(got, JOINT, SEQS)
    else:
        assert int(out.n_calls) == LENGTH - 1 and (got[:, fixed] == 2).all()
        keep, free = SEQS[:, fixed] == 2, [0, 2]
        assert_distribution(got[:, free], JOINT[keep] / JOINT[keep].sum(), SEQS[keep][:, free])


@pytest.mark.parametrize("threshold", [0.95, 0.8, 0.6, 0.45, 0.2])
def test_calls_follow_the_threshold(threshold):
    # Fake logits do not depend on the input, so at temperature 0 the first call reveals
    # every masked position with confidence above the threshold (at least the planned one),
    # and each later call the plan's count; with 12 steps for <= 11 masks that is one.
    tokens = fake_input()
    out = run(tokens, threshold=threshold)
    masked = tokens == MASK_FAKE
    got = np.asarray(out.tokens)
    np.testing.assert_array_equal(got, np.where(masked, TARGET[None, :], tokens))
    assert (got[~masked] == tokens[~masked]).all()  # fixed tokens never change
    reveal = np.asarray(out.trajectory.reveal_step)
    for b in range(len(tokens)):
        m = masked[b]
        first_step = reveal[b][m].min()
        above = m & (CONF > threshold)
        top = np.argmax(np.where(m, CONF, -1))
        first = above.copy()
        first[top] = True
        np.testing.assert_array_equal(reveal[b] == first_step, first)
        want = 1 + m.sum() - first.sum()
        assert int(calls_per_row(reveal)[b]) == want
    assert int(out.n_calls) == int(np.max(calls_per_row(reveal)))


def test_fewer_calls_at_lower_thresholds():
    tokens = fake_input()
    calls = [int(run(tokens, threshold=t).n_calls) for t in (0.99, 0.7, 0.5, 0.1)]
    assert calls[0] > calls[1] > calls[2] > calls[3] == 1, calls


def test_blocks_left_to_right_with_early_finish():
    # Blocks of 4 over 12 steps (3 a block): a confident block is done in one call and its
    # other steps are skipped; no block starts before the one before it is done.
    tokens = fake_input()
    out = run(tokens, threshold=0.5, block_length=4)
    masked = tokens == MASK_FAKE
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(masked, TARGET[None, :], tokens))
    reveal = np.asarray(out.trajectory.reveal_step)
    np.testing.assert_array_equal(
        (reveal // 4)[masked], np.broadcast_to(np.arange(12) // 4, tokens.shape)[masked]
    )
    calls = np.asarray(calls_per_row(reveal))
    for b in range(len(tokens)):
        want = 0
        for blk in range(3):
            m = masked[b] & (np.arange(12) // 4 == blk)
            if m.any():
                want += 1 + m.sum() - max(1, (m & (CONF > 0.5)).sum())
        assert calls[b] == want


def test_threshold_is_checked():
    with pytest.raises(ValueError, match="threshold=0.0: must be a finite number in \\(0, 1\\]"):
        sampling.check_settings(method="threshold", steps=8, threshold=0.0)
    with pytest.raises(ValueError, match="--threshold=1.5"):
        sampling.check_settings(
            method="threshold", steps=8, threshold=1.5, names={"threshold": "--threshold"}
        )
