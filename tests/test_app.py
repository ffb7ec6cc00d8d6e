"""app.py through gradio_client against the page launched in-process.

Two back-ends: a fake denoiser whose answer is known exactly (fast; checks the animation,
the replay and the error paths) and a real tiny checkpoint written by `jif.train.main`
(checks that the page opens what training writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
import types
import urllib.request

import gradio as gr
import gradio_client
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import app
from jif import floor, live, render, sampling, studio, train
from jif.tokenizer import encode_template, load_tokenizer

N_BPE = 512
TARGET = "Tom saw a big red ball. He was happy. "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(demo):
    """The page launched in-process on a free port: yields its URL, closes it afterwards."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@dataclasses.dataclass(frozen=True)
class FakeLoaded:
    """Stands in for checkpoint.LoadedModel: a real tokenizer, a denoiser with a known answer."""

    tokenizer: object
    denoise_fn: object
    data: str = "stories"
    step: int = 7
    config: dict = dataclasses.field(default_factory=lambda: {"seq_len": 64})
    model: object = None
    model_config: object = None


@dataclasses.dataclass(frozen=True)
class FakeInfo:
    path: str
    run_dir: str
    step: int
    data: str
    val_nelbo: float | None
    config: dict


def fake_weights(step_dir) -> str:
    """The files jif.checkpoint.weights_present looks for in a step folder's "ema" item."""
    data = os.path.join(step_dir, "ema", "d")
    os.makedirs(data, exist_ok=True)
    for path in (os.path.join(step_dir, "ema", "_METADATA"), os.path.join(data, "0")):
        with open(path, "w") as f:
            f.write("{}")
    return str(step_dir)


def fake_loaded() -> FakeLoaded:
    """Logits that put probability ~1 on TARGET's token at each position (any input)."""
    tok = load_tokenizer(N_BPE)
    ids = tok.encode(TARGET * 20)
    v = tok.vocab_size

    def denoise(tokens):
        length = tokens.shape[1]
        target = jnp.asarray(ids[:length])
        logits = jnp.full((length, v), -30.0).at[jnp.arange(length), target].set(0.0)
        return jnp.broadcast_to(logits, (tokens.shape[0], length, v))

    return FakeLoaded(tokenizer=tok, denoise_fn=denoise)


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """The page on a free port over a root holding one fake run and one corrupt run."""
    root = tmp_path_factory.mktemp("runs")
    good, bad = root / "good" / "checkpoints" / "7", root / "broken" / "checkpoints" / "3"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    fake_weights(good)  # the broken one has no weights: listed by the source, not by the page
    loaded = fake_loaded()
    real_load = app.ckpt.load_for_inference

    def load(path, *, ema=True):
        if os.path.realpath(path) == os.path.realpath(good):
            return loaded
        return real_load(path, ema=ema)  # the real loader, on a folder that is not a checkpoint

    infos = [
        FakeInfo(str(good), str(root / "good"), 7, "stories", 3.25, {}),
        FakeInfo(str(bad), str(root / "broken"), 3, "stories", None, {}),
    ]
    source = types.SimpleNamespace(list_checkpoints=lambda r: infos, load_for_inference=load)
    demo = app.build_demo(str(root), source=source)
    with served(demo) as url:
        yield demo, url, str(good), str(bad), loaded


def generate_args(path, **kw):
    args = dict(
        path=path,
        method="confidence",
        steps=12,
        length=24,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        block_length=0,
        seed=0,
        n_samples=2,
        fps=app.MAX_FPS,
        template="Tom saw [MASK:6] happy.",
        compare=False,
        method_b="ddpm_cache",
        path_b=None,
        colouring="reveal order",
        self_condition="fresh",
    )
    args.update(kw)
    return list(args.values())


def run_job(client, args):
    job = client.submit(*args, api_name="/generate")
    final = job.result(timeout=120)
    return job.outputs(), final


