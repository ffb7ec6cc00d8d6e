"""Reveal plans of the samplers: before the first network call, when each position is revealed.

`jif.sampling` chooses a plan through the `PLANNERS` registry; a Planner is four functions:
  * plan: drawn up front, fixes how many tokens each step reveals;
    - "ancestral" (MDLM): on the log-linear schedule alpha_t = 1 - (1 - eps) t a masked token
      survives a step t -> s with probability (1 - alpha_s) / (1 - alpha_t), independently of
      the network's prediction, so each token's reveal step can be drawn up front; the last
      step is a final denoising step that reveals whatever is still masked;
    - "expected" (LLaDA, Dream): each step reveals the expected number of tokens under the
      schedule, floor(m (S - i) / S) - floor(m (S - i - 1) / S) of the m masked tokens;
  * next_step: each row's next step that reveals something (steps that reveal nothing need
    no network call);
  * choose: the positions a step reveals (for "expected", the highest-scoring ones);
  * mask_rate: the noise level a noise-conditioned denoiser is told at a step.
Shapes: B rows of L positions; masked bool [B, L]; block_id int32 [L].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jif import diffusion

T_MIN = 1e-5  # last time of the ancestral grid before the final denoising step (MDLM's choice)


# ----------------------------------------------------------------------------- plans


class Plan(NamedTuple):
    """What a plan fixes before the first network call.

    n_steps: number of steps (static). planned: int32 [B, L] reveal step of each position
    (ancestral) or None. counts: int32 [B, n_steps] tokens to reveal per step (expected) or
    None. steps_per_block: step indices per block (static). rand: float32 [B, L] uniform draws
    (used by the random order).
    """

    n_steps: int
    steps_per_block: int
    planned: jax.Array | None
    counts: jax.Array | None
    rand: jax.Array


class Outcome(NamedTuple):
    """What a sampler loop returns (`jif.sampling` makes the SampleResult and trajectory).

    tokens int32 [B, L]; n_calls int32 [] network calls; reveal_step int32 [B, L] (the step
    of each position's last draw, -1 for fixed tokens); prob float32 [B, L] of that draw;
    n_steps: number of steps (static); remasked: int32 [B, n_steps] tokens masked again per
    step, or None for samplers that never remask.
    """

    tokens: jax.Array
    n_calls: jax.Array
    reveal_step: jax.Array
    prob: jax.Array
    n_steps: int
    remasked: jax.Array | None = None


def ancestral_grid(steps: int) -> np.ndarray:
    """Times t_0 = 1 > t_1 > ... > t_steps = T_MIN of the ancestral steps, float64 [steps + 1]."""
    return 1.0 - np.arange(steps + 1) * (1.0 - T_MIN) / steps


def plan_ancestral(key, masked, block_id, n_blocks: int, spb: int) -> Plan:
    """Draw every masked token's reveal step (MDLM ancestral sampling, per block).

    In block j, local step i < spb moves t_i -> t_{i+1}; local step spb is the final
    denoising step. A token masked at t_0 = 1 is still masked after step i with probability
    (1 - alpha_{t_{i+1}}) / (1 - alpha_1) = t_{i+1}, so its local reveal step is the number of
    grid times t_1..t_spb that are >= u, u ~ U(0, 1).
    masked: bool [B, L]; block_id: int32 [L].
    """
    u = jax.random.uniform(key, masked.shape)
    survive = jnp.asarray(ancestral_grid(spb)[1:], jnp.float32)  # decreasing, [spb]
    local = jnp.searchsorted(-survive, -u, side="right").astype(jnp.int32)
    planned = jnp.where(masked, block_id[None, :] * (spb + 1) + local, -1)
    rand = jax.random.uniform(jax.random.fold_in(key, 1), masked.shape)
    return Plan(n_blocks * (spb + 1), spb + 1, planned, None, rand)


def plan_expected(key, masked, block_id, n_blocks: int, spb: int) -> Plan:
    """Reveal the expected number of tokens per step: of m masked tokens in a block,
    floor(m (spb - i) / spb) are still masked after local step i (linear in t, log-linear
    schedule), so step i reveals the difference. Returns counts int32 [B, n_blocks * spb]."""
    per_block = jax.nn.one_hot(block_id, n_blocks, dtype=jnp.int32)  # [L, n_blocks]
    m = masked.astype(jnp.int32) @ per_block  # [B, n_blocks]
    i = jnp.arange(spb + 1)
    remaining = (m[:, :, None] * (spb - i)) // spb  # [B, n_blocks, spb + 1]
    counts = (remaining[:, :, :-1] - remaining[:, :, 1:]).reshape(m.shape[0], n_blocks * spb)
    rand = jax.random.uniform(key, masked.shape)
    return Plan(n_blocks * spb, spb, None, counts, rand)


# ----------------------------------------------------------------------------- step choice


def next_step_ancestral(plan: Plan, masked, cursor) -> jax.Array:
    """Each row's next step with a planned reveal, int32 [B] (n_steps when none)."""
    return jnp.min(jnp.where(masked, plan.planned, plan.n_steps), axis=1)


def next_step_expected(plan: Plan, masked, cursor) -> jax.Array:
    """Each row's first step >= cursor [B] that reveals something, int32 [B] (n_steps if none)."""
    ok = (jnp.arange(plan.n_steps)[None, :] >= cursor[:, None]) & (plan.counts > 0)
    return jnp.where(ok.any(axis=1), jnp.argmax(ok, axis=1), plan.n_steps).astype(jnp.int32)


def choose_ancestral(plan: Plan, masked, step, block_id, score) -> jax.Array:
    """Positions revealed at `step` [B]: those planned for it. Returns bool [B, L]."""
    return masked & (plan.planned == step[:, None])


def choose_expected(plan: Plan, masked, step, block_id, score) -> jax.Array:
    """The counts[b, step_b] highest-scoring masked positions of the step's block, bool [B, L]."""
    n = jnp.take_along_axis(plan.counts, jnp.minimum(step, plan.n_steps - 1)[:, None], axis=1)
    n = jnp.where(step[:, None] < plan.n_steps, n, 0)
    eligible = masked & (block_id[None, :] == (step // plan.steps_per_block)[:, None])
    score = jnp.where(eligible, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1, stable=True)
    return eligible & (rank < n)


def time_ancestral(plan: Plan, tokens, step, mask_id) -> jax.Array:
    """Noise level 1 - alpha_t [B] at each row's step (for noise-conditioned denoisers)."""
    grid = jnp.asarray(ancestral_grid(plan.steps_per_block - 1), jnp.float32)
    return diffusion.mask_rate(grid[jnp.minimum(step % plan.steps_per_block, grid.shape[0] - 1)])


def time_expected(plan: Plan, tokens, step, mask_id) -> jax.Array:
    """Fraction of masked tokens per row [B] (the schedule's target noise level)."""
    return jnp.mean(tokens == mask_id, axis=1, dtype=jnp.float32)


class Planner(NamedTuple):
    plan: Callable[..., Plan]
    next_step: Callable[..., jax.Array]
    choose: Callable[..., jax.Array]
    mask_rate: Callable[..., jax.Array]


PLANNERS: dict[str, Planner] = {
    "ancestral": Planner(plan_ancestral, next_step_ancestral, choose_ancestral, time_ancestral),
    "expected": Planner(plan_expected, next_step_expected, choose_expected, time_expected),
}


# ----------------------------------------------------------------------------- network calls


def call_denoiser(denoise_fn, tokens, mask_rate=None, pred=None):
    """The denoiser's output for `tokens`: given the noise level where one is passed (a
    noise-conditioned denoiser), and `pred` as its prediction input where one is passed
    (self_condition="previous"; None: "fresh")."""
    args = (tokens,) if mask_rate is None else (tokens, mask_rate)
    return denoise_fn(*args) if pred is None else denoise_fn(*args, prediction=pred)


def next_prediction(raw: jax.Array) -> jax.Array:
    """The prediction a "previous" call passes on: the network's distribution, float32."""
    return jax.nn.softmax(raw.astype(jnp.float32), axis=-1)
