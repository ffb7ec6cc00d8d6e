"""A sampler's network calls as they happen: what the app draws while a sample is written.

`jif.sampling.sample(..., stream=f)` (and `jif.ar.sample`) call f(Call) from inside the
running program at every network call, through `jax.experimental.io_callback`: the call's
input tokens and what the model predicted there. f raising `Stopped` ends the run at that
call. `LiveRun` runs one sampling in a thread and keeps, for a page to draw, every frame
(the tokens before each call, then the final tokens) and, for each position, the call that
revealed it and the model's most likely tokens at that call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

TOP = 3  # alternatives kept per position


class Call(NamedTuple):
    """One network call, as numpy: tokens int32 [B, L] (its input); the model's TOP most
    likely tokens at each position, top_ids int32 [B, L, TOP] and top_probs float32
    [B, L, TOP] (the mask token excluded, before temperature and top-p); entropy float32
    [B, L] of that distribution in nats (NaN where the call predicts nothing)."""

    tokens: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    entropy: np.ndarray


class Stopped(Exception):
    """Raised by a stream to end the run at the current call."""


class _Quiet(logging.Filter):
    """jax logs every exception raised in a callback; a requested stop is not an error."""

    def filter(self, record) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Stopped))


logging.getLogger("jax._src.callback").addFilter(_Quiet())

_streams: dict[int, Callable] = {}
_errors: dict[int, BaseException] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


@contextlib.contextmanager
def registered(stream: Callable | None):
    """The id a compiled program passes back to reach `stream` (0: none). An exception the
    stream raised inside the program comes out of the `with` block as itself, not as the
    runtime error that carried it."""
    if stream is None:
        yield 0
        return
    with _lock:
        sid = next(_ids)
        _streams[sid] = stream
    try:
        yield sid
    except jax.errors.JaxRuntimeError:
        if sid in _errors:
            raise _errors[sid] from None
        raise
    finally:
        with _lock:
            _streams.pop(sid, None)
            error = _errors.pop(sid, None)
    if error is not None:  # raised inside a call whose result was never waited for
        raise error


def _push(sid, tokens, top_ids, top_probs, entropy) -> None:
    sid = int(sid)
    stream = _streams.get(sid)
    if stream is None:
        return
    try:
        stream(Call(*(np.asarray(a) for a in (tokens, top_ids, top_probs, entropy))))
    except BaseException as e:
        _errors[sid] = e
        raise


def report(stream_id, tokens, logits, mask_id: int, entropy_where=None) -> None:
    """Inside a traced sampler: send (tokens [B, L], the model's prediction from logits
    [B, L, V]) to the stream `stream_id`. entropy_where bool [B, L]: where the call predicts
    anything (default everywhere); elsewhere the entropy is NaN."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf), axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, TOP)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    if entropy_where is not None:
        entropy = jnp.where(entropy_where, entropy, jnp.nan)
    args = (stream_id, tokens, top_ids.astype(jnp.int32), jnp.exp(top_logp), entropy)
    io_callback(_push, None, *args, ordered=True)


def streaming(denoise_fn, stream_id, mask_id: int):
    """denoise_fn that also reports each call (its output may be (logits, extra))."""

    def fn(tokens, *rest, **kw):
        out = denoise_fn(tokens, *rest, **kw)
        report(stream_id, tokens, out[0] if isinstance(out, tuple) else out, mask_id)
        return out

    return fn


# ----------------------------------------------------------------------------- a live run


class LiveRun:
    """`run(stream)` (a sampling call returning a jif.sampling.SampleResult) in a thread.

    frames: int32 [B, L] arrays, the input of each network call so far, then the final
    tokens once done. reveal_frame int32 [B, L]: the first frame from which a position keeps
    its token (0 for the template's tokens, -1 while masked); top_ids / top_probs
    [B, L, TOP]: the model's prediction at the call that revealed it. masked_entropy [F, B]:
    mean entropy of the still-masked positions at each call; remasked [F, B]: tokens masked
    again by each call (remasking samplers). guess [B, L]: the model's most likely token at
    each position at the latest call (None once done). seconds / first_call_s: wall time of the run and
    of its first call (compiling included). stop() ends the run at its next call.
    """

    def __init__(self, run: Callable, *, mask_id: int):
        self.mask_id = mask_id
        self.frames: list[np.ndarray] = []
        self.masked_entropy: list[np.ndarray] = []
        self.remasked: list[np.ndarray] = []
        self.reveal_frame = self.top_ids = self.top_probs = self.guess = None
        self.result = self.error = None
        self.stopped = self.done = False
        self.first_call_s = self.seconds = None
        self._last: Call | None = None
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._main, args=(run,), daemon=True)
        self._thread.start()

    def _add(self, tokens: np.ndarray, call: Call | None) -> None:
        """A frame: positions that changed since the previous frame take its call's prediction."""
        masked = tokens == self.mask_id
        if not self.frames:
            self.reveal_frame = np.where(masked, -1, 0).astype(np.int32)
            shape = (*tokens.shape, TOP)
            self.top_ids, self.top_probs = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
            self.remasked.append(np.zeros(tokens.shape[0], np.int32))
        else:
            before = self.frames[-1]
            new = (before != tokens) & ~masked  # drawn at the previous call
            self.reveal_frame = np.where(new, len(self.frames), self.reveal_frame)
            self.reveal_frame = np.where(masked, -1, self.reveal_frame)
            self.top_ids[new], self.top_probs[new] = (
                self._last.top_ids[new],
                self._last.top_probs[new],
            )
            self.remasked.append(((before != self.mask_id) & masked).sum(axis=1).astype(np.int32))
        with np.errstate(invalid="ignore"):
            ent = np.where(masked, call.entropy, np.nan) if call is not None else None
            none = np.full(tokens.shape[0], np.nan, np.float32)
            self.masked_entropy.append(none if ent is None else _nanmean(ent))
        self._last = call
        self.guess = None if call is None else call.top_ids[..., 0].copy()
        with self._changed:
            self.frames.append(tokens)
            self._changed.notify_all()

    def _push(self, call: Call) -> None:
        if self._stop.is_set():
            raise Stopped
        if self.first_call_s is None:
            self.first_call_s = time.perf_counter() - self._start
        self._add(np.asarray(call.tokens, np.int32), call)

    def _main(self, run) -> None:
        try:
            self.result = jax.device_get(run(self._push))
            self._add(np.asarray(self.result.tokens, np.int32), None)
        except Stopped:
            self.stopped = True
        except BaseException as e:  # handed to whoever waits on the run
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self._start
            with self._changed:
                self.done = True
                self._changed.notify_all()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, n_frames: int, timeout: float) -> None:
        """Until there are more than n_frames frames, the run ends, or timeout seconds pass."""
        with self._changed:
            self._changed.wait_for(lambda: self.done or len(self.frames) > n_frames, timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN, NaN where all are NaN (no warning)."""
    n = np.sum(~np.isnan(x), axis=-1)
    s = np.nansum(x, axis=-1)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan).astype(np.float32)
