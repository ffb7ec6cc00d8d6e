"""ReMDM remasking samplers against denoisers whose right answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import (
    CONF,
    JOINT,
    LENGTH,
    MASK,
    MASK_FAKE,
    N_VOCAB,
    SEQS,
    TARGET,
    UNCOND,
    assert_distribution,
    exact_denoise_fn,
    fake_denoise_fn,
    fake_input,
)

from jif.sampling import first_frame, replay, sample

# Independent tokens: the denoiser's per-position marginals are the exact joint posterior,
# so ReMDM with any sigma <= sigma_max keeps every step's marginals and is exact at any
# number of steps (the correlated JOINT is exact only as steps grow, as for MDLM).
MARGINALS = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.45, 0.1, 0.45]])
PRODUCT = np.prod(MARGINALS[np.arange(LENGTH), SEQS], axis=1)


def independent_denoise_fn(tokens):
    logits = jnp.log(jnp.asarray(MARGINALS, jnp.float32))
    logits = jnp.concatenate([logits, jnp.full((LENGTH, 1), 50.0)], axis=-1)  # mask: never
    return jnp.broadcast_to(logits, tokens.shape + (N_VOCAB + 1,))


def remdm(fn, tokens, mask, method="remdm_cap", **kw):
    kw = {"steps": 8, "return_trajectory": True, **kw}
    return sample(fn, jax.random.key(kw.pop("seed", 0)), tokens, mask_id=mask, method=method, **kw)


@pytest.mark.parametrize("block_length", [None, 2])
def test_cap_is_exact_for_independent_tokens(block_length):
    # eta = 1: sigma = sigma_max, as much remasking as the schedule allows.
    out = remdm(independent_denoise_fn, UNCOND, MASK, eta=1.0, steps=6, block_length=block_length)
    assert_distribution(np.asarray(out.tokens), PRODUCT, SEQS)
    assert np.asarray(out.trajectory.remasked).sum() > len(UNCOND)  # remasked a lot


def test_cap_reproduces_correlated_joint_with_many_steps():
    out = remdm(exact_denoise_fn, UNCOND, MASK, eta=0.01, steps=500, seed=1)
    assert_distribution(np.asarray(out.tokens), JOINT, SEQS)
    assert np.asarray(out.trajectory.remasked).sum() > 0.2 * len(UNCOND)


@pytest.mark.parametrize("method", ["remdm_cap", "remdm_conf"])
def test_fixed_tokens_and_trajectory(method):
    tokens = fake_input(64)
    masked = tokens == MASK_FAKE
    out = remdm(fake_denoise_fn, tokens, MASK_FAKE, method, eta=0.5, steps=12, temperature=1.0)
    got, traj = np.asarray(out.tokens), out.trajectory
    assert (got != MASK_FAKE).all()
    np.testing.assert_array_equal(got[~masked], tokens[~masked])  # fixed tokens never change
    assert traj.n_steps == 13 and np.asarray(traj.remasked).sum() > 0
    remasked = np.asarray(traj.remasked)
    assert remasked[:, 0].sum() == 0 and remasked[:, -1].sum() == 0  # none shown yet / final
    assert (first_frame(traj)[~masked] == 0).all() and (first_frame(traj)[masked] >= 1).all()
    np.testing.assert_array_equal(replay(traj, got, traj.n_steps, MASK_FAKE), got)
    np.testing.assert_array_equal(np.asarray(traj.counts).sum(1), masked.sum(1))
    assert int(out.n_calls) <= traj.n_steps
    # at temperature 0 every draw is the argmax, so remasking changes nothing in the result
    cold = remdm(fake_denoise_fn, tokens, MASK_FAKE, method, eta=0.5, steps=12, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(cold.tokens), np.where(masked, TARGET, tokens))


def test_unchanged_steps_reuse_logits():
    # eta = 0 (no remasking): a call at the start and after every step that revealed
    # something, except the final one; 40 steps for 11 tokens leave many steps unchanged.
    out = remdm(fake_denoise_fn, fake_input()[:1], MASK_FAKE, eta=0.0, steps=40)
    changed = np.asarray(out.trajectory.counts)[0, :-1] > 0
    assert int(out.n_calls) == 1 + changed.sum() < 30


def test_conf_remasks_the_least_confident_first():
    # Fake logits: the target token has probability CONF, the 7 others share the rest, so
    # drawn non-targets have low confidence and remdm_conf remasks (and redraws) them first:
    # more targets survive than the CONF the plain schedule gives.
    # remdm_cap's remasking does not look at confidence: the same rate as plain MDLM.
    # (48,000 tokens: the standard error of a rate is 0.0022.)
    tokens = np.full((4000, len(CONF)), MASK_FAKE, np.int32)
    hit = lambda m, **kw: np.mean(
        np.asarray(remdm(fake_denoise_fn, tokens, MASK_FAKE, m, steps=128, **kw).tokens) == TARGET
    )
    plain = hit("remdm_cap", eta=0.0)  # eta 0: MDLM itself
    assert abs(plain - CONF.mean()) < 0.01 and abs(hit("remdm_cap", eta=0.05) - plain) < 0.01
    assert hit("remdm_conf") > plain + 0.009
