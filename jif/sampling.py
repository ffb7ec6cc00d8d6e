"""Sampling from a masked diffusion model: MDLM ancestral steps, logit caching, confidence orders.

Everything here is written against a denoiser

    denoise_fn(tokens int32 [B, L]) -> logits [B, L, V]

that predicts the clean tokens from a partly masked sequence (`jif.model.make_denoise_fn`).
`tokens` holds `mask_id` wherever a token is generated and fixed tokens elsewhere, so
unconditional generation, prompts and infilling are one call. Fixed tokens never change.

A sampler is two parts, chosen through the `METHODS` registry:
  * a plan, drawn before the first network call, that fixes how many tokens each step reveals:
    - "ancestral" (MDLM): on the log-linear schedule alpha_t = 1 - (1 - eps) t a masked token
      survives a step t -> s with probability (1 - alpha_s) / (1 - alpha_t), independently of
      the network's prediction, so each token's reveal step can be drawn up front; the last
      step is a final denoising step that reveals whatever is still masked;
    - "expected" (LLaDA, Dream): each step reveals the expected number of tokens under the
      schedule, floor(m (S - i) / S) - floor(m (S - i - 1) / S) of the m masked tokens;
  * a score that says which masked tokens an "expected" step reveals: highest probability of
    the sampled token ("confidence"), largest top-2 margin, lowest entropy, or at random.

Steps that reveal nothing change nothing, so they need no network call. "ddpm" calls the
network at every step like the original; the other methods only at steps that reveal
something, each row at its own next such step (rows are independent), so "ddpm_cache" makes
at most min(steps + 1, L) calls and gives exactly the samples "ddpm" gives for the same key.
The whole loop is one `jax.lax.while_loop` inside one jitted program.

Token values come from Gumbel-max on the filtered, temperature-scaled logits. The mask logit
is never sampled. For the methods whose choice of positions does not depend on the sampled
value, each position gets one Gumbel draw for the whole run (it is revealed once, and its
noise comes from a counter-based stream keyed by position, see `jif.draw`), which is
what makes "ddpm" and "ddpm_cache" agree sample for sample; they also draw tokens only at
the positions being revealed, so a cached call costs little more than the network itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jif import diffusion, draw

T_MIN = 1e-5  # last time of the ancestral grid before the final denoising step (MDLM's choice)

DenoiseFn = Callable[..., jax.Array]


class Trajectory(NamedTuple):
    """Enough to replay every frame of a run (see `replay`).

    reveal_step: int32 [B, L], the step at which each position was revealed; -1 for fixed tokens.
    prob: float32 [B, L], probability of the chosen token under the distribution it was drawn
        from (after temperature, top-k, top-p); 1 for fixed tokens.
    counts: int32 [B, n_steps], number of tokens revealed at each step.

    Frames count steps done: frame 0 is the input, frame n_steps the final tokens, and a
    token revealed at step s first shows in frame s + 1 (`first_frame`).
    """

    reveal_step: jax.Array
    prob: jax.Array
    counts: jax.Array

    @property
    def n_steps(self) -> int:
        """Number of steps of the run (the last frame)."""
        return int(np.shape(self.counts)[1])


class SampleResult(NamedTuple):
    """tokens: int32 [B, L] with no mask left; n_calls: network calls (int32 scalar)."""

    tokens: jax.Array
    n_calls: jax.Array
    trajectory: Trajectory | None


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


# ----------------------------------------------------------------------------- scores


def score_confidence(logits, chosen_logp, rand) -> jax.Array:
    """Probability of the sampled token, [B, L]."""
    return jnp.exp(chosen_logp)


def score_margin(logits, chosen_logp, rand) -> jax.Array:
    """Top-1 minus top-2 probability, [B, L], from logits [B, L, V] (any offset): three
    vectorised reductions (lax.top_k and a full softmax are slow on CPU)."""
    top1 = jnp.max(logits, axis=-1, keepdims=True)
    z = jnp.sum(jnp.exp(logits - top1), axis=-1)
    second = jnp.max(jnp.where(logits == top1, -jnp.inf, logits), axis=-1)
    second = jnp.where(jnp.sum(logits == top1, axis=-1) > 1, top1[..., 0], second)
    return (1.0 - jnp.exp(second - top1[..., 0])) / z


def score_entropy(logits, chosen_logp, rand) -> jax.Array:
    """Negative entropy sum_v p log p (lowest entropy first), [B, L], from logits [B, L, V]:
    with e = exp(l - max), Z = sum e, it is sum(e (l - max)) / Z - log Z."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(shifted)
    z = jnp.sum(e, axis=-1)
    return jnp.sum(jnp.where(e > 0, e * shifted, 0.0), axis=-1) / z - jnp.log(z)


def score_random(logits, chosen_logp, rand) -> jax.Array:
    """Uniform random order, [B, L]."""
    return rand


