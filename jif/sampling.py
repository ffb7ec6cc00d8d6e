"""Sampling from a masked diffusion model: MDLM ancestral steps, logit caching, confidence orders.

Everything here is written against a denoiser

    denoise_fn(tokens int32 [B, L]) -> logits [B, L, V]

that predicts the clean tokens from a partly masked sequence (`jif.model.make_denoise_fn`).
`tokens` holds `mask_id` wherever a token is generated and fixed tokens elsewhere, so
unconditional generation, prompts and infilling are one call. Fixed tokens never change.

A sampler is two parts, chosen through the `METHODS` registry:
  * a plan (`jif.plans`), drawn before the first network call, that fixes how many tokens
    each step reveals: "ancestral" (MDLM: each token's reveal step drawn from the schedule,
    then a final denoising step) or "expected" (LLaDA, Dream: the expected number per step);
  * a score (`jif.draw`) that says which masked tokens an "expected" step reveals: highest
    probability of the sampled token ("confidence"), largest top-2 margin, lowest entropy,
    or at random.
Loops of their own: "threshold" (`jif.threshold`, Fast-dLLM), "remdm_cap"/"remdm_conf"
(`jif.remask`, ReMDM), "interference" (`jif.interference`, the seed write-up's idea).
Every setting is checked in one place, `check_settings`, which jif.sample, the app and
jif.eval call as well; compiled samplers are kept in a bounded cache (`MAX_COMPILED`).

Steps that reveal nothing change nothing, so they need no network call. "ddpm" calls the
network at every step like the original; the other methods only at steps that reveal
something, each row at its own next such step (rows are independent), so "ddpm_cache" makes
at most min(steps + 1, L) calls and gives exactly the samples "ddpm" gives for the same key.
The whole loop is one `jax.lax.while_loop` inside one jitted program.

A self-conditioned model (`--self-condition`) is conditioned, at each call, either on its own
first pass over the same tokens (self_condition="fresh": two passes a call, and the default)
or on the previous call's prediction ("previous", as Bit Diffusion samples: one pass a call;
the first call sees none). "previous" is refused for the methods that reuse logits across
steps (`cached`): there the conditioning input changes at every call, so a reused logit is
not the one the network would give.

Token values come from Gumbel-max on the filtered, temperature-scaled logits. The mask logit
is never sampled. For the methods whose choice of positions does not depend on the sampled
value, each position gets one Gumbel draw for the whole run (it is revealed once, and its
noise comes from a counter-based stream keyed by position, see `jif.draw`): "ddpm" and
"ddpm_cache" agree sample for sample, drawing only at the positions being revealed.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jif import draw, live
from jif.draw import score_confidence, score_entropy, score_margin, score_random
from jif.interference import loop as interference_loop
from jif.plans import (  # noqa: F401
    PLANNERS,
    T_MIN,
    Outcome,
    Plan,
    Planner,
    ancestral_grid,
    call_denoiser,
    next_prediction,
)
from jif.remask import ETA, loop_cap, loop_conf
from jif.threshold import THRESHOLD
from jif.threshold import loop as threshold_loop

DenoiseFn = Callable[..., jax.Array]


class Trajectory(NamedTuple):
    """Enough to replay every frame of a run (see `replay`).

    reveal_step: int32 [B, L], the step at which each position was revealed; -1 for fixed tokens.
    prob: float32 [B, L], probability of the chosen token under the distribution it was drawn
        from (after temperature, top-k, top-p); 1 for fixed tokens.
    counts: int32 [B, n_steps], number of tokens revealed at each step.
    remasked: int32 [B, n_steps], tokens masked again at each step (remasking samplers,
        `jif.remask`), else None. A remasked position's reveal_step and prob are those of
        its last draw, the token it ends with.

    Frames count steps done: frame 0 is the input, frame n_steps the final tokens, and a
    token revealed at step s first shows in frame s + 1 (`first_frame`).
    """

    reveal_step: jax.Array
    prob: jax.Array
    counts: jax.Array
    remasked: jax.Array | None = None

    @property
    def n_steps(self) -> int:
        """Number of steps of the run (the last frame)."""
        return int(np.shape(self.counts)[1])


class SampleResult(NamedTuple):
    """tokens: int32 [B, L] with no mask left; n_calls: network calls (int32 scalar)."""

    tokens: jax.Array
    n_calls: jax.Array
    trajectory: Trajectory | None


class Method(NamedTuple):
    """planner: a key of PLANNERS. score: which positions an "expected" step reveals (None for
    ancestral). score_uses_logits: the score reads the predicted distribution.
    score_uses_sample: the score reads the sampled token, so every masked position is drawn
    at every call, with fresh noise (a position passed over must not keep the draw it was
    passed over for); otherwise the positions are chosen first and tokens drawn only there.
    every_step: call the network at every step, even one that reveals nothing. cached:
    reuses logits across steps (refused for noise-conditioned denoisers). loop: a sampler
    loop of its own, called with `_sample`'s arguments, returning a `jif.plans.Outcome`
    (jif.threshold, jif.remask, jif.interference); the fields above then only describe it."""

    planner: str
    score: Callable | None = None
    score_uses_logits: bool = False
    score_uses_sample: bool = False
    every_step: bool = False
    cached: bool = False
    loop: Callable | None = None


METHODS: dict[str, Method] = {
    "ddpm": Method("ancestral", every_step=True),
    "ddpm_cache": Method("ancestral", cached=True),
    "confidence": Method("expected", score_confidence, True, True),  # uses logits, sample
    "margin": Method("expected", score_margin, score_uses_logits=True),
    "entropy": Method("expected", score_entropy, score_uses_logits=True),
    "random": Method("expected", score_random),
    "threshold": Method("expected", score_confidence, True, True, loop=threshold_loop),
    "remdm_cap": Method("ancestral", every_step=True, cached=True, loop=loop_cap),
    "remdm_conf": Method("ancestral", every_step=True, cached=True, loop=loop_conf),
    "interference": Method("expected", score_confidence, True, True, loop=interference_loop),
}


# ----------------------------------------------------------------------------- the loop

GATHER = 8  # positions per row drawn at once when the positions are known before the draw


SELF_CONDITION = ("fresh", "previous")


class _State(NamedTuple):
    tokens: jax.Array  # int32 [B, L]
    step: jax.Array  # int32 [B], each row's current step (n_steps when done)
    reveal_step: jax.Array  # int32 [B, L]
    prob: jax.Array  # float32 [B, L]
    n_calls: jax.Array  # int32 []
    pred: jax.Array | None = None  # float32 [B, L, V]: the last call's prediction ("previous")


def _sample(
    key,
    tokens,
    *,
    denoise_fn,
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
    threshold=None,
    eta=None,
    self_condition="fresh",
) -> Outcome:
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

    previous = self_condition == "previous"

    def call(tokens, step, pred):
        rate = planner.mask_rate(plan, tokens, step, mask_id) if time_conditioned else None
        return call_denoiser(denoise_fn, tokens, rate, pred)

    vocab = jax.eval_shape(call, tokens, jnp.zeros((batch,), jnp.int32), None).shape[-1]
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
        raw = call(state.tokens, state.step, state.pred)
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
            pred=next_prediction(raw) if previous else None,
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
        pred=jnp.zeros((batch, length, vocab), jnp.float32) if previous else None,
    )
    state = jax.lax.while_loop(lambda s: jnp.any(s.step < plan.n_steps), body, state)
    return Outcome(state.tokens, state.n_calls, state.reveal_step, state.prob, plan.n_steps)


def _run(key, tokens, stream_id, *, return_trajectory, stream, **settings) -> SampleResult:
    """The method's loop (its own, or `_sample`) and the trajectory from its outcome; with
    stream, every network call is reported to the stream `stream_id` (`jif.live`)."""
    loop = METHODS[settings["method"]].loop or _sample
    if stream:
        fn, mask_id = settings["denoise_fn"], settings["mask_id"]
        settings = dict(settings, denoise_fn=live.streaming(fn, stream_id, mask_id))
    out = loop(key, tokens, return_trajectory=return_trajectory, **settings)
    if not return_trajectory:
        return SampleResult(out.tokens, out.n_calls, None)
    rows = jnp.arange(tokens.shape[0])[:, None]
    where = jnp.where(out.reveal_step >= 0, out.reveal_step, out.n_steps)
    counts = jnp.zeros((tokens.shape[0], out.n_steps), jnp.int32)
    counts = counts.at[jnp.broadcast_to(rows, where.shape), where].add(1, mode="drop")
    trajectory = Trajectory(out.reveal_step, out.prob, counts, out.remasked)
    return SampleResult(out.tokens, out.n_calls, trajectory)


# ----------------------------------------------------------------------------- settings

MAX_STEPS = 1 << 20  # a plan holds int32 [B, steps]; more steps than this is a typo
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits: larger seeds repeat smaller ones
LOGIT_COPIES = 4  # [B, L, V] float32 arrays alive at once in a step: logits, filtered, noise, +1


def _whole(name: str, value, lo: int, hi: int, note: str = "") -> int:
    try:
        i = operator.index(value)  # ints and numpy/jax integers, not floats or strings
    except TypeError:
        ok = isinstance(value, float) and value.is_integer()
        i = int(value) if ok else None
    if i is None or isinstance(value, bool) or not lo <= i <= hi:
        raise ValueError(f"{name}={value!r}: must be a whole number from {lo} to {hi}{note}.")
    return i


def _real(name: str, value, interval: str, ok, note: str = "") -> float:
    try:
        f = math.nan if isinstance(value, str | bytes | bool) else float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not (math.isfinite(f) and ok(f)):
        raise ValueError(f"{name}={value!r}: must be a finite number in {interval}{note}.")
    return f


def check_settings(
    *,
    method: str,
    steps: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    block_length: int | None = None,
    length: int | None = None,
    context: int | None = None,
    batch: int | None = None,
    vocab: int | None = None,
    seed: int | None = None,
    threshold: float | None = None,
    eta: float | None = None,
    self_condition: str | None = None,
    names: dict[str, str] | None = None,
) -> dict:
    """Range-checks sampling settings; the one check behind `sample`, jif.sample, the app and
    jif.eval. Raises ValueError naming the first bad value and the allowed range; returns the
    settings given, normalised (whole numbers as int, reals as float; None ones left out).

    temperature: finite, >= 0. top_p: in (0, 1]. top_k, steps, seed: whole numbers >= 0, >= 1,
    in [0, MAX_SEED]. threshold ("threshold"): in (0, 1]. eta (ReMDM's cap): in [0, 1].
    self_condition: one of SELF_CONDITION; "previous" not with a method that reuses logits.
    length: tokens per row, at most `context` (the model's) when given.
    block_length: needs length; steps must be a multiple of the number of blocks. Sizes are
    checked before anything of that size exists: with batch, length and vocab, the
    [batch, length, vocab] logits of a network call must fit in this machine's memory.
    names: what the caller calls each setting in messages (a CLI flag, a page label).
    """
    name = lambda key: (names or {}).get(key, key)
    if method not in METHODS:
        raise ValueError(f"{name('method')}={method!r}: must be one of {sorted(METHODS)}.")
    out = {"method": method}
    if length is not None:
        note = "" if context is None else " (the model's context)"
        hi = MAX_STEPS if context is None else int(context)
        out["length"] = length = _whole(name("length"), length, 1, hi, note)
    if batch is not None:
        out["batch"] = batch = _whole(name("batch"), batch, 1, MAX_STEPS, " (samples at once)")
    n_blocks = 1
    if block_length is not None:
        if length is None:
            raise ValueError("check_settings: block_length needs the length.")
        note = f" ({length} makes one block)"
        block_length = _whole(name("block_length"), block_length, 1, length, note)
        out["block_length"], n_blocks = block_length, -(-length // block_length)
    steps = out["steps"] = _whole(name("steps"), steps, 1, MAX_STEPS)
    if steps % n_blocks:
        fit = n_blocks * (steps // n_blocks + 1)
        raise ValueError(
            f"{name('steps')}={steps}: must be a multiple of the number of blocks ({n_blocks} "
            f"blocks of {block_length} in length {length}), e.g. {fit}."
        )
    out["temperature"] = _real(
        name("temperature"), temperature, "[0, inf)", lambda t: t >= 0, " (0 is argmax)"
    )
    out["top_p"] = _real(
        name("top_p"), top_p, "(0, 1]", lambda p: 0 < p <= 1, " (1 keeps every token)"
    )
    out["top_k"] = _whole(name("top_k"), top_k, 0, 2**31 - 1, " (0 keeps every token)")
    if seed is not None:
        out["seed"] = _whole(name("seed"), seed, 0, MAX_SEED)
    if threshold is not None:
        out["threshold"] = _real(name("threshold"), threshold, "(0, 1]", lambda x: 0 < x <= 1)
    if eta is not None:
        out["eta"] = _real(name("eta"), eta, "[0, 1]", lambda x: 0 <= x <= 1, " (0: no remasking)")
    if self_condition is not None:
        if self_condition not in SELF_CONDITION:
            raise ValueError(
                f"{name('self_condition')}={self_condition!r}: must be one of {SELF_CONDITION}."
            )
        if self_condition == "previous" and METHODS[method].cached:
            raise ValueError(
                f"{name('self_condition')}='previous' with {name('method')}={method!r}: "
                f"{method} reuses logits across steps, which is exact only while the network's "
                "input is unchanged, and a previous prediction changes at every call; use "
                f"{name('self_condition')}='fresh', or another method (e.g. ddpm, confidence)."
            )
        out["self_condition"] = self_condition
    if batch and length and vocab:
        need = LOGIT_COPIES * 4 * batch * length * int(vocab)
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > have:
            raise ValueError(
                f"{batch} samples x {length} tokens x {vocab} vocabulary need about "
                f"{need / 2**30:.1f} GiB of logits per network call, more than this machine's "
                f"{have / 2**30:.1f} GiB; use fewer samples or a shorter length."
            )
    return out


def check_self_condition(self_condition: str, model_config, names: dict | None = None) -> None:
    """ValueError if self_condition="previous" is asked of a model without self-conditioning
    (it would be ignored, and the samples would not be what was asked for)."""
    if self_condition == "previous" and not getattr(model_config, "self_condition", False):
        flag = (names or {}).get("self_condition", "self_condition")
        raise ValueError(
            f"{flag}=previous: this model was trained without --self-condition, so it has no "
            f"prediction input; drop {flag} (or train with python -m jif.train --self-condition)."
        )


# ----------------------------------------------------------------------------- compiled samplers

MAX_COMPILED = 16
"""Compiled samplers kept, least recently used dropped first: each (denoiser, shape, method,
steps, ...) compiles a program (60 step counts of the tiny checkpoint's: +543 MB if all are
kept; +45 MB with the dropped ones freed with their jitted functions)."""
_compiled: OrderedDict = OrderedDict()
_compiled_lock = threading.Lock()


def _compiled_sampler(shape: tuple, **static) -> Callable:
    """The jitted sampler for one input shape and set of static settings (an LRU entry)."""
    key = (shape, tuple(sorted(static.items(), key=lambda kv: kv[0])))
    with _compiled_lock:
        fn = _compiled.pop(key, None)
        if fn is None:
            fn = jax.jit(functools.partial(_run, **static))
        _compiled[key] = fn
        while len(_compiled) > MAX_COMPILED:
            _compiled.popitem(last=False)
    return fn


def compiled_samplers() -> int:
    """Number of compiled samplers held (at most MAX_COMPILED)."""
    return len(_compiled)


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
    threshold: float = THRESHOLD,
    eta: float = ETA,
    self_condition: str = "fresh",
    stream: Callable | None = None,
) -> SampleResult:
    """Generate every `mask_id` position of `tokens` (int32 [B, L]); other tokens stay fixed.

    denoise_fn: tokens int32 [B, L] -> logits [B, L, V] (rows must not interact), or with
        time_conditioned=True, (tokens, mask_rate float32 [B]) -> logits, where mask_rate is
        1 - alpha_t of the current step ("ddpm" only; refused for "ddpm_cache").
    steps: total steps (split evenly over the blocks; "ddpm" adds a final denoising step per
        block). method: a key of METHODS. temperature: 0 is argmax. top_p: nucleus mass in
        (0, 1]. top_k: keep the k most likely tokens (0 keeps all). block_length: generate
        blocks of this many positions left to right (semi-autoregressive), None for one block.
        threshold: confidence above which "threshold" reveals a token at once. eta: the
        remasking cap of "remdm_cap". self_condition: what a self-conditioned model is
        conditioned on (SELF_CONDITION; the module's docstring): "previous" calls
        denoise_fn(tokens, prediction=p) with the previous call's probabilities p (zeros at
        the first). Every setting is checked by `check_settings`.
        stream: called with a `jif.live.Call` at every network call, as the program runs;
        an exception it raises (`jif.live.Stopped` to stop) ends the run and is raised here.
    Returns SampleResult(tokens [B, L], n_calls, trajectory or None). Compiled once per
    denoise_fn object, shape, method, steps, block_length, top_k, top_p < 1,
    return_trajectory and stream or not (the MAX_COMPILED most recent are kept); temperature and the top_p
    value change without recompiling.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32 [batch, length], got shape {tokens.shape}.")
    batch, length = tokens.shape
    s = check_settings(
        method=method,
        steps=steps,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        block_length=length if block_length is None else block_length,
        length=length,
        batch=batch,
        threshold=threshold,
        eta=eta,
        self_condition=self_condition,
    )
    if time_conditioned and METHODS[method].cached:
        raise ValueError(
            f"method={method!r} reuses logits across steps, only valid for a denoiser not "
            "conditioned on the noise level; use method='ddpm' for a noise-conditioned one."
        )
    run = _compiled_sampler(
        tokens.shape,
        denoise_fn=denoise_fn,
        mask_id=int(mask_id),
        steps=s["steps"],
        method=method,
        use_top_p=s["top_p"] < 1.0,
        top_k=s["top_k"],
        block_length=s["block_length"],
        return_trajectory=bool(return_trajectory),
        time_conditioned=bool(time_conditioned),
        self_condition=s["self_condition"],
        stream=stream is not None,
    )
    knobs = {k: jnp.float32(s[k]) for k in ("temperature", "top_p", "threshold", "eta")}
    with live.registered(stream) as sid:
        out = run(key, tokens, jnp.int32(sid), **knobs)
        return out if stream is None else jax.block_until_ready(out)


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


__all__ = ["METHODS", "PLANNERS", "SampleResult", "Trajectory", "check_settings", "sample"]
__all__ += ["compiled_samplers", "expected_calls", "first_frame", "replay"]
