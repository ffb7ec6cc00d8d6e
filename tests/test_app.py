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
import types
import urllib.request

import gradio_client
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gradio_client.exceptions import AppError

import app
from jif import render, sampling, train
from jif.stories import check_text
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
        seed=0,
        n_samples=2,
        fps=app.MAX_FPS,
        template="Tom saw [MASK:6] happy.",
    )
    args.update(kw)
    return list(args.values())


def run_job(client, args):
    job = client.submit(*args, api_name="/generate")
    final = job.result(timeout=120)
    return job.outputs(), final


def test_streams_frames_and_ends_without_placeholders(fake_server):
    _, url, good, _, loaded = fake_server
    client = gradio_client.Client(url, verbose=False)
    outputs, final = run_job(client, generate_args(good))
    htmls = [o[0] for o in outputs]
    assert len(htmls) >= 4, "a job streams several intermediate frames"
    assert render.PLACEHOLDER_CLASS in htmls[0]
    assert render.PLACEHOLDER_CLASS not in final[0]
    counts = [h.count(render.PLACEHOLDER_CLASS) for h in htmls]
    assert counts == sorted(counts, reverse=True), "placeholders only ever disappear"
    assert counts[0] > counts[-2] >= counts[-1] == 0
    assert render.NEW_CLASS in htmls[1], "newly revealed tokens are highlighted"
    # Replay from the stored trajectory (same session): step 0 shows the template again.
    assert client.predict(0, api_name="/replay").count(render.PLACEHOLDER_CLASS) == counts[0]
    assert render.PLACEHOLDER_CLASS not in client.predict(12, api_name="/replay")


def test_fake_answer_text_and_scores(fake_server):
    demo, _, good, _, loaded = fake_server
    handler = demo.jif_app
    _, samples = handler.run_sampler(
        good, "confidence", 8, 24, 1.0, 1.0, 0, 1, "Tom saw [MASK:6] happy."
    )
    tok = loaded.tokenizer
    template = encode_template(tok, "Tom saw [MASK:6] happy.", length=24)
    target = np.asarray(tok.encode(TARGET * 20)[:24])
    masked = template == tok.mask_id
    want = np.where(masked, target, template)  # the fake's answer where the template masks
    np.testing.assert_array_equal(samples.result.tokens, want[None])
    first = sampling.first_frame(samples.result.trajectory)[0]
    assert (first[~masked] == 0).all() and (first[masked] > 0).all()
    prob = samples.result.trajectory.prob[0]
    assert np.allclose(prob[masked], 1.0, atol=1e-3), "fake logits put p~1 on target"
    text = tok.decode(want)
    assert samples.texts == [text]
    assert samples.scores == [check_text(text.replace("<|endoftext|>", " ").strip())]
    frames, revealed, conf = render.step_statistics(samples)
    np.testing.assert_array_equal(frames, np.arange(1, samples.n_steps + 1))
    assert revealed.sum() == masked.sum()
    np.testing.assert_allclose(conf[revealed > 0], 1.0, atol=1e-3)
    assert np.isnan(conf[revealed == 0]).all()


def test_bad_inputs_are_errors_and_server_keeps_serving(fake_server, capfd):
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
        "temperature": (generate_args(good, temperature=-1), "temperature=-1"),
        "top-p 0": (generate_args(good, top_p=0), "top-p=0"),  # below the slider: no gradio check
        "slow animation": (generate_args(good, fps=1), "from 5 to 60 frames/s"),
        "marker case": (generate_args(good, template="Tom [mask:3]"), "write [MASK] for one"),
        "marker 0": (generate_args(good, template="Tom [MASK:0]"), "must be from 1"),
        "huge marker": (generate_args(good, template="[MASK:100000000]"), "sequence length 24"),
        "corrupt": (generate_args(bad), "Could not load checkpoint"),
        "outside root": (generate_args("/etc"), "not a checkpoint under"),
    }
    for name, (args, needle) in cases.items():
        with pytest.raises(AppError) as err:
            client.predict(*args, api_name="/generate")
        assert needle.lower() in str(err.value).lower(), (name, str(err.value))
    _, final = run_job(client, generate_args(good))
    assert render.PLACEHOLDER_CLASS not in final[0]
    # A visitor's mistake is one line in the terminal, never a traceback.
    err = capfd.readouterr().err
    assert "Traceback" not in err
    refused = [line for line in err.splitlines() if line.startswith("[app] refused: ")]
    assert len(refused) == len(cases), err