class Method(NamedTuple):
    """planner: a key of PLANNERS. score: which positions an "expected" step reveals (None for
    ancestral). score_uses_logits: the score reads the predicted distribution.
    score_uses_sample: the score reads the sampled token, so every masked position is drawn
    at every call, with fresh noise (a position passed over must not keep the draw it was
    passed over for); otherwise the positions are chosen first and tokens drawn only there.
    every_step: call the network at every step, even one that reveals nothing. cached:
    reuses logits across steps (refused for noise-conditioned denoisers)."""

    planner: str
    score: Callable | None = None
    score_uses_logits: bool = False
    score_uses_sample: bool = False
    every_step: bool = False
    cached: bool = False


METHODS: dict[str, Method] = {
    "ddpm": Method("ancestral", every_step=True),
    "ddpm_cache": Method("ancestral", cached=True),
    "confidence": Method(
        "expected", score_confidence, score_uses_logits=True, score_uses_sample=True
    ),
    "margin": Method("expected", score_margin, score_uses_logits=True),
    "entropy": Method("expected", score_entropy, score_uses_logits=True),
    "random": Method("expected", score_random),
}


# ----------------------------------------------------------------------------- the loop

GATHER = 8  # positions per row drawn at once when the positions are known before the draw


class _State(NamedTuple):
    tokens: jax.Array  # int32 [B, L]
    step: jax.Array  # int32 [B], each row's current step (n_steps when done)
    reveal_step: jax.Array  # int32 [B, L]
    prob: jax.Array  # float32 [B, L]
    n_calls: jax.Array  # int32 []


