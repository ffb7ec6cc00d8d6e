"""The training step and loop, shared by `jif.train`, `transfer/sweep.py` and `jif.bench`.

    state = init_state(params, tx)
    train_step = jax.jit(make_train_step(unbound, tx, seed=0, ema=0.995, mask_id=m))
    for s in steps(train_step, state, batches, start=0, stop=100):
        ...  # s.done, s.state, s.metrics, s.loss, s.smoothed

The state is a dict {"params", "ema", "opt_state", "step"}; every step's randomness is
fold_in(key(seed), step), so a run resumed from a checkpoint repeats the same steps.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jif import checkpoint as ckpt
from jif import objectives, optim


class Diverged(FloatingPointError):
    """A step produced a non-finite loss, gradient norm or parameter; `.step` is the step
    number, `.loss` and `.grad_norm` its values. The state it returned is the last good one."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        what = (
            "loss"
            if not math.isfinite(loss)
            else "gradient norm"
            if not math.isfinite(grad_norm)
            else "update"
        )
        super().__init__(
            f"non-finite {what} at step {step} (loss {loss}, gradient norm {grad_norm})"
        )
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a scalar bool array)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return (
        jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        if leaves
        else jnp.bool_(True)
    )


def init_state(params: optim.Params, tx: optax.GradientTransformation, *, ema: bool = True) -> dict:
    """The initial train state; params and EMA are copies (the step donates its state). With
    ema=False the state has no "ema" (for a step made with ema=None)."""
    state = {
        "params": jax.tree_util.tree_map(jnp.copy, params),
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    if ema:
        state["ema"] = jax.tree_util.tree_map(jnp.copy, params)
    return state


def make_train_step(
    unbound,
    tx: optax.GradientTransformation,
    *,
    seed: int | None,
    ema: float | None,
    mask_id: int,
    objective: str = "mdlm",
    custom_loss: Callable | None = None,
    guard: bool = True,
) -> Callable[[dict, jax.Array], tuple[dict, dict]]:
    """train_step(state, batch int32 [B, L]) -> (state, metrics) for the named objective
    (jif.objectives). The step's key is fold_in(key(seed), step); with seed=None the state
    carries its own base key as state["key"] (so that runs of several seeds can be vmapped).
    `ema` is the decay of the weight average that is evaluated. `custom_loss`, with the
    signature of an objective's loss, replaces the objective's (jif.distill: its batch is a
    pytree holding the teacher's weights too).

    An update is kept only if the loss, the gradient norm and every updated parameter are
    finite; otherwise the step returns the previous params, EMA and optimizer state (the step
    counter still advances) and metrics["finite"] is False.

    The sweep, which evaluates the raw weights and ends a run at its first non-finite step,
    turns both off: ema=None keeps no average (the state from `init_state(..., ema=False)`),
    and guard=False applies every update as it is (metrics["finite"] still tells). Each
    rewrites every parameter and optimizer moment once more per step; dropping both saves
    2-13% of a sweep step on one core (docs/bench.md, "Sweep throughput")."""
    fixed_key = None if seed is None else jax.random.key(seed)
    objective_loss = custom_loss or objectives.OBJECTIVES[objective].loss

    def loss_fn(params, batch, key):
        return objective_loss(ckpt.bind_params(unbound, params), batch, key, mask_id=mask_id)

    def train_step(state, batch):
        base_key = state["key"] if fixed_key is None else fixed_key
        key = jax.random.fold_in(base_key, state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": ok}
        metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
        new = {"params": params, "opt_state": opt_state}
        if ema is not None:
            new["ema"] = _ema_update(state, opt_state, params)
        if guard:
            new = jax.tree_util.tree_map(
                lambda n, o: jnp.where(ok, n, o), new, {k: state[k] for k in new}
            )
        return {**state, **new, "step": state["step"] + 1}, metrics

    def _ema_update(state, opt_state, params):
        # The EMA averages the weights that are evaluated (schedule-free: its averaged iterate).
        # Decay warms up as min(ema, (1 + step) / (10 + step)) so that short runs do not
        # evaluate mostly the initial weights (0.995 ** 100 = 0.6).
        target = optim.eval_params(opt_state, params)
        decay = jnp.minimum(ema, (1.0 + state["step"]) / (10.0 + state["step"]))
        return jax.tree_util.tree_map(
            lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state["ema"], target
        )

    return train_step


NONFINITE = ("stop", "skip")  # what a step with a non-finite update does to the run
MAX_SKIPPED = 10  # on_nonfinite="skip": this many non-finite steps in a row stop the run


class Step(NamedTuple):
    """One finished step of `steps`."""

    done: int  # steps taken so far
    state: dict  # the state after it
    metrics: dict  # its metrics (device arrays)
    loss: float
    smoothed: float  # 0.95-decayed average of the losses since the loop started


def steps(
    train_step: Callable,
    state: dict,
    batches: Iterator,
    *,
    start: int,
    stop: int,
    put: Callable[[Any], Any] | None = None,
    on_nonfinite: str = "stop",
) -> Iterator[Step]:
    """Runs train_step from step `start` to `stop`, one `Step` per step. A step whose update
    was not finite (see make_train_step) raises `Diverged` (on_nonfinite="stop"; the state is
    the last good one) or is yielded as skipped: its loss is NaN in `Step.loss` and the
    smoothed loss is unchanged (on_nonfinite="skip"; MAX_SKIPPED in a row raise). `put` places a batch (for example onto
    a mesh) before the step."""
    if on_nonfinite not in NONFINITE:
        raise ValueError(f"--on-nonfinite {on_nonfinite!r}: choose one of {NONFINITE}")
    smoothed, skipped = None, 0
    for step in range(start, stop):
        batch = next(batches)
        state, metrics = train_step(state, put(batch) if put else batch)
        loss = float(metrics["loss"])
        if not bool(metrics["finite"]):
            skipped += 1
            if on_nonfinite == "stop" or skipped >= MAX_SKIPPED:
                raise Diverged(step + 1, loss, float(metrics["grad_norm"]))
            yield Step(step + 1, state, metrics, math.nan, smoothed)
            continue
        skipped = 0
        smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
        yield Step(step + 1, state, metrics, loss, smoothed)


class Throughput:
    """Tokens/s and MFU over the steps since the last reading. The first step (compilation)
    is left out; `pause()` after an evaluation or a save starts a new interval, so neither the
    pause nor the steps before it (whose time it discards) count."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float):
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
        self.t_last, self.tokens = time.perf_counter(), 0
        self.started = False

    def step(self) -> None:
        if not self.started:  # the first step compiles: count from its end
            self.started = True
            self.t_last, self.tokens = time.perf_counter(), -self.tokens_per_step
        self.tokens += self.tokens_per_step

    def pause(self) -> None:
        self.t_last, self.tokens = time.perf_counter(), 0

    def read(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the last reading; starts the next interval."""
        tok_s = self.tokens / max(time.perf_counter() - self.t_last, 1e-9)
        mfu = self.flops_per_step * tok_s / self.tokens_per_step / self.peak
        self.t_last, self.tokens = time.perf_counter(), 0
        return tok_s, mfu


class Interrupts:
    """While active (a context manager, in the main thread), SIGINT and SIGTERM only record
    their name in `.signal`, so the loop can save a checkpoint and stop; a second Ctrl-C exits
    at once, saving nothing."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: exiting now, without a checkpoint", file=sys.stderr)
            os._exit(130)
        self.signal = signal.Signals(signum).name
        print(
            f"\n{self.signal}: saving a checkpoint after this step (Ctrl-C again to quit now)",
            file=sys.stderr,
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