def test_two_users_each_get_their_own_animation(fake_server):
    _, url, good, _, _ = fake_server
    a, b = gradio_client.Client(url, verbose=False), gradio_client.Client(url, verbose=False)
    ja = a.submit(*generate_args(good, fps=30, seed=1), api_name="/generate")
    jb = b.submit(*generate_args(good, fps=30, seed=2, n_samples=1), api_name="/generate")
    fa, fb = ja.result(timeout=120), jb.result(timeout=120)
    assert fa[0].count(render.SAMPLE_CLASS) == 2 and fb[0].count(render.SAMPLE_CLASS) == 1
    assert len(ja.outputs()) >= 4 and len(jb.outputs()) >= 4


def test_second_generate_reuses_model_and_compiled_sampler(fake_server, monkeypatch):
    demo, _, good, _, _ = fake_server
    handler = demo.jif_app
    handler.run_sampler(good, "random", 5, 16, 1.0, 1.0, 0, 1, "Tom [MASK:3]")
    n_models, compiled = len(handler.models), dict(sampling._compiled)
    handler.run_sampler(good, "random", 5, 16, 1.0, 1.0, 1, 1, "Tom [MASK:3] ball")
    assert len(handler.models) == n_models
    assert dict(sampling._compiled) == compiled, "a second generate recompiled"
    # Every new step count compiles a program; the page keeps only the newest few.
    monkeypatch.setattr(sampling, "MAX_COMPILED", 2)
    for steps in (6, 7, 8):
        handler.run_sampler(good, "random", steps, 16, 1.0, 1.0, 0, 1, "Tom [MASK:3]")
    assert sampling.compiled_samplers() == 2
    assert sorted(dict(k[1])["steps"] for k in sampling._compiled) == [7, 8]


class Visitor:
    """What gr.Request tells the handler about who asks."""

    def __init__(self, host):
        self.client, self.session_hash = types.SimpleNamespace(host=host), "s"


def test_one_visitor_cannot_hold_every_worker(fake_server, monkeypatch):
    demo, _, good, _, _ = fake_server
    handler = demo.jif_app
    slept = []
    monkeypatch.setattr(app.time, "sleep", slept.append)
    start = lambda host, **kw: handler.generate(*generate_args(good, **kw), request=Visitor(host))
    # Running jobs: generators that have drawn their first frame.
    held = [start("10.0.0.1") for _ in range(app.MAX_JOBS_PER_VISITOR)]
    for job in held:
        next(job)
    with pytest.raises(app.gr.Error, match="still running"):
        next(start("10.0.0.1"))
    other = list(start("10.0.0.2"))  # another visitor is served meanwhile
    assert render.PLACEHOLDER_CLASS not in other[-1][0]
    held.pop().close()  # a finished (or abandoned) job frees its slot
    assert render.PLACEHOLDER_CLASS not in list(start("10.0.0.1"))[-1][0]
    # The slowest animation allowed, over the most frames the fake gives, is capped in time.
    slept.clear()
    frames = list(start("10.0.0.3", method="ddpm", steps=2000, length=64, fps=app.MIN_FPS))
    assert len(frames) - 1 == len(slept) > app.MAX_ANIMATION_SECONDS * app.MIN_FPS
    assert sum(slept) == pytest.approx(app.MAX_ANIMATION_SECONDS)
    with pytest.raises(app.gr.Error, match="frames/s"):
        next(start("10.0.0.3", fps=app.MIN_FPS - 1))