@functools.partial(
    jax.jit,
    static_argnames=(
        "denoise_fn",
        "mask_id",
        "steps",
        "method",
        "use_top_p",
        "top_k",
        "block_length",
        "return_trajectory",
        "time_conditioned",
    ),
)
def _sample(
    denoise_fn,
    key,
    tokens,
    *,
    mask_id,
    steps,
    method,
    temperature,
    top_p,
    use_top_p,
    top_k,
    block_length,
    return_trajectory,
    time_conditioned,
):
    spec = METHODS[method]
    planner = PLANNERS[spec.planner]
    batch, length = tokens.shape
    n_blocks = -(-length // block_length)
    block_id = jnp.arange(length, dtype=jnp.int32) // block_length
    k_plan, k_noise = jax.random.split(key)
    masked0 = tokens == mask_id
    plan = planner.plan(k_plan, masked0, block_id, n_blocks, steps // n_blocks)
    rows = jnp.arange(batch)[:, None]
    filt = functools.partial(
        draw.filter_logits,
        mask_id=mask_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_top_p=use_top_p,
    )

    def call(tokens, step):
        if time_conditioned:
            return denoise_fn(tokens, planner.mask_rate(plan, tokens, step, mask_id))
        return denoise_fn(tokens)

    vocab = jax.eval_shape(call, tokens, jnp.zeros((batch,), jnp.int32)).shape[-1]
    seeds = jax.random.bits(k_noise, (batch, length), jnp.uint32)  # one noise stream a position

    def fill(raw, todo, tokens, prob):
        """Draw tokens at the positions `todo` [B, L] only, GATHER per row at a time."""

        def chunk(carry):
            tokens, prob, todo = carry
            idx = jnp.argsort(~todo, axis=1, stable=True)[:, :GATHER]  # todo positions first
            take = jnp.take_along_axis(todo, idx, axis=1)
            logits = filt(jnp.take_along_axis(raw, idx[..., None], axis=1))
            noise = draw.gumbel_from_bits(
                draw.noise_bits(jnp.take_along_axis(seeds, idx, 1), vocab)
            )
            chosen, chosen_logp = draw.gumbel_max(logits, noise, temperature)
            old = jnp.take_along_axis(tokens, idx, axis=1)
            tokens = tokens.at[rows, idx].set(jnp.where(take, chosen, old))
            if return_trajectory:
                p = jnp.where(take, jnp.exp(chosen_logp), jnp.take_along_axis(prob, idx, 1))
                prob = prob.at[rows, idx].set(p)
            return tokens, prob, todo.at[rows, idx].set(False)

        tokens, prob, _ = jax.lax.while_loop(lambda c: jnp.any(c[2]), chunk, (tokens, prob, todo))
        return tokens, prob

    def body(state: _State) -> _State:
        masked = state.tokens == mask_id
        raw = call(state.tokens, state.step)
        if spec.score_uses_sample:  # draw everywhere, then choose where to keep the draw
            noise = draw.gumbel_from_bits(draw.noise_bits(seeds, vocab, state.n_calls + 1))
            chosen, chosen_logp = draw.gumbel_max(filt(raw), noise, temperature)
            score = spec.score(None, chosen_logp, plan.rand)
            reveal = planner.choose(plan, masked, state.step, block_id, score)
            tokens = jnp.where(reveal, chosen, state.tokens)
            prob = jnp.where(reveal, jnp.exp(chosen_logp), state.prob)
        else:  # choose the positions first, then draw only there (one draw per position)
            logits = filt(raw) if spec.score_uses_logits else None
            score = spec.score(logits, None, plan.rand) if spec.score else None
            reveal = planner.choose(plan, masked, state.step, block_id, score)
            tokens, prob = fill(raw, reveal, state.tokens, state.prob)
        if spec.every_step:
            step = state.step + 1
        else:
            step = planner.next_step(plan, tokens == mask_id, state.step + 1)
        return _State(
            tokens=tokens,
            step=step,
            reveal_step=jnp.where(reveal, state.step[:, None], state.reveal_step),
            prob=prob,
            n_calls=state.n_calls + 1,
        )

    if spec.every_step:
        step0 = jnp.zeros((batch,), jnp.int32)
    else:
        step0 = planner.next_step(plan, masked0, jnp.zeros((batch,), jnp.int32))
    state = _State(
        tokens=tokens,
        step=step0,
        reveal_step=jnp.full((batch, length), -1, jnp.int32),
        prob=jnp.ones((batch, length), jnp.float32),
        n_calls=jnp.zeros((), jnp.int32),
    )
    state = jax.lax.while_loop(lambda s: jnp.any(s.step < plan.n_steps), body, state)
    trajectory = None
    if return_trajectory:
        where = jnp.where(state.reveal_step >= 0, state.reveal_step, plan.n_steps)
        counts = jnp.zeros((batch, plan.n_steps), jnp.int32)
        counts = counts.at[jnp.broadcast_to(rows, where.shape), where].add(1, mode="drop")
        trajectory = Trajectory(state.reveal_step, state.prob, counts)
    return SampleResult(state.tokens, state.n_calls, trajectory)


def sample(
    denoise_fn: DenoiseFn,
    key: jax.Array,
    tokens,
    *,
    mask_id: int,
    steps: int = 500,
    method: str = "ddpm_cache",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    block_length: int | None = None,
    return_trajectory: bool = False,
    time_conditioned: bool = False,
) -> SampleResult:
    """Generate every `mask_id` position of `tokens` (int32 [B, L]); other tokens stay fixed.

    denoise_fn: tokens int32 [B, L] -> logits [B, L, V] (rows must not interact), or with
        time_conditioned=True, (tokens, mask_rate float32 [B]) -> logits, where mask_rate is
        1 - alpha_t of the current step ("ddpm" only; refused for "ddpm_cache").
    steps: total steps (split evenly over the blocks; "ddpm" adds a final denoising step per
        block). method: a key of METHODS. temperature: 0 is argmax. top_p: nucleus mass in
        (0, 1]. top_k: keep the k most likely tokens (0 keeps all). block_length: generate
        blocks of this many positions left to right (semi-autoregressive), None for one block.
    Returns SampleResult(tokens [B, L], n_calls, trajectory or None). Compiled once per
    denoise_fn object, shape, method, steps, block_length, top_k, top_p < 1 and
    return_trajectory; temperature and the top_p value change without recompiling.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {sorted(METHODS)}.")
    if time_conditioned and METHODS[method].cached:
        raise ValueError(
            f"method={method!r} reuses logits across steps, which is only valid for a denoiser "
            "that is not conditioned on the noise level (it may depend on the tokens only); "
            "use method='ddpm' for a noise-conditioned denoiser."
        )
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}.")
    length = tokens.shape[1]
    block_length = length if block_length is None else int(block_length)
    if not 1 <= block_length:
        raise ValueError(f"block_length={block_length} must be a positive number of positions.")
    n_blocks = -(-length // block_length)
    if steps < 1 or steps % n_blocks:
        raise ValueError(
            f"steps={steps} must be a positive multiple of the number of blocks ({n_blocks} "
            f"blocks of {block_length} in length {length}); "
            f"e.g. steps={n_blocks * max(1, steps // n_blocks)}."
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is argmax).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 keeps every token).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token).")
    return _sample(
        denoise_fn,
        key,
        tokens,
        mask_id=int(mask_id),
        steps=int(steps),
        method=method,
        temperature=jnp.float32(temperature),
        top_p=jnp.float32(top_p),
        use_top_p=bool(top_p < 1.0),
        top_k=int(top_k),
        block_length=block_length,
        return_trajectory=bool(return_trajectory),
        time_conditioned=bool(time_conditioned),
    )


def first_frame(trajectory: Trajectory) -> np.ndarray:
    """The first frame that shows each position, int32 [B, L]: 0 for fixed tokens, s + 1 for
    a token revealed at step s."""
    return np.asarray(trajectory.reveal_step, np.int32) + 1


def replay(trajectory: Trajectory, final_tokens, step: int, mask_id: int) -> np.ndarray:
    """Frame after `step` steps, int32 [B, L]: step 0 is the input, n_steps the final tokens."""
    shown = first_frame(trajectory) <= step
    return np.where(shown, np.asarray(final_tokens), mask_id).astype(np.int32)


def expected_calls(steps: int, length: int) -> float:
    """Expected network calls of "ddpm_cache" for one row of `length` masks: the expected
    number of distinct reveal steps among steps + 1, sum_i 1 - (1 - p_i)^length."""
    grid = ancestral_grid(steps)
    p = np.append(grid[:-1] - grid[1:], grid[-1])
    return float(np.sum(1.0 - (1.0 - p) ** length))


__all__ = [
    "METHODS",
    "PLANNERS",
    "SampleResult",
    "Trajectory",
    "expected_calls",
    "first_frame",
    "replay",
    "sample",
]
