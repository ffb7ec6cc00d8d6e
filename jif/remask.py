"""ReMDM remasking samplers (Wang et al. 2025): revealed tokens can be masked again.

MDLM's ancestral step t -> s (alpha = 1 - t on the grid of `jif.plans.ancestral_grid`,
alpha_1 = 0) reveals a masked token with probability (alpha_s - alpha_t) / (1 - alpha_t) and
never touches a revealed one. ReMDM's step masks a revealed token again with probability
sigma and reveals a masked one with probability (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t),
drawn from the denoiser; for 0 <= sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t) each
token is still masked at s with probability 1 - alpha_s, as in MDLM, so late steps can undo
early mistakes without changing the schedule. Schedules of sigma (as in the authors' code):
  * "remdm_cap": sigma = min(eta, sigma_max), eta = `--eta` (default ETA = 0.02; the
    authors' scripts use 0.008 for 1024 tokens and 1024 steps, more remasking for our
    shorter texts and fewer steps);
  * "remdm_conf": sigma_i = softmax_i(-psi) sigma_max over the revealed tokens, psi_i the
    probability of token i when it was drawn: the least confident are remasked first. As
    in the authors' code, masked tokens are revealed as in MDLM (sigma = 0 for them), so
    remasking comes on top of the schedule; no eta.
Each block (`block_length`) runs `steps / n_blocks` such steps on its own positions, then a
final denoising step that reveals what is still masked (nothing is remasked there). Fixed
tokens (prompt, template) are never masked. The network is called at every step at which
some token changed since the last call and the logits are reused otherwise (exact for a
denoiser of the tokens alone; `jif.sampling` refuses noise-conditioned ones).

A token revealed several times keeps the step and probability of its last draw in the
trajectory, and `Outcome.remasked` counts the tokens masked again at each step (the app
replays when each final token appeared, and plots the remasks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jif import draw
from jif.plans import Outcome, ancestral_grid

ETA = 0.02  # remdm_cap's cap on the remasking probability per step


def _loop(
    key,
    tokens,
    *,
    schedule,
    denoise_fn,
    mask_id,
    steps,
    eta,
    temperature,
    top_p,
    use_top_p,
    top_k,
    block_length,
    **unused,
) -> Outcome:
    del unused
    batch, length = tokens.shape
    n_blocks = -(-length // block_length)
    spb = steps // n_blocks
    n_steps = n_blocks * (spb + 1)  # spb ReMDM steps and a final denoising step a block
    block_id = jnp.arange(length, dtype=jnp.int32) // block_length
    generated = tokens == mask_id  # the only positions that are ever drawn or remasked
    grid = jnp.asarray(ancestral_grid(spb), jnp.float32)  # t_0 = 1 > ... > t_spb
    k_noise, k_move = jax.random.split(key)
    seeds = jax.random.bits(k_noise, (batch, length), jnp.uint32)
    filt = functools.partial(
        draw.filter_logits,
        mask_id=mask_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_top_p=use_top_p,
    )
    first = denoise_fn(tokens)  # also the cache's initial value

    def body(step, state):
        tokens, raw, changed, reveal_step, prob, remasked, n_calls = state
        raw = jax.lax.cond(changed, lambda: denoise_fn(tokens), lambda: raw)
        n_calls = n_calls + changed.astype(jnp.int32)
        block, local = step // (spb + 1), step % (spb + 1)
        final = local == spb
        t = grid[jnp.minimum(local, spb - 1)]
        s = grid[jnp.minimum(local + 1, spb)]
        alpha_t, alpha_s = 1.0 - t, 1.0 - s
        sigma_max = jnp.where(alpha_t > 0, jnp.minimum(1.0, (1.0 - alpha_s) / alpha_t), 1.0)
        here = generated & (block_id == block)[None, :]
        masked = tokens == mask_id
        shown = here & ~masked
        if schedule == "cap":
            sigma = jnp.full((batch, length), jnp.minimum(eta, sigma_max))
            sigma_masked = sigma
        else:  # conf: softmax of minus the reveal probability over the shown tokens
            w = jax.nn.softmax(jnp.where(shown, -prob, -jnp.inf), axis=1)
            sigma = jnp.where(shown, jnp.nan_to_num(w) * sigma_max, 0.0)
            sigma_masked = jnp.zeros_like(sigma)
        sigma = jnp.where(final, 0.0, sigma)
        reveal_p = (alpha_s - (1.0 - sigma_masked) * alpha_t) / (1.0 - alpha_t)
        reveal_p = jnp.where(final, 1.0, reveal_p)
        u = jax.random.uniform(jax.random.fold_in(k_move, step), (batch, length))
        reveal = here & masked & (u < reveal_p)
        remask = shown & (u < sigma)
        noise = draw.gumbel_from_bits(draw.noise_bits(seeds, raw.shape[-1], step + 1))
        chosen, logp = draw.gumbel_max(filt(raw), noise, temperature)
        tokens = jnp.where(reveal, chosen, jnp.where(remask, mask_id, tokens))
        return (
            tokens,
            raw,
            jnp.any(reveal | remask),
            jnp.where(reveal, step, jnp.where(remask, -1, reveal_step)),
            jnp.where(reveal, jnp.exp(logp), prob),
            remasked.at[:, step].set(jnp.sum(remask, axis=1, dtype=jnp.int32)),
            n_calls,
        )

    state = (
        tokens,
        first,
        jnp.array(False),
        jnp.full((batch, length), -1, jnp.int32),
        jnp.ones((batch, length), jnp.float32),
        jnp.zeros((batch, n_steps), jnp.int32),
        jnp.ones((), jnp.int32),
    )
    tokens, _, _, reveal_step, prob, remasked, n_calls = jax.lax.fori_loop(0, n_steps, body, state)
    return Outcome(tokens, n_calls, reveal_step, prob, n_steps, remasked)


loop_cap = functools.partial(_loop, schedule="cap")
loop_conf = functools.partial(_loop, schedule="conf")