def error_of(html: str) -> str | None:
    """The message of an error box in the output area, or None."""
    return html if render.ERROR_CLASS in html else None


def live_run(loaded, template, *, method, steps, length=24, batch=2, seed=3):
    tok = loaded.tokenizer
    tokens = np.tile(encode_template(tok, template, length=length), (batch, 1))
    run = live.LiveRun(
        lambda stream: sampling.sample(
            loaded.denoise_fn,
            jax.random.key(seed),
            tokens,
            mask_id=tok.mask_id,
            steps=steps,
            method=method,
            return_trajectory=True,
            stream=stream,
        ),
        mask_id=tok.mask_id,
    )
    run.join()
    assert run.error is None, run.error
    return run, render.Samples.from_run(run, tok, label=method, data=loaded.data)


def test_streams_frames_and_ends_without_placeholders(fake_server):
    _, url, good, _, loaded = fake_server
    client = gradio_client.Client(url, verbose=False)
    outputs, final = run_job(client, generate_args(good))
    htmls = [o[0] for o in outputs if render.SAMPLE_CLASS in o[0]]
    assert len(htmls) >= 4, "a job streams several intermediate frames"
    assert render.PLACEHOLDER_CLASS in htmls[0]
    assert render.PLACEHOLDER_CLASS not in final[0]
    counts = [h.count(render.PLACEHOLDER_CLASS) for h in htmls]
    assert counts == sorted(counts, reverse=True), "placeholders only ever disappear"
    assert counts[0] > counts[-2] >= counts[-1] == 0
    assert render.NEW_CLASS in htmls[1], "newly revealed tokens are marked"
    # The final frame keeps every generated token coloured, the template's tokens marked.
    row = encode_template(loaded.tokenizer, "Tom saw [MASK:6] happy.", length=24)
    n_masked = int((row == loaded.tokenizer.mask_id).sum())
    assert final[0].count(render.TOKEN_CLASS) == 2 * n_masked
    assert final[0].count(render.FIXED_CLASS) == 2 * (24 - n_masked)  # the BOS too, as ""
    assert "model&#x27;s top tokens" in final[0] and "sampled with p" in final[0]
    assert "#jif-text-b" not in final[1] and render.SAMPLE_CLASS not in final[1]
    assert "| A: confidence | 12 |" in final[5], final[5]  # the summary: 12 network calls
    # Replay over the network calls (same session): call 0 shows the template again, every
    # masked position of both panels a placeholder (the stream may drop its first frames).
    at0, _ = client.predict(0, "reveal order", api_name="/replay")
    assert at0.count(render.PLACEHOLDER_CLASS) == 2 * n_masked >= counts[0]
    last, _ = client.predict(12, "confidence", api_name="/replay")
    assert render.PLACEHOLDER_CLASS not in last and "sampled with p:" in last


def test_fake_answer_text_and_statistics(fake_server):
    _, _, _, _, loaded = fake_server
    tok = loaded.tokenizer
    run, s = live_run(loaded, "Tom saw [MASK:6] happy.", method="confidence", steps=8, batch=1)
    template = encode_template(tok, "Tom saw [MASK:6] happy.", length=24)
    target = np.asarray(tok.encode(TARGET * 20)[:24])
    masked = template == tok.mask_id
    want = np.where(masked, target, template)  # the fake's answer where the template masks
    np.testing.assert_array_equal(run.result.tokens, want[None])
    assert s.done and s.n_calls == 8 and len(s.frames) == 9
    assert (s.reveal_frame[0, ~masked] == 0).all() and (s.reveal_frame[0, masked] > 0).all()
    # The model's top token at the revealing call is the fake's answer, with p ~ 1.
    np.testing.assert_array_equal(s.top_ids[0, masked, 0], target[masked])
    np.testing.assert_allclose(s.top_probs[0, masked, 0], 1.0, atol=1e-3)
    np.testing.assert_allclose(s.prob[0, masked], 1.0, atol=1e-3)
    assert s.texts == [tok.decode(want)]
    assert s.reports == [floor.check_stories([tok.decode(want)])]
    st = render.call_statistics(s)
    np.testing.assert_array_equal(st["calls"], np.arange(1, 9))
    assert st["revealed"].sum() == masked.sum() and not st["remasked"].any()
    np.testing.assert_allclose(st["confidence"][st["revealed"] > 0], 1.0, atol=1e-3)
    # Entropy of the masked positions under a near one-hot model: ~0 while any are masked.
    v = tok.vocab_size - 1  # the mask token is never predicted
    p = 1 / (1 + (v - 1) * np.exp(-30.0))
    expected = -(p * np.log(p) + (1 - p) * np.log((1 - p) / (v - 1)))
    np.testing.assert_allclose(st["entropy"][: int(masked.sum())], expected, rtol=1e-3, atol=1e-9)
    assert "whole stories" in render.summary_markdown([s], "stories")


