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
import math
import os
import sys
import time
import traceback

import gradio as gr
import jax
import numpy as np
import tyro

from jif import checkpoint as ckpt
from jif import hostmem, interference, objectives, render, sampling, serve
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
LABELS = {"top_p": "top-p", "batch": "number of samples"}  # check_settings' names on the page
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
    """State shared by all visitors: the root, the caches, the slots. Handlers are its methods.

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

    # -- the picker -------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        """[(label, path)] for the picker, newest first."""
        infos = scan_checkpoints(self.root, self.source, "ema" if self.ema else "params")
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

    # -- one generation ---------------------------------------------------------------
    def run_sampler(
        self, path, method, steps, length, temperature, top_p, seed, n_samples, template
    ) -> tuple[object, render.Samples]:
        """Validate everything, sample, and return (the loaded model, render.Samples); raises
        gr.Error on bad input."""
        loaded = self.load(path)
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
        method, steps, length, temperature, top_p, seed, n_samples = validate_settings(
            method,
            steps,
            length,
            temperature,
            top_p,
            seed,
            n_samples,
            context=self.context_length(loaded),
            vocab=tok.vocab_size,
        )
        try:
            row = encode_template(tok, template, length=length)  # int32 [length]
        except ValueError as e:  # a misspelt marker, or too long: the message says the fix
            raise serve.user_error(f"Bad template: {e}") from None
        tokens = np.tile(row[None], (n_samples, 1))
        objective = objectives.objective_of(getattr(loaded, "config", None) or {})
        denoise_fn = loaded.denoise_fn  # the same object every time: the compiled sampler is reused
        if method == "interference" and objective != "ar":  # its probe, if trained
            try:
                denoise_fn, note = interference.denoise_fn_for(loaded)
            except ValueError as e:
                raise serve.user_error(str(e)) from None
            print(f"[app] {note}", file=sys.stderr, flush=True)
        result = objectives.OBJECTIVES[objective].generate(  # "ar": left to right
            denoise_fn,
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
        self,
        path,
        method,
        steps,
        length,
        temperature,
        top_p,
        seed,
        n_samples,
        fps,
        template,
        request: gr.Request = None,
    ):
        """Generator handler: yields (html, replay slider, plot, scores, state) frame by frame.

        At most MAX_JOBS_PER_VISITOR run per visitor; at most MAX_FRAMES frames are sent, and
        an animation that would last longer than MAX_ANIMATION_SECONDS plays faster."""
        fps = frame_rate(fps)
        with self.slots.hold(serve.visitor(request)):
            yield from self._generate(
                path, method, steps, length, temperature, top_p, seed, n_samples, fps, template
            )

    def _generate(
        self, path, method, steps, length, temperature, top_p, seed, n_samples, fps, template
    ):
        try:
            loaded, samples = self.run_sampler(
                path, method, steps, length, temperature, top_p, seed, n_samples, template
            )
        except gr.Error:
            raise
        except Exception as e:  # unexpected: keep serving, tell the visitor and the terminal
            traceback.print_exc()
            raise gr.Error(f"Sampling failed: {type(e).__name__}: {e}") from e
        frames = render.frames_to_play(samples, max_frames=MAX_FRAMES)
        delay = min(1.0 / fps, MAX_ANIMATION_SECONDS / len(frames))
        slider = dict(minimum=0, maximum=samples.n_steps, step=1)
        for step in frames:
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
            raise serve.user_error("Nothing to replay yet: press Generate first.")
        try:
            step = int(np.clip(float(step or 0), 0, samples.n_steps))
        except (TypeError, ValueError):
            raise serve.user_error(f"replay step {step!r} is not a number.") from None
        return render.render_step(samples, step)


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
    method, steps, length, temperature, top_p, seed, n_samples, *, context=None, vocab=None
):
    """Checks every control: the ranges with jif.sampling.check_settings (shared with the
    CLI), then this page's limits per request. Raises gr.Error naming the bad value and what
    is allowed; returns (method, steps, length, temperature, top_p, seed, n_samples)."""
    for label, value in (("length", length), ("number of samples", n_samples), ("seed", seed)):
        if value is None:
            raise serve.user_error(f"{label} is empty: type a whole number.")
    try:
        s = sampling.check_settings(
            method=method,
            steps=steps,
            temperature=temperature,
            top_p=top_p,
            length=length,
            context=context,
            batch=n_samples,
            vocab=vocab,
            seed=seed,
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
    return (
        method,
        s["steps"],
        s["length"],
        s["temperature"],
        s["top_p"],
        s["seed"],
        s["batch"],
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
    # confidence writes the most whole stories on the default model (README, Samplers)
    default_method = "confidence" if "confidence" in methods else methods[0]

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
            max_length=MAX_TEMPLATE_CHARS,
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
            temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0: argmax)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            fps = gr.Slider(MIN_FPS, MAX_FPS, value=15, step=1, label="Animation speed (frames/s)")
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
            concurrency_limit=WORKERS,
            show_progress="minimal",  # keep the animated text visible while it streams
            preprocess=False,  # raw values: every range is checked here, with our messages
        )
        replay.input(app.replay, [state, replay], text, api_name="replay", preprocess=False)
    demo.queue(default_concurrency_limit=WORKERS, max_size=QUEUE_SIZE)
    demo.jif_app = app  # the caches, for tests and for warming up
    return demo


def main(argv: list[str] | None = None) -> None:
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    cfg = tyro.cli(AppConfig, args=argv, description=__doc__.split("\n\n")[0])
    problem = serve.address_problem(cfg.host, cfg.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    listed = scan_checkpoints(cfg.root, item="ema" if cfg.ema else "params")
    if not listed and not cfg.checkpoint:
        print(no_checkpoint_message(cfg.root), flush=True)
    demo = build_demo(cfg.root, cfg.checkpoint, ema=cfg.ema)
    try:
        demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)
    except OSError as e:  # taken between the check and the launch
        print(
            f"error: cannot serve on {cfg.host}:{cfg.port}: {e}; pass another --port.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
