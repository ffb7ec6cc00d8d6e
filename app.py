"""Gradio page that animates masked-diffusion unmasking from jif checkpoints.

    python app.py                          # newest checkpoint under runs/, http://127.0.0.1:7860
    python app.py --root runs --checkpoint runs/tiny --port 7861
    python app.py --host 0.0.0.0 --share   # other machines / a public link: only when asked

The page samples with `jif.sampling.sample(..., return_trajectory=True)` and then plays the
stored trajectory frame by frame: masked positions are placeholders, the tokens revealed at
the current step are coloured by the model's confidence, earlier tokens are plain. A slider
replays any step afterwards without sampling again. All model maths lives in
`jif.sampling` and `jif.checkpoint`, the drawing in `jif.render`; this file only loads,
validates, calls, caches and puts the page together.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict

import gradio as gr
import jax
import numpy as np
import tyro

from jif import checkpoint as ckpt
from jif import hostmem, render, sampling
from jif.tokenizer import encode_template


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppConfig:
    """Command-line options of `python app.py`."""

    root: str = "runs"
    """Training output folder (a run folder or a folder of runs); the picker reads only here."""
    checkpoint: str | None = None
    """Run folder or step folder to open first; default: the newest checkpoint under root."""
    host: str = "127.0.0.1"
    """Interface to serve on; 127.0.0.1 keeps the page on this machine."""
    port: int = 7860
    """TCP port of the page."""
    share: bool = False
    """Ask gradio for a public share link (off unless given)."""
    ema: bool = True
    """Use the EMA weights of each checkpoint (--no-ema for the raw weights)."""


# Limits on what a visitor may ask for; each is checked with a message that names the fix.
MAX_STEPS = 2000
MAX_SAMPLES = 8
MAX_CACHED_MODELS = 4
DEFAULT_TEMPLATE = "Once upon a time, [MASK:12] happy."


def train_command(root: str) -> str:
    """The exact command that writes a first checkpoint where this app looks for one."""
    return f"python -m jif.train --preset tiny --steps 300 --out {os.path.join(root, 'tiny')}"


def no_checkpoint_message(root: str) -> str:
    return (
        f"No checkpoint found under `{root}`. Train one with:\n\n"
        f"    {train_command(root)}\n\n"
        "then press 'Rescan checkpoints' (or restart the app)."
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


def scan_checkpoints(root: str, source=ckpt) -> list:
    """CheckpointInfo of every checkpoint under root, newest first; [] when none or unreadable."""
    if not os.path.isdir(root):
        return []
    try:
        infos = source.list_checkpoints(root)
    except (OSError, ValueError) as e:  # an unreadable folder must not take the page down
        print(f"[app] could not list checkpoints under {root}: {e}", file=sys.stderr)
        return []
    return [i for i in infos if _is_inside(str(i.path), root)]


# ----------------------------------------------------------------------------------------
# Caches: loaded models here; compiled samplers in jif.sampling's jit cache, keyed on the
# cached model's denoise_fn object, so a second Generate neither reloads nor recompiles
# ----------------------------------------------------------------------------------------


class _LRU:
    """A small thread-safe least-recently-used cache: get_or_make(key, make)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict = {}

    def get_or_make(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # two visitors asking for the same model load it once
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                value = make()
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)


# ----------------------------------------------------------------------------------------
# The app: load, validate, sample, animate
# ----------------------------------------------------------------------------------------