def test_frames_are_the_sampler_states_at_each_call(fake_server):
    """Frame c is what the sampler's trajectory says the tokens were after c steps (one call
    a step for these methods); each frame's placeholders and marked tokens follow it."""
    _, _, _, _, loaded = fake_server
    tok = loaded.tokenizer
    for method, steps in (("ddpm", 6), ("confidence", 12)):  # ancestral and expected plans
        run, s = live_run(loaded, "Tom [MASK:5] ball.", method=method, steps=steps)
        traj = run.result.trajectory
        assert s.n_calls == traj.n_steps == len(s.frames) - 1
        for c in range(s.last + 1):
            want = sampling.replay(traj, run.result.tokens, c, tok.mask_id)
            np.testing.assert_array_equal(s.frames[c], want, err_msg=f"{method} call {c}")
            boxes = render.render_frame(s, c).split(f'class="{render.SAMPLE_CLASS}"')[1:]
            assert len(boxes) == 2
            masks = [box.count(render.PLACEHOLDER_CLASS) for box in boxes]
            assert masks == (want == tok.mask_id).sum(axis=1).tolist(), (method, c)
            new = [box.count(render.NEW_CLASS) for box in boxes]
            counts = np.asarray(traj.counts)
            assert new == (counts[:, c - 1].tolist() if c else [0, 0]), (method, c)


def test_bad_inputs_are_errors_that_stay_on_the_page(fake_server, capfd):
    _, url, good, bad, _ = fake_server
    client = gradio_client.Client(url, verbose=False)
    capfd.readouterr()
    cases = {
        "empty": (generate_args(good, template="   "), "template is empty"),
        "too long": (generate_args(good, template="word " * 80), "length"),
        "huge": (generate_args(good, template="w" * 5000), "at most 4000"),
        "context": (generate_args(good, length=400), "context"),
        "steps": (generate_args(good, steps=-3), "steps"),
        "steps 4.5": (generate_args(good, steps=4.5), "steps=4.5: must be a whole number"),
        "many steps": (generate_args(good, steps=5000), "at most 2000"),
        "seed": (generate_args(good, seed=-5), "seed"),
        "method": (generate_args(good, method="nope"), "nope"),
        "method B": (generate_args(good, compare=True, method_b="nope"), "nope"),
        "temperature": (generate_args(good, temperature=-1), "temperature=-1"),
        "top-p 0": (generate_args(good, top_p=0), "top-p=0"),  # below the slider: no gradio check
        "top-k": (generate_args(good, top_k=-2), "top_k=-2"),
        "blocks": (generate_args(good, block_length=5), "multiple of the number of blocks"),
        "slow animation": (generate_args(good, fps=1), "from 5 to 60 frames/s"),
        "marker case": (generate_args(good, template="Tom [mask:3]"), "write [MASK] for one"),
        "marker space": (generate_args(good, template="Tom [MASK: 3]"), "no spaces"),
        "marker word": (generate_args(good, template="Tom [MASK:abc]"), "is not a mask marker"),
        "marker 0": (generate_args(good, template="Tom [MASK:0]"), "must be from 1"),
        "huge marker": (generate_args(good, template="[MASK:100000000]"), "sequence length 24"),
        "corrupt": (generate_args(bad), "Could not load checkpoint"),
        "outside root": (generate_args("/etc"), "not a checkpoint under"),
    }
    for name, (args, needle) in cases.items():
        outputs, final = run_job(client, args)
        message = error_of(final[0])
        assert message and needle.lower() in message.lower(), (name, final[0])
        assert final[3] is None and final[5] == "", "nothing stale stays beside the error"
    _, final = run_job(client, generate_args(good))
    assert render.PLACEHOLDER_CLASS not in final[0] and error_of(final[0]) is None
    # A visitor's mistake is one line in the terminal, never a traceback.
    err = capfd.readouterr().err
    assert "Traceback" not in err
    refused = [line for line in err.splitlines() if line.startswith("[app] refused: ")]
    assert len(refused) == len(cases), err


