"""Confidence-threshold parallel decoding (Fast-dLLM, Wu et al. 2025) and the loop it shares.

"threshold" follows the "confidence" sampler's plan (`jif.plans.plan_expected`: the expected
number of reveals per step, positions of the current block ranked by the probability of
their sampled token) and reveals, at each step, that many tokens plus every other masked
position of the block whose sampled token has probability above `threshold`. A step never
reveals fewer than "confidence" would, so a block is done by its last step at the latest;
once it is done its remaining steps are skipped, so the number of network calls adapts to
the text: at most min(steps, masked tokens), fewer the more confident the model is. At
threshold 1 nothing passes and it gives exactly the samples of "confidence" for the same key.

`expected_loop` is the loop both this and `jif.interference` run: one network call per step
that reveals something, every masked position drawn at each call with fresh counter-based
noise (`jif.draw.noise_bits`, as "confidence" draws), the positions kept chosen by a
function of the draw's log-probabilities. Rows are independent; each skips to its own next
step. The denoiser may return logits or (logits, per-position vectors [B, L, k]); the
vectors go to the chooser (jif.interference's probe embeddings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jif import draw
from jif.plans import (
    Outcome,
    Plan,
    call_denoiser,
    choose_expected,
    next_prediction,
    plan_expected,
)

THRESHOLD = 0.9  # Fast-dLLM's default confidence threshold


def _split(out):
    """(logits, extra or None) from a denoiser's output."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def expected_loop(
    key,
    tokens,
    choose: Callable,
    *,
    denoise_fn,
    mask_id,
    steps,
    temperature,
    top_p,
    use_top_p,
    top_k,
    block_length,
    return_trajectory,
    time_conditioned,
    self_condition="fresh",
    **unused,
) -> Outcome:
    """The loop of the "expected"-plan samplers with their own choice of positions.

    choose(plan, masked, step, block_id, logp, extra) -> bool [B, L], the positions a step
    keeps: masked bool [B, L]; step int32 [B]; logp float32 [B, L], log-probability of each
    position's draw; extra: the denoiser's second output or None. Keys, plan and noise are
    those of `jif.sampling._sample` for "confidence", so equal choices give equal samples.
    """
    del unused, return_trajectory  # prob is cheap here: always kept
    batch, length = tokens.shape
    n_blocks = -(-length // block_length)
    spb = steps // n_blocks
    block_id = jnp.arange(length, dtype=jnp.int32) // block_length
    k_plan, k_noise = jax.random.split(key)
    masked0 = tokens == mask_id
    plan = plan_expected(k_plan, masked0, block_id, n_blocks, spb)
    filt = functools.partial(
        draw.filter_logits,
        mask_id=mask_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_top_p=use_top_p,
    )
    step_block = jnp.arange(plan.n_steps) // spb  # [S]
    in_block = jax.nn.one_hot(block_id, n_blocks, dtype=jnp.int32)  # [L, n_blocks]

    previous = self_condition == "previous"

    def call(tokens, pred):
        rate = jnp.mean(tokens == mask_id, axis=1, dtype=jnp.float32) if time_conditioned else None
        return call_denoiser(denoise_fn, tokens, rate, pred)

    vocab = jax.eval_shape(lambda t: _split(call(t, None))[0], tokens).shape[-1]
    seeds = jax.random.bits(k_noise, (batch, length), jnp.uint32)

    def next_step(masked, cursor):
        """Each row's first step >= cursor with a planned reveal in a block that still has
        masks, int32 [B] (n_steps when none)."""
        open_block = (masked.astype(jnp.int32) @ in_block) > 0  # [B, n_blocks]
        ok = jnp.arange(plan.n_steps)[None, :] >= cursor[:, None]
        ok &= (plan.counts > 0) & open_block[:, step_block]
        return jnp.where(ok.any(axis=1), jnp.argmax(ok, axis=1), plan.n_steps).astype(jnp.int32)

    def body(state):
        tokens, step, reveal_step, prob, n_calls, pred = state
        masked = tokens == mask_id
        raw, extra = _split(call(tokens, pred))
        noise = draw.gumbel_from_bits(draw.noise_bits(seeds, vocab, n_calls + 1))
        chosen, logp = draw.gumbel_max(filt(raw), noise, temperature)
        reveal = choose(plan, masked, step, block_id, logp, extra) & masked
        reveal &= (step < plan.n_steps)[:, None]
        return (
            jnp.where(reveal, chosen, tokens),
            next_step(masked & ~reveal, step + 1),
            jnp.where(reveal, step[:, None], reveal_step),
            jnp.where(reveal, jnp.exp(logp), prob),
            n_calls + 1,
            next_prediction(raw) if previous else None,
        )

    state = (
        tokens,
        next_step(masked0, jnp.zeros((batch,), jnp.int32)),
        jnp.full((batch, length), -1, jnp.int32),
        jnp.ones((batch, length), jnp.float32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch, length, vocab), jnp.float32) if previous else None,
    )
    tokens, _, reveal_step, prob, n_calls, _ = jax.lax.while_loop(
        lambda s: jnp.any(s[1] < plan.n_steps), body, state
    )
    return Outcome(tokens, n_calls, reveal_step, prob, plan.n_steps)


def choose_threshold(plan: Plan, masked, step, block_id, logp, threshold) -> jax.Array:
    """The step's planned count of most confident positions of its block (as "confidence"),
    and every other one there whose draw has probability above `threshold`. bool [B, L]."""
    score = jnp.exp(logp)
    eligible = masked & (block_id[None, :] == (step // plan.steps_per_block)[:, None])
    return choose_expected(plan, masked, step, block_id, score) | (eligible & (score > threshold))


def loop(key, tokens, *, threshold, **settings) -> Outcome:
    """The "threshold" sampler (a `jif.sampling.Method.loop`)."""
    choose = lambda plan, masked, step, block_id, logp, extra: choose_threshold(
        plan, masked, step, block_id, logp, threshold
    )
    return expected_loop(key, tokens, choose, **settings)


def calls_per_row(reveal_step) -> jax.Array:
    """Network calls each row took, int32 [B]: its distinct reveal steps (a row is called
    only at steps that reveal something). reveal_step: a Trajectory's, int32 [B, L]."""
    r = jnp.sort(jnp.asarray(reveal_step), axis=1)
    new = (r[:, 1:] != r[:, :-1]) & (r[:, 1:] >= 0)
    return (jnp.sum(new, axis=1) + (r[:, 0] >= 0)).astype(jnp.int32)