class DiffusionApp:
    """State shared by all visitors: the root, the caches. Handlers are its methods."""

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
        self.models = _LRU(MAX_CACHED_MODELS)
        self.contexts: dict[str, int] = {}  # realpath -> training seq_len, from the listing

    # -- the picker -------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        """[(label, path)] for the picker, newest first."""
        infos = scan_checkpoints(self.root, self.source)
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
            raise gr.Error(no_checkpoint_message(self.root))
        if not self.allowed(path):
            raise gr.Error(
                f"{path!r} is not a checkpoint under {self.root!r}; pick one from the list."
            )
        key = (os.path.realpath(path), self.ema)
        try:
            return self.models.get_or_make(
                key, lambda: self.source.load_for_inference(path, ema=self.ema)
            )
        except (ValueError, OSError, KeyError) as e:
            where = "" if path in str(e) else f" {path}"
            raise gr.Error(f"Could not load checkpoint{where}: {e}") from e

    def context_length(self, loaded) -> int | None:
        """The sequence length the checkpoint was trained on (its context), if recorded."""
        seq_len = (getattr(loaded, "config", None) or {}).get("seq_len")
        return seq_len if isinstance(seq_len, int) else None

    def default_length(self, path: str | None) -> int:
        """Length offered for a checkpoint: its training context (64 when unknown)."""
        return self.contexts.get(os.path.realpath(path), 64) if path else 64

    # -- one generation ---------------------------------------------------------------
    def run_sampler(
        self, path, method, steps, length, temperature, top_p, seed, n_samples, template
    ) -> tuple[object, render.Samples]:
        """Validate everything, sample, and return (the loaded model, render.Samples); raises
        gr.Error on bad input."""
        loaded = self.load(path)
        method, steps, length, temperature, top_p, seed, n_samples = validate_settings(
            method, steps, length, temperature, top_p, seed, n_samples
        )
        context = self.context_length(loaded)
        if context is not None and length > context:
            raise gr.Error(
                f"length {length} is longer than this checkpoint's context ({context}); use at most {context}."
            )
        if template is None or not str(template).strip():
            raise gr.Error(
                "The template is empty: type a prompt such as 'Once upon a time,' or an infilling "
                "template such as 'Once upon a time, [MASK:20] happy.'"
            )
        tok = loaded.tokenizer
        try:
            row = encode_template(tok, str(template), length=length)  # int32 [length]
        except ValueError as e:  # longer than length: the message says by how much
            raise gr.Error(f"Bad template: {e}") from e
        tokens = np.tile(row[None], (n_samples, 1))
        result = sampling.sample(
            loaded.denoise_fn,  # the same object every time: the compiled sampler is reused
            jax.random.key(seed),
            tokens,
            mask_id=tok.mask_id,
            steps=steps,
            method=method,
            temperature=temperature,
            top_p=top_p,
            return_trajectory=True,
        )
        return loaded, render.Samples.from_result(result, tok, data=getattr(loaded, "data", ""))

    def generate(
        self, path, method, steps, length, temperature, top_p, seed, n_samples, fps, template
    ):
        """Generator handler: yields (html, replay slider, plot, scores, state) frame by frame."""
        try:
            loaded, samples = self.run_sampler(
                path, method, steps, length, temperature, top_p, seed, n_samples, template
            )
        except gr.Error:
            raise
        except Exception as e:  # unexpected: keep serving, tell the visitor and the terminal
            traceback.print_exc()
            raise gr.Error(f"Sampling failed: {type(e).__name__}: {e}") from e
        delay = 0.0 if not fps or fps <= 0 else 1.0 / float(fps)
        slider = dict(minimum=0, maximum=samples.n_steps, step=1)
        for step in render.frames_to_play(samples):
            yield (
                render.render_step(samples, step),
                gr.update(value=step, **slider),
                gr.skip(),
                gr.skip(),
                gr.skip(),
            )
            if delay:
                time.sleep(delay)
        yield (
            render.render_step(samples, samples.n_steps),
            gr.update(value=samples.n_steps, interactive=True, **slider),
            render.plot_statistics(samples),
            render.scores_markdown(samples, getattr(loaded, "data", "?")),
            samples,
        )

    def replay(self, samples: render.Samples | None, step):
        if samples is None:
            raise gr.Error("Nothing to replay yet: press Generate first.")
        return render.render_step(samples, int(np.clip(int(step or 0), 0, samples.n_steps)))


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _number(value, ok, allowed: str) -> float:
    """float(value) when it is finite and ok(it); else gr.Error naming what is allowed."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if not (np.isfinite(f) and ok(f)):
        raise gr.Error(f"{allowed}, got {value!r}.")
    return f


def _as_int(name: str, value, lo: int, hi: int) -> int:
    allowed = f"{name} must be a whole number between {lo} and {hi}"
    return int(_number(value, lambda f: f == int(f) and lo <= f <= hi, allowed))


def _as_float(name: str, value, lo: float, hi: float, *, open_lo: bool = False) -> float:
    allowed = f"{name} must be a number in {'(' if open_lo else '['}{lo}, {hi}]"
    return _number(value, lambda f: (lo < f if open_lo else lo <= f) and f <= hi, allowed)


def validate_settings(method, steps, length, temperature, top_p, seed, n_samples):
    """Checks every control; raises gr.Error naming the bad value and the allowed range."""
    if method not in sampling.METHODS:
        raise gr.Error(
            f"Unknown sampling method {method!r}; choose one of {sorted(sampling.METHODS)}."
        )
    return (
        method,
        _as_int("steps", steps, 1, MAX_STEPS),
        _as_int("length", length, 2, 1 << 16),
        _as_float("temperature", temperature, 0.0, 10.0, open_lo=True),
        _as_float("top-p", top_p, 0.0, 1.0, open_lo=True),
        _as_int("seed", seed, 0, 2**31 - 1),
        _as_int("number of samples", n_samples, 1, MAX_SAMPLES),
    )


# ----------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------


def build_demo(
    root: str = "runs", checkpoint: str | None = None, *, ema: bool = True, source=ckpt
) -> gr.Blocks:
    """The whole page. Launch it with `.launch()`; tests launch it in-process.

    root: the training output folder the picker lists; checkpoint: the one to open first
    (default: the newest under root); ema: EMA weights; source: where checkpoints come from,
    anything with jif.checkpoint's list_checkpoints and load_for_inference (default: it).
    """
    app = DiffusionApp(root, checkpoint, ema=ema, source=source)
    listed = app.choices()
    first = app.initial_choice(listed)
    methods = list(sampling.METHODS)
    default_method = "ddpm_cache" if "ddpm_cache" in methods else methods[0]

    with gr.Blocks(title="jif: watch a masked diffusion model write") as demo:
        gr.Markdown(
            "## jif: watch a masked diffusion model write\n"
            "Every position starts masked; at each step the sampler reveals some of them. "
            "Write a prompt, or an infilling template with `[MASK]` / `[MASK:n]` holes."
        )
        status = gr.Markdown(
            no_checkpoint_message(root) if first is None else f"Checkpoint: `{first}`",
            elem_id="jif-status",
        )
        with gr.Row():
            picker = gr.Dropdown(
                choices=listed,
                value=first,
                label="Checkpoint",
                allow_custom_value=True,  # rescans add choices; allowed() guards the path
                scale=4,
                elem_id="jif-picker",
            )
            rescan = gr.Button("Rescan checkpoints", scale=1)
        template = gr.Textbox(
            value=DEFAULT_TEMPLATE,
            label="Prompt or infilling template",
            lines=2,
            elem_id="jif-template",
        )
        with gr.Row():
            method = gr.Dropdown(methods, value=default_method, label="Method")
            steps = gr.Number(value=64, precision=0, label="Steps")
            length = gr.Number(
                value=app.default_length(first), precision=0, label="Length (tokens)"
            )
            n_samples = gr.Number(value=2, precision=0, label="Samples")
            seed = gr.Number(value=0, precision=0, label="Seed")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            fps = gr.Slider(
                0, 60, value=15, step=1, label="Animation speed (frames/s, 0 = no delay)"
            )
        generate = gr.Button("Generate", variant="primary", elem_id="jif-generate")
        text = gr.HTML(label="Samples", elem_id="jif-text")
        replay = gr.Slider(
            0, 1, value=0, step=1, label="Replay step", interactive=True, elem_id="jif-replay"
        )
        with gr.Row():
            plot = gr.Plot(show_label=False, elem_id="jif-plot")
            scores = gr.Markdown(elem_id="jif-scores")
        state = gr.State(None)

        def on_pick(path):
            text = f"Checkpoint: `{path}`" if path else no_checkpoint_message(root)
            return text, app.default_length(path)

        def on_rescan(current):
            new = app.choices()
            value = current if any(p == current for _, p in new) else (new[0][1] if new else None)
            return gr.update(choices=new, value=value), on_pick(value)[0]

        picker.change(on_pick, picker, [status, length], api_name=False)
        rescan.click(on_rescan, picker, [picker, status], api_name="rescan")
        generate.click(
            app.generate,
            [picker, method, steps, length, temperature, top_p, seed, n_samples, fps, template],
            [text, replay, plot, scores, state],
            api_name="generate",
            concurrency_limit=4,
            show_progress="minimal",  # keep the animated text visible while it streams
        )
        replay.input(app.replay, [state, replay], text, api_name="replay")
    demo.queue(default_concurrency_limit=4)
    demo.jif_app = app  # the caches, for tests and for warming up
    return demo


def main(argv: list[str] | None = None) -> None:
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    cfg = tyro.cli(AppConfig, args=argv, description=__doc__.split("\n\n")[0])
    listed = scan_checkpoints(cfg.root)
    if not listed and not cfg.checkpoint:
        print(no_checkpoint_message(cfg.root), flush=True)
    demo = build_demo(cfg.root, cfg.checkpoint, ema=cfg.ema)
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)


if __name__ == "__main__":
    main()