def test_compare_runs_two_methods_on_the_same_seed(fake_server):
    _, url, good, _, _ = fake_server
    client = gradio_client.Client(url, verbose=False)
    args = generate_args(good, compare=True, method="random", method_b="ddpm_cache", steps=8)
    outputs, final = run_job(client, args)
    a, b = final[0], final[1]
    assert a.count(render.SAMPLE_CLASS) == 2 and b.count(render.SAMPLE_CLASS) == 2
    assert "A: random" in a and "B: ddpm_cache" in b
    assert render.PLACEHOLDER_CLASS not in a + b
    assert any(render.PLACEHOLDER_CLASS in o[1] for o in outputs), "B streams in its column"
    summary = final[5]
    assert "| A: random | 8 |" in summary and "| B: ddpm_cache |" in summary, summary
    # The fake's answer does not depend on the method: both columns end with the same text.
    strip = lambda h: h.split("</div>", 1)[1]  # past the legend
    left, right = client.predict(100, "confidence", api_name="/replay")
    assert strip(left).count("jif-token") == strip(right).count("jif-token")


def test_stop_ends_the_run_at_its_next_call(fake_server, monkeypatch):
    _, url, good, _, _ = fake_server
    push = live.LiveRun._push
    monkeypatch.setattr(
        live.LiveRun, "_push", lambda run, call: (time.sleep(0.01), push(run, call))
    )
    client = gradio_client.Client(url, verbose=False)
    job = client.submit(
        *generate_args(good, method="ddpm", steps=2000, length=64, fps=app.MIN_FPS),
        api_name="/generate",
    )
    for _ in range(600):  # until the first frame is on the page (at most a minute)
        if any(render.SAMPLE_CLASS in o[0] for o in job.outputs()):
            break
        time.sleep(0.1)
    client.predict(api_name="/stop")
    final = job.result(timeout=120)
    assert "stopped" in final[0] and render.SAMPLE_CLASS in final[0]
    calls = int(final[5].split("| A: ddpm | ")[1].split(" |")[0])
    assert 0 < calls < 2000, final[5]


def test_second_generate_reuses_model_and_compiled_sampler(fake_server, monkeypatch):
    demo, _, good, _, loaded = fake_server
    handler = demo.jif_app
    prepare = lambda steps, seed, template: handler.prepare(
        handler.load(good), "random", steps, 16, 1.0, 1.0, 0, 0, seed, 1, template, label="t"
    )(lambda call: None)
    prepare(5, 0, "Tom [MASK:3]")
    n_models, compiled = len(handler.models), dict(sampling._compiled)
    prepare(5, 1, "Tom [MASK:3] ball")
    assert len(handler.models) == n_models
    assert dict(sampling._compiled) == compiled, "a second generate recompiled"
    # Every new step count compiles a program; the page keeps only the newest few.
    monkeypatch.setattr(sampling, "MAX_COMPILED", 2)
    for steps in (6, 7, 8):
        prepare(steps, 0, "Tom [MASK:3]")
    assert sampling.compiled_samplers() == 2
    assert sorted(dict(k[1])["steps"] for k in sampling._compiled) == [7, 8]
    # The self-conditioning control: "previous" needs a model trained with it.
    with pytest.raises(gr.Error, match="self-conditioning input=previous: this model was trained"):
        handler.prepare(
            handler.load(good), "random", 5, 16, 1.0, 1.0, 0, 0, 0, 1, "Tom [MASK:3]",
            label="t", self_condition="previous",
        )  # fmt: skip
    with pytest.raises(gr.Error, match="self-conditioning input='later': must be one of"):
        app.validate_settings("ddpm", 8, 16, 1, 1, 0, 1, self_condition="later")


