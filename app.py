"""Gradio page that animates masked-diffusion unmasking from jif checkpoints.

    python app.py                          # newest checkpoint under runs/, http://127.0.0.1:7860
    python app.py --root runs --checkpoint runs/tiny --port 7861
    python app.py --host 0.0.0.0 --share   # other machines / a public link: only when asked

The page streams each network call of the sampler as it happens (`jif.live`), then keeps
the whole run: every token coloured by the call that revealed it or by its sampled
probability, the template's text marked, a tooltip with the model's top alternatives, a
replay slider over the network calls, plots of each call and of the reveal order, and a
summary with calls, wall time and the story checker's verdict. Compare runs a second
method (or checkpoint) on the same prompt and seed. The handlers live in `jif.studio`, the
drawing in `jif.render`, the model maths in `jif.sampling`; this file puts the page together.
"""

from __future__ import annotations

import dataclasses
import sys

import gradio as gr
import tyro

from jif import checkpoint as ckpt
from jif import hostmem, render, sampling, serve
from jif.studio import (  # noqa: F401  (the page's limits and helpers, also read by tests)
    DEFAULT_METHOD,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
    MAX_ANIMATION_SECONDS,
    MAX_FPS,
    MAX_FRAMES,
    MAX_SAMPLES,
    MAX_STEPS,
    MAX_TEMPLATE_CHARS,
    MIN_FPS,
    QUEUE_SIZE,
    WORKERS,
    DiffusionApp,
    frame_rate,
    no_checkpoint_message,
    scan_checkpoints,
    train_command,
    validate_settings,
)


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


# ----------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------

EXAMPLES = [
    ["Once upon a time,"],
    ["Once upon a time, a happy girl named [MASK:2] lived near the [MASK:2]. [MASK:40]"],
    ["[MASK:40] Sara learned that it is good to be kind."],
    ["Rose was a kind girl who loved the hill. [MASK:30] Rose, Jack and the lamb were happy."],
]


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

    with gr.Blocks(title="jif: watch a masked diffusion model write") as demo:
        gr.Markdown(
            "## jif: watch a masked diffusion model write\n"
            "Every position starts masked; each network call reveals some of them. Write a "
            "prompt, or an infilling template with `[MASK]` / `[MASK:n]` holes."
        )
        status = gr.Markdown(
            no_checkpoint_message(root) if first is None else f"Checkpoint: `{first}` (loading)",
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
        gr.Examples(EXAMPLES, [template], label="Example templates")
        with gr.Row():
            method = gr.Dropdown(
                methods, value=DEFAULT_METHOD, label="Method", elem_id="jif-method"
            )
            steps = gr.Number(value=DEFAULT_STEPS, precision=0, label="Steps", elem_id="jif-steps")
            length = gr.Number(
                value=app.default_length(first), precision=0, label="Length (tokens)"
            )
            n_samples = gr.Number(value=DEFAULT_SAMPLES, precision=0, label="Samples")
            seed = gr.Number(value=0, precision=0, label="Seed")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                temperature = gr.Slider(
                    0.0, 2.0, value=1.0, step=0.05, label="Temperature (0: argmax)"
                )
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                top_k = gr.Number(value=0, precision=0, label="Top-k (0: all)")
                block_length = gr.Number(
                    value=0,
                    precision=0,
                    label="Block length (0: one block; steps a multiple of the blocks)",
                )
                fps = gr.Slider(
                    MIN_FPS, MAX_FPS, value=15, step=1, label="Animation speed (frames/s)"
                )
                self_condition = gr.Radio(
                    list(sampling.SELF_CONDITION),
                    value="fresh",
                    label="Self-conditioned models: condition each call on (fresh: its own "
                    "first pass; previous: the previous call)",
                    elem_id="jif-self-condition",
                )
        with gr.Accordion("Compare", open=False):
            with gr.Row():
                compare = gr.Checkbox(
                    value=False,
                    label="Run a second method on the same prompt and seed",
                    elem_id="jif-compare",
                )
                method_b = gr.Dropdown(
                    methods, value="ddpm_cache", label="Method B", elem_id="jif-method-b"
                )
                picker_b = gr.Dropdown(
                    choices=listed, value=first, label="Checkpoint B", allow_custom_value=True
                )
        with gr.Row():
            generate = gr.Button(
                "Generate", variant="primary", interactive=False, elem_id="jif-generate"
            )
            stop = gr.Button("Stop", interactive=False, elem_id="jif-stop")
        with gr.Row():
            text = gr.HTML(elem_id="jif-text")
            text_b = gr.HTML(visible=False, elem_id="jif-text-b")
        with gr.Row():
            replay = gr.Slider(
                0,
                1,
                value=0,
                step=1,
                label="Replay: after network call",
                elem_id="jif-replay",
                scale=3,
            )
            colouring = gr.Radio(
                list(render.COLOURINGS),
                value=render.COLOURINGS[0],
                label="Colour tokens by",
                elem_id="jif-colouring",
                scale=2,
            )
        with gr.Row():
            plot = gr.Plot(show_label=False, elem_id="jif-plot")
            order = gr.Plot(show_label=False, elem_id="jif-order")
        scores = gr.Markdown(elem_id="jif-scores")
        state = gr.State([])
        # fmt: skip

        def on_rescan(current):
            new = app.choices()
            value = current if any(p == current for _, p in new) else (new[0][1] if new else None)
            return gr.update(choices=new, value=value), gr.update(choices=new)

        opened = [status, length, generate]
        demo.load(app.open, picker, opened, api_name=False)
        picker.input(app.open, picker, opened, api_name=False)
        rescan.click(on_rescan, picker, [picker, picker_b], api_name="rescan").then(
            app.open, picker, opened, api_name=False
        )
        compare.change(lambda on: gr.update(visible=bool(on)), compare, text_b, api_name=False)
        inputs = [picker, method, steps, length, temperature, top_p, top_k, block_length, seed]
        inputs += [n_samples, fps, template, compare, method_b, picker_b, colouring, self_condition]
        outputs = [text, text_b, replay, plot, order, scores, state, generate, stop]
        generate.click(
            app.generate,
            inputs,
            outputs,
            api_name="generate",
            concurrency_limit=WORKERS,
            show_progress="hidden",  # the streamed text is the progress
            preprocess=False,  # raw values: every range is checked here, with our messages
        )
        stop.click(app.stop, None, None, api_name="stop", concurrency_limit=None, queue=False)
        fps.change(app.set_fps, fps, None, api_name=False, concurrency_limit=None, queue=False)
        replay.input(
            app.replay,
            [state, replay, colouring],
            [text, text_b],
            api_name="replay",
            preprocess=False,
        )
        colouring.change(
            app.replay, [state, replay, colouring], [text, text_b], api_name=False, preprocess=False
        )
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