def test_frames_to_play_at_most_max_frames(fake_server):
    _, _, _, _, loaded = fake_server
    tok = loaded.tokenizer
    tokens = np.tile(encode_template(tok, "Tom", length=64), (2, 1))
    result = sampling.sample(
        loaded.denoise_fn,
        jax.random.key(0),
        tokens,
        mask_id=tok.mask_id,
        steps=64,
        method="random",
        return_trajectory=True,
    )
    samples = render.Samples.from_result(result, tok, data="stories")
    every = render.frames_to_play(samples)
    assert len(every) >= 60  # frame 0 and one frame per revealing step (62 masks, 64 steps)
    for most in (2, 5, 10):
        some = render.frames_to_play(samples, max_frames=most)
        assert len(some) == most and some[0] == 0 and some[-1] == samples.n_steps
        assert set(some) <= set(every) and some == sorted(some)


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
        update, status = client.predict(None, api_name="/rescan")
        assert update["value"] == str(run) and str(run) in status
        assert [path for _, path in update["choices"]] == [str(run)]
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
        with pytest.raises(AppError) as err:
            client.predict(*generate_args(None), api_name="/generate")
        assert "python -m jif.train" in str(err.value)
        with urllib.request.urlopen(f"{url}config") as response:
            page = response.read().decode()
        assert app.train_command(str(root)) in page


def test_frames_show_what_the_sampler_revealed(fake_server):
    """Each drawn frame has a placeholder wherever jif.sampling.replay still has a mask, and
    highlights exactly the tokens the sampler counted as revealed at the step before it;
    the animation skips only frames that reveal nothing."""
    _, _, _, _, loaded = fake_server
    tok = loaded.tokenizer
    tokens = np.tile(encode_template(tok, "Tom [MASK:5] ball.", length=24), (2, 1))
    for method, steps in (("ddpm", 6), ("confidence", 12)):  # ancestral and expected plans
        result = sampling.sample(
            loaded.denoise_fn,
            jax.random.key(3),
            tokens,
            mask_id=tok.mask_id,
            steps=steps,
            method=method,
            return_trajectory=True,
        )
        samples = render.Samples.from_result(result, tok, data="tinystories")
        assert samples.scores is None
        counts = np.asarray(result.trajectory.counts)
        for step in range(samples.n_steps + 1):
            frame = sampling.replay(result.trajectory, result.tokens, step, tok.mask_id)
            boxes = render.render_step(samples, step).split(f'class="{render.SAMPLE_CLASS}"')[1:]
            assert len(boxes) == 2
            masks = [box.count(render.PLACEHOLDER_CLASS) for box in boxes]
            assert masks == (frame == tok.mask_id).sum(axis=1).tolist(), (method, step)
            new = [box.count(render.NEW_CLASS) for box in boxes]
            assert new == (counts[:, step - 1].tolist() if step else [0, 0]), (method, step)
        played = render.frames_to_play(samples)
        assert played[0] == 0 and played[-1] == samples.n_steps
        revealing = counts.sum(axis=0) > 0  # step s shows in frame s + 1
        assert all(revealing[f - 1] for f in played[1:-1])
        assert all(f in played for f in range(1, samples.n_steps + 1) if revealing[f - 1])


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
    got = app.validate_settings("confidence", 4.0, 16, 1, 0.5, 3, 2)
    assert got[1:] == (4, 16, 1.0, 0.5, 3, 2)
    assert app.validate_settings("ddpm", 8, 16, 0, 1, 0, 1)[3] == 0.0  # argmax, as in the CLI
    cfg = app.AppConfig()
    assert (cfg.host, cfg.share, cfg.root) == ("127.0.0.1", False, "runs")
    assert app._is_inside("/a/b/c", "/a/b") and not app._is_inside("/a/bc", "/a/b")


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
        assert render.PLACEHOLDER_CLASS in outputs[0][0]
        assert render.PLACEHOLDER_CLASS not in final[0]
        with pytest.raises(AppError, match="context"):
            client.predict(*generate_args(listed[0][1], length=64), api_name="/generate")
        for how in ("incompatible", "corrupt"):
            dest = os.path.join(tiny_run, how, "checkpoints", "2")
            with pytest.raises(AppError, match="Could not load checkpoint"):
                path = break_copy(listed[0][1], dest, how)
                client.predict(*generate_args(path, length=32), api_name="/generate")
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