class Visitor:
    """What gr.Request tells the handler about who asks."""

    def __init__(self, host):
        self.client, self.session_hash = types.SimpleNamespace(host=host), host


def test_one_visitor_cannot_hold_every_worker(fake_server):
    demo, _, good, _, _ = fake_server
    handler = demo.jif_app
    start = lambda host, **kw: handler.generate(*generate_args(good, **kw), request=Visitor(host))
    # Running jobs: generators that have drawn their first frame.
    held = [start("10.0.0.1") for _ in range(studio.MAX_JOBS_PER_VISITOR)]
    for job in held:
        next(job)
    assert "still running" in error_of(next(start("10.0.0.1"))[0])
    other = list(start("10.0.0.2"))  # another visitor is served meanwhile
    assert render.PLACEHOLDER_CLASS not in other[-1][0]
    held.pop().close()  # a finished (or abandoned) job frees its slot
    assert render.PLACEHOLDER_CLASS not in list(start("10.0.0.1"))[-1][0]
    assert "frames/s" in error_of(next(start("10.0.0.3", fps=app.MIN_FPS - 1))[0])
    # The speed slider reaches a running generation of the same session.
    handler.set_fps(7, request=Visitor("10.0.0.4"))
    assert handler.fps["10.0.0.4"] == 7.0


def test_animation_after_a_fast_run_is_capped_in_time():
    for n_frames, shown, fps in ((2001, 40, app.MIN_FPS), (2001, -1, app.MAX_FPS), (30, 10, 15)):
        frames = studio.leftover_frames(n_frames, shown, fps)
        assert frames[-1] == n_frames - 1 and frames == sorted(set(frames))
        assert frames[0] > shown
        assert len(frames) <= min(app.MAX_FRAMES, app.MAX_ANIMATION_SECONDS * fps)
        assert len(frames) == min(n_frames - 1 - shown, app.MAX_FRAMES, int(10.0 * fps))


def test_picker_lists_only_checkpoints_with_weights(tmp_path):
    root = tmp_path / "runs"
    with_weights = fake_weights(root / "a" / "checkpoints" / "4")
    meta_only = root / "b" / "checkpoints" / "9"  # newer, but its weights are missing
    meta_only.mkdir(parents=True)
    (meta_only / "ema").mkdir()
    (meta_only / "ema" / "_METADATA").write_text("{}")
    infos = [
        FakeInfo(str(meta_only), str(root / "b"), 9, "stories", None, {}),
        FakeInfo(with_weights, str(root / "a"), 4, "stories", None, {}),
    ]
    source = types.SimpleNamespace(list_checkpoints=lambda r: infos, load_for_inference=None)
    handler = app.DiffusionApp(str(root), source=source)
    listed = handler.choices()
    assert [path for _, path in listed] == [with_weights]
    assert handler.initial_choice(listed) == with_weights
    assert app.DiffusionApp(str(root), source=source, ema=False).choices() == []  # no params


