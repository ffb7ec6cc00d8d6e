"""The app's handlers, apart from the page: load and cache checkpoints, check every
setting, stream a generation frame by frame (`jif.live`), stop it, replay it.

`app.py` builds the Gradio page around one `DiffusionApp`; the model maths lives in
`jif.sampling` and `jif.checkpoint`, the drawing in `jif.render`.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback

import gradio as gr
import jax
import numpy as np

from jif import checkpoint as ckpt
from jif import interference, live, objectives, render, sampling, serve
from jif.tokenizer import encode_template

# Limits on what a visitor may ask for, each checked with a message that names the fix. They
# bound the work of one request (sampling, frames drawn and sent, time holding a worker) and
# of one visitor; the ranges every sampler setting must lie in come from
# jif.sampling.check_settings, shared with `python -m jif.sample`.
MAX_STEPS = 2000
MAX_SAMPLES = 8
MAX_TEMPLATE_CHARS = 4000
MIN_FPS, MAX_FPS = 5, 60  # animation speed; at 1 frame/s a 2000-step run held a worker 30 min
MAX_ANIMATION_SECONDS = 10.0  # a longer animation plays faster than asked
MAX_FRAMES = 120  # frames drawn and sent per generation (evenly spaced, first and last kept)
WORKERS = 4  # generations running at once, all visitors together
MAX_JOBS_PER_VISITOR = 2  # of those, per visitor (client address)
QUEUE_SIZE = 32  # generations waiting for a worker, all visitors together
MAX_CACHED_MODELS = 4
LABELS = {  # check_settings' names on the page
    "top_p": "top-p",
    "batch": "number of samples",
    "self_condition": "self-conditioning input",
}
DEFAULT_TEMPLATE = "Once upon a time, [MASK:12] happy."
DEFAULT_METHOD = "confidence"  # writes the most whole stories on the default run (README)
DEFAULT_STEPS = 64
DEFAULT_SAMPLES = 2


def train_command(root: str) -> str:
    """The command that writes a checkpoint worth watching where this app looks for one."""
    return f"python -m jif.train --out {os.path.join(root, 'cpu-stories')}"


def no_checkpoint_message(root: str) -> str:
    return (
        f"No checkpoint found under `{root}`. Train the default model (about 10 minutes on a "
        f"2-core CPU; it writes whole stories) with:\n\n    {train_command(root)}\n\n"
        "then press 'Rescan checkpoints' (or restart the app). For a first look within a "
        "minute, add `--preset tiny --steps 300` (it writes words, not yet stories)."
    )


# ----------------------------------------------------------------------------------------
# Checkpoint picker: only paths listed under the root (or the one given with --checkpoint)
# ----------------------------------------------------------------------------------------


def _is_inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


def checkpoint_label(info) -> str:
    """One picker line: run, step, data source, validation NELBO."""
    nelbo = "n/a" if info.val_nelbo is None else f"{info.val_nelbo:.3f}"
    run = os.path.basename(os.path.normpath(info.run_dir))
    return f"{run} · step {info.step} · data {info.data} · val NELBO {nelbo}"


def scan_checkpoints(root: str, source=ckpt, item: str | None = None) -> list:
    """CheckpointInfo of every checkpoint under root, newest first; [] when none or unreadable
    (jif.checkpoint lists only step folders whose weights are on disk)."""
    if not os.path.isdir(root):
        return []
    try:
        infos = source.list_checkpoints(root)
    except (OSError, ValueError) as e:  # an unreadable folder must not take the page down
        print(f"[app] could not list checkpoints under {root}: {e}", file=sys.stderr)
        return []
    infos = [i for i in infos if _is_inside(str(i.path), root)]
    return [i for i in infos if item is None or ckpt.weights_present(str(i.path), item)]


# ----------------------------------------------------------------------------------------
# The app: load, validate, sample, animate
# ----------------------------------------------------------------------------------------


class DiffusionApp:
    """State shared by all visitors: the root, the caches, the slots, the running
    generations. Handlers are its methods.

    Loaded models are cached here; compiled samplers in jif.sampling's bounded cache, keyed
    on the cached model's denoise_fn object, so a second Generate neither reloads nor
    recompiles."""

    def __init__(self, root: str, checkpoint: str | None = None, *, ema: bool = True, source=ckpt):
        self.root = root
        resolve = getattr(source, "resolve_step_dir", None)
        if checkpoint and resolve is not None:  # a run folder given: its newest step folder
            try:
                checkpoint = resolve(checkpoint)
            except ValueError as e:  # reported on the page when it is used
                print(f"[app] --checkpoint {checkpoint}: {e}", file=sys.stderr)
        self.checkpoint = checkpoint
        self.ema = ema
        self.source = source  # provides list_checkpoints and load_for_inference
        self.models = serve.LRU(MAX_CACHED_MODELS)
        self.slots = serve.Slots(MAX_JOBS_PER_VISITOR)
        self.contexts: dict[str, int] = {}  # realpath -> training seq_len, from the listing
        self.fps: dict[str, float] = {}  # session -> animation speed, changed live
        self.running: dict[str, set] = {}  # session -> its generations' stop events
        self.lock = threading.Lock()

    # -- the picker -------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        """[(label, path)] for the picker, newest first."""
        infos = scan_checkpoints(self.root, self.source, "ema" if self.ema else "params")
        if self.checkpoint and not any(_same(i.path, self.checkpoint) for i in infos):
            run_dir = os.path.dirname(os.path.dirname(os.path.normpath(self.checkpoint)))
            given = [i for i in _listing(self.source, run_dir) if _same(i.path, self.checkpoint)]
            infos = given + infos
        for i in infos:
            if isinstance((i.config or {}).get("seq_len"), int):
                self.contexts[os.path.realpath(i.path)] = i.config["seq_len"]
        listed = [(checkpoint_label(i), str(i.path)) for i in infos]
        if self.checkpoint and not any(_same(p, self.checkpoint) for _, p in listed):
            listed.insert(0, (f"{self.checkpoint} (given with --checkpoint)", self.checkpoint))
        return listed

    def initial_choice(self, listed) -> str | None:
        if self.checkpoint:
            return next((p for _, p in listed if _same(p, self.checkpoint)), self.checkpoint)
        return listed[0][1] if listed else None

    def allowed(self, path: str) -> bool:
        """The page opens only checkpoints inside the root, or the one named on the command line."""
        return _is_inside(path, self.root) or (
            self.checkpoint is not None and _same(path, self.checkpoint)
        )

    # -- loading ----------------------------------------------------------------------
    def load(self, path: str | None):
        if not path:
            raise serve.user_error(no_checkpoint_message(self.root))
        if not isinstance(path, str) or not self.allowed(path):
            raise serve.user_error(
                f"{path!r} is not a checkpoint under {self.root!r}; pick one from the list."
            )
        key = (os.path.realpath(path), self.ema)
        try:
            return self.models.get_or_make(
                key, lambda: self.source.load_for_inference(path, ema=self.ema)
            )
        except (ValueError, OSError, KeyError) as e:
            where = "" if path in str(e) else f" {path}"
            raise serve.user_error(f"Could not load checkpoint{where}: {e}") from None

    def context_length(self, loaded) -> int | None:
        """The sequence length the checkpoint was trained on (its context), if recorded."""
        seq_len = (getattr(loaded, "config", None) or {}).get("seq_len")
        return seq_len if isinstance(seq_len, int) else None

    def default_length(self, path: str | None) -> int:
        """Length offered for a checkpoint: its training context (64 when unknown)."""
        return self.contexts.get(os.path.realpath(path), 64) if path else 64

    def open(self, path):
        """Page load and picker change: (status, length, Generate button). Loads the model
        and compiles the default sampler, so that the first Generate streams at once."""
        if not path:
            return no_checkpoint_message(self.root), gr.skip(), gr.update(interactive=False)
        try:
            loaded = self.load(path)
            length = self.context_length(loaded) or self.default_length(path)
            job = self.prepare(
                loaded,
                DEFAULT_METHOD,
                DEFAULT_STEPS,
                length,
                1.0,
                1.0,
                0,
                0,
                0,
                DEFAULT_SAMPLES,
                DEFAULT_TEMPLATE,
                label="warm-up",
            )
            job(lambda call: None)
        except gr.Error as e:
            return f"**Cannot open** `{path}`: {e.message}", gr.skip(), gr.update(interactive=False)
        return f"Checkpoint: `{path}` (ready)", length, gr.update(interactive=True)

    # -- one generation ---------------------------------------------------------------
    def prepare(
        self,
        loaded,
        method,
        steps,
        length,
        temperature,
        top_p,
        top_k,
        block_length,
        seed,
        n_samples,
        template,
        *,
        label,
        self_condition="fresh",
    ):
        """Validate everything and return run(stream) -> SampleResult; gr.Error on bad input."""
        if not isinstance(template, str) or not template.strip():
            raise serve.user_error(
                "The template is empty: type a prompt such as 'Once upon a time,' or an infilling "
                "template such as 'Once upon a time, [MASK:20] happy.'"
            )
        if len(template) > MAX_TEMPLATE_CHARS:
            raise serve.user_error(
                f"The template is {len(template)} characters; this page takes at most "
                f"{MAX_TEMPLATE_CHARS}: shorten it."
            )
        tok = loaded.tokenizer
        s = validate_settings(
            method, steps, length, temperature, top_p, seed, n_samples,
            top_k=top_k, block_length=block_length, context=self.context_length(loaded),
            vocab=tok.vocab_size, self_condition=self_condition,
        )  # fmt: skip
        try:
            sampling.check_self_condition(self_condition, loaded.model_config, LABELS)
        except ValueError as e:
            raise serve.user_error(str(e)) from None
        try:
            row = encode_template(tok, template, length=s["length"])  # int32 [length]
        except ValueError as e:  # a misspelt marker, or too long: the message says the fix
            raise serve.user_error(f"Bad template: {e}") from None
        tokens = np.tile(row[None], (s["batch"], 1))
        objective = objectives.objective_of(getattr(loaded, "config", None) or {})
        denoise_fn = loaded.denoise_fn  # the same object every time: the compiled sampler is reused
        if method == "interference" and objective != "ar":  # its probe, if trained
            try:
                denoise_fn, note = interference.denoise_fn_for(loaded)
            except ValueError as e:
                raise serve.user_error(str(e)) from None
            print(f"[app] {label}: {note}", file=sys.stderr, flush=True)
        options = dict(steps=s["steps"], method=method, temperature=s["temperature"])
        options.update(top_p=s["top_p"], top_k=s["top_k"], block_length=s.get("block_length"))
        if objective != "ar":
            options["self_condition"] = s["self_condition"]
        generate = objectives.OBJECTIVES[objective].generate  # "ar": left to right

        def run(stream):
            key = jax.random.key(s["seed"])
            return generate(denoise_fn, key, tokens, mask_id=tok.mask_id, **options,
                            return_trajectory=True, stream=stream)  # fmt: skip

        run.expected_calls = s["length"] if objective == "ar" else s["steps"]
        return run

    def generate(self, path, method, steps, length, temperature, top_p, top_k, block_length,
                 seed, n_samples, fps, template, compare, method_b, path_b, colouring,
                 self_condition="fresh", request: gr.Request = None):  # fmt: skip
        """Generator handler: yields (text A, text B, replay slider, statistics, reveal
        order, summary, state, Generate, Stop) as the samplers run, then at the end.

        At most MAX_JOBS_PER_VISITOR run per visitor; Stop ends every generation of the
        session at its next network call; the animation speed is read at every frame."""
        session = _session(request)
        stop = threading.Event()
        with self.lock:
            self.running.setdefault(session, set()).add(stop)
        try:
            with self.slots.hold(serve.visitor(request)):
                yield from self._generate(
                    session, stop, path, method, steps, length, temperature, top_p, top_k,
                    block_length, seed, n_samples, fps, template, compare, method_b, path_b,
                    colouring, self_condition,
                )  # fmt: skip
        except gr.Error as e:  # a visitor's mistake: shown where the samples go, and kept
            yield (render.error_html(e.message), "", gr.skip(), None, None, "", [],
                   gr.update(interactive=True), gr.update(interactive=False))  # fmt: skip
        finally:
            with self.lock:
                self.running.get(session, set()).discard(stop)

    def _generate(self, session, stop, path, method, steps, length, temperature, top_p, top_k,
                  block_length, seed, n_samples, fps, template, compare, method_b, path_b,
                  colouring, self_condition="fresh"):  # fmt: skip
        self.fps[session] = frame_rate(fps)
        settings = (steps, length, temperature, top_p, top_k, block_length, seed, n_samples)
        jobs = [(path, method, "A: " + str(method))]
        if compare:
            jobs.append((path_b or path, method_b, "B: " + str(method_b)))
        prepared = []
        for where, how, label in jobs:  # every mistake is found before anything runs
            loaded = self.load(where)
            job = self.prepare(
                loaded, how, *settings, template, label=label, self_condition=self_condition
            )
            prepared.append((loaded, job, label))
        busy = gr.update(interactive=False), gr.update(interactive=True)
        yield ("<i>starting: the first network call comes after compiling, for new settings</i>",
               "", gr.update(value=0), None, None, "", [], *busy)  # fmt: skip
        done: list[render.Samples] = []
        for loaded, job, label in prepared:
            s = yield from self._play(session, stop, loaded, job, label, len(done), colouring)
            done.append(s)
            if stop.is_set():
                break
            # the column keeps its last frame, drawn once, while the next one plays
            yield self._frame(len(done) - 1, render.render_frame(s, s.last, colouring), s.last)
        texts = [render.render_frame(s, s.last, colouring) for s in done] + ["", ""]
        data = getattr(prepared[0][0], "data", "?")
        last = max(s.last for s in done)
        yield (texts[0], texts[1],
               gr.update(value=last, minimum=0, maximum=max(last, 1), step=1, interactive=True),
               render.plot_statistics(done), render.plot_reveal_order(done),
               render.summary_markdown(done, data), done,
               gr.update(interactive=True), gr.update(interactive=False))  # fmt: skip

    def _play(self, session, stop, loaded, job, label, column, colouring):
        """Stream one run into output column `column`; returns its render.Samples."""
        run = live.LiveRun(job, mask_id=loaded.tokenizer.mask_id)
        data = getattr(loaded, "data", "")
        out = lambda s, f: self._frame(column, render.render_frame(s, f, colouring), f)
        shown = -1
        try:
            while not run.done:  # live: the newest frame, at most fps frames a second
                if stop.is_set():
                    run.stop()
                tick = time.monotonic() + 1.0 / self.fps.get(session, 15.0)
                run.wait(shown + 1, max(0.0, tick - time.monotonic()))
                if len(run.frames) - 1 > shown and not run.done:
                    shown = len(run.frames) - 1
                    s = render.Samples.from_run(run, loaded.tokenizer, label=label, data=data,
                                                expected_calls=job.expected_calls)  # fmt: skip
                    yield out(s, shown)
                    time.sleep(max(0.0, tick - time.monotonic()))
        finally:
            run.stop()  # a closed page stops its sampler
        if not run.frames:  # stopped while compiling
            raise serve.user_error(f"{label}: stopped before its first network call.")
        if run.error is not None:
            traceback.print_exception(run.error)
            message = f"{type(run.error).__name__}: {run.error}"
            raise gr.Error(f"Sampling failed: {message}")
        s = render.Samples.from_run(run, loaded.tokenizer, label=label, data=data)
        # The sampler outran the display: the frames not shown yet, within the time limit.
        fps = self.fps.get(session, 15.0)
        for f in leftover_frames(len(s.frames), shown, fps):
            if stop.is_set():
                break
            yield out(s, f)
            time.sleep(1.0 / self.fps.get(session, fps))
        return s

    def _frame(self, column, html, frame):
        """One animation frame: `html` into its column; the other column is left as it is."""
        texts = [gr.skip(), gr.skip()]
        texts[column] = html
        slider = gr.update(value=frame, minimum=0, maximum=max(frame, 1), step=1)
        return (texts[0], texts[1], slider, gr.skip(), gr.skip(), gr.skip(),
                gr.skip(), gr.skip(), gr.skip())  # fmt: skip

    def stop(self, request: gr.Request = None) -> None:
        """Stop button: every generation of this session stops at its next network call."""
        with self.lock:
            for event in self.running.get(_session(request), ()):
                event.set()

    def set_fps(self, fps, request: gr.Request = None) -> None:
        """The animation speed slider, read by running generations at every frame."""
        try:
            self.fps[_session(request)] = frame_rate(fps)
        except gr.Error:
            pass  # the slider's own range; Generate reports a bad typed value

    def replay(self, runs, frame, colouring):
        if not runs:
            raise serve.user_error("Nothing to replay yet: press Generate first.")
        try:
            frame = int(float(frame or 0))
        except (TypeError, ValueError):
            raise serve.user_error(f"replay frame {frame!r} is not a number.") from None
        texts = [render.render_frame(s, min(frame, s.last), colouring) for s in runs]
        return tuple(texts + [""] * (2 - len(texts)))


def leftover_frames(n_frames: int, shown: int, fps: float) -> list[int]:
    """The frames after `shown` to play once a run ends: at most MAX_FRAMES, and at most
    MAX_ANIMATION_SECONDS of them at fps (evenly spaced, the last kept)."""
    most = min(MAX_FRAMES, int(MAX_ANIMATION_SECONDS * fps))
    return render.frames_to_play(n_frames, shown, max_frames=most)


def _session(request) -> str:
    return str(getattr(request, "session_hash", None) or "local")


def _listing(source, folder) -> list:
    try:
        return source.list_checkpoints(folder) if os.path.isdir(folder) else []
    except (OSError, ValueError):
        return []


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def frame_rate(fps) -> float:
    """The animation speed in frames/s; gr.Error unless MIN_FPS <= fps <= MAX_FPS."""
    try:
        f = math.nan if isinstance(fps, str | bool) else float(fps)
    except (TypeError, ValueError):
        f = math.nan
    if not MIN_FPS <= f <= MAX_FPS:  # NaN fails too
        raise serve.user_error(
            f"animation speed={fps!r}: must be from {MIN_FPS} to {MAX_FPS} frames/s "
            f"(an animation longer than {MAX_ANIMATION_SECONDS:g} s plays faster)."
        )
    return f


def validate_settings(
    method, steps, length, temperature, top_p, seed, n_samples, *, top_k=0, block_length=0,
    context=None, vocab=None, self_condition="fresh",
) -> dict:  # fmt: skip
    """Checks every control: the ranges with jif.sampling.check_settings (shared with the
    CLI), then this page's limits per request. Raises gr.Error naming the bad value and what
    is allowed; returns check_settings' dict (block_length left out for one block)."""
    for label, value in (("length", length), ("number of samples", n_samples), ("seed", seed)):
        if value is None:
            raise serve.user_error(f"{label} is empty: type a whole number.")
    blocks = None if block_length in (0, 0.0, None, "") else block_length
    try:
        s = sampling.check_settings(
            method=method,
            steps=steps,
            temperature=temperature,
            top_p=top_p,
            top_k=0 if top_k in (None, "") else top_k,
            block_length=blocks,
            length=length,
            context=context,
            batch=n_samples,
            vocab=vocab,
            seed=seed,
            self_condition=self_condition,
            names=LABELS,
        )
    except ValueError as e:
        raise serve.user_error(str(e)) from None
    for label, value, most in (
        ("steps", s["steps"], MAX_STEPS),
        ("number of samples", s["batch"], MAX_SAMPLES),
    ):
        if value > most:
            raise serve.user_error(
                f"{label}={value}: this page takes at most {most} (a limit per run)."
            )
    return s