def test_rescan_lists_new_checkpoints_and_only_inside_root(tmp_path):
    root = tmp_path / "runs"
    infos = []
    asked = []

    def listing(r):
        asked.append(r)
        return list(infos)

    source = types.SimpleNamespace(list_checkpoints=listing, load_for_inference=None)
    root.mkdir()
    demo = app.build_demo(str(root), source=source)
    with served(demo) as url:
        client = gradio_client.Client(url, verbose=False)
        run = root / "r1" / "checkpoints" / "5"
        fake_weights(run)
        infos.append(FakeInfo(str(run), str(root / "r1"), 5, "stories", 2.5, {"seq_len": 32}))
        infos.append(FakeInfo("/elsewhere/x/checkpoints/9", "/elsewhere/x", 9, "s", None, {}))
        update, update_b = client.predict(None, api_name="/rescan")
        assert update["value"] == str(run)
        assert (
            [path for _, path in update["choices"]]
            == [str(run)]
            == [path for _, path in update_b["choices"]]
        )
        assert [label for label, _ in demo.jif_app.choices()] == [
            "r1 · step 5 · data stories · val NELBO 2.500"
        ]
        assert demo.jif_app.default_length(str(run)) == 32
        assert set(asked) == {str(root)}, "the picker only lists the root it was given"


def test_no_checkpoint_names_the_command(tmp_path):
    root = tmp_path / "empty"
    demo = app.build_demo(str(root))
    with served(demo) as url:
        client = gradio_client.Client(url, verbose=False)
        _, final = run_job(client, generate_args(None))
        assert "python -m jif.train --out" in error_of(final[0])
        with urllib.request.urlopen(f"{url}config") as response:
            page = response.read().decode()
        assert app.train_command(str(root)) in page
    status, _, button = demo.jif_app.open(None)
    assert app.train_command(str(root)) in status and button["interactive"] is False


def test_validate_settings_and_cli_defaults():
    cases = [  # (method, steps, length, temperature, top_p, seed, n_samples), message
        (("confidence", "abc", 16, 1.0, 1.0, 0, 1), "steps='abc': must be a whole number from 1"),
        (("confidence", 4.5, 16, 1.0, 1.0, 0, 1), "steps=4.5: must be a whole number"),
        (("confidence", 4, 16, -0.5, 1.0, 0, 1), "temperature=-0.5: must be a finite number in"),
        (("confidence", 4, 16, 1.0, float("nan"), 0, 1), "top-p=nan: must be a finite number"),
        (("confidence", 4, 16, 1.0, 1.0, -1, 1), "seed=-1: must be a whole number from 0 to"),
        (("confidence", 4, 16, 1.0, 1.0, 0, 9), "number of samples=9: this page takes at most 8"),
        (("confidence", 4, None, 1.0, 1.0, 0, 1), "length is empty"),
        (("greedy", 4, 16, 1.0, 1.0, 0, 1), "method='greedy': must be one of"),
    ]
    for args, message in cases:
        with pytest.raises(app.gr.Error) as err:
            app.validate_settings(*args)
        assert message in str(err.value.message), (args, err.value.message)
        assert not err.value.print_exception, "a visitor's mistake prints no traceback"
    got = app.validate_settings("confidence", 4.0, 16, 1, 0.5, 3, 2, top_k=5, block_length=8)
    want = dict(steps=4, length=16, temperature=1.0, top_p=0.5, seed=3, batch=2, top_k=5)
    assert {k: got[k] for k in want} == want and got["block_length"] == 8
    assert "block_length" not in app.validate_settings("ddpm", 8, 16, 0, 1, 0, 1)
    assert app.validate_settings("ddpm", 8, 16, 0, 1, 0, 1)["temperature"] == 0.0  # argmax
    cfg = app.AppConfig()
    assert (cfg.host, cfg.share, cfg.root) == ("127.0.0.1", False, "runs")
    assert studio._is_inside("/a/b/c", "/a/b") and not studio._is_inside("/a/bc", "/a/b")
    assert app.DEFAULT_METHOD == "confidence"


def test_colours_read_on_their_background():
    """Every token colour has at least WCAG AA contrast (4.5) with its text colour."""

    def luminance(hex_colour):
        c = np.array([int(hex_colour.lstrip("#")[i : i + 2], 16) / 255 for i in (0, 2, 4)])
        c = np.array([x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c])
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    for cmap in ("viridis", "cividis"):
        for v in np.linspace(0, 1, 41):
            bg, fg = render.colour(v, cmap)
            fg = {"#000": "#000000", "#fff": "#ffffff"}[fg]
            hi, lo = sorted((luminance(bg), luminance(fg)), reverse=True)
            assert (hi + 0.05) / (lo + 0.05) >= 4.5, (cmap, v, bg, fg)


# ---- the real thing: a tiny checkpoint written by training --------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_runs")
    out = root / "tiny"
    train.main(
        ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "32"]
        + ["--out", str(out), "--eval-every", "0", "--no-progress"]
    )
    return str(root)


def break_copy(step_dir: str, dest: str, how: str) -> str:
    """A copy of a step folder made incompatible (model config changed) or corrupt (no ema)."""
    shutil.copytree(step_dir, dest)
    if how == "incompatible":
        meta_path = os.path.join(dest, "meta", "metadata")
        with open(meta_path) as f:
            meta = json.load(f)
        meta["model_config"]["d_model"] *= 2
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    else:
        shutil.rmtree(os.path.join(dest, "ema"))
    return dest


# orbax leaves an "Exception ignored" behind when a restore of a broken checkpoint fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_real_tiny_checkpoint_streams_to_the_end(tiny_run):
    demo = app.build_demo(tiny_run)
    with served(demo) as url:
        listed = demo.jif_app.choices()
        assert listed and "step 2" in listed[0][0]
        assert demo.jif_app.default_length(listed[0][1]) == 32  # the training seq_len
        # --checkpoint with a run folder opens its newest step, the one the picker lists.
        given = app.DiffusionApp(tiny_run, os.path.join(tiny_run, "tiny"))
        assert given.initial_choice(given.choices()) == listed[0][1]
        client = gradio_client.Client(url, verbose=False)
        args = generate_args(listed[0][1], method="ddpm_cache", steps=8, length=32)
        outputs, final = run_job(client, args)
        assert len(outputs) >= 3
        assert render.PLACEHOLDER_CLASS in outputs[1][0]  # after the "starting" line
        assert render.PLACEHOLDER_CLASS not in final[0]
        _, bad = run_job(client, generate_args(listed[0][1], length=64))
        assert "context" in error_of(bad[0])
        for how in ("incompatible", "corrupt"):
            dest = os.path.join(tiny_run, how, "checkpoints", "2")
            path = break_copy(listed[0][1], dest, how)
            _, bad = run_job(client, generate_args(path, length=32))
            assert "Could not load checkpoint" in error_of(bad[0])
        listed_now = [path for _, path in demo.jif_app.choices()]
        assert os.path.join(tiny_run, "incompatible", "checkpoints", "2") in listed_now
        assert dest not in listed_now, "a checkpoint without its EMA weights is not offered"
        _, final = run_job(client, args)
        assert render.PLACEHOLDER_CLASS not in final[0]


def test_token_pieces_join_to_the_decoded_text():
    tok = load_tokenizer(N_BPE)
    text = "Tom said “hé 🙂” and ran.<|endoftext|>Lily"
    ids = tok.encode(text)
    pieces = render.token_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # multi-byte characters grouped


def test_main_refuses_an_address_it_cannot_serve(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv, needle in [
            (["--port", str(port)], f"port {port} on 127.0.0.1 is already in use"),
            (["--port", "70000"], "--port 70000 is not a TCP port"),
            (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not"),
            (["--host", "192.0.2.1"], "--host '192.0.2.1' is not an address of this machine"),
        ]:
            with pytest.raises(SystemExit) as e:
                app.main(["--root", str(tmp_path), *argv])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith("error: ") and needle in err, err
            assert "Traceback" not in err
