"""jif.train under attack: bad flags, non-finite updates, corrupt checkpoints, two writers,
signals, torn logs, changed settings. Each test fails on a training loop without the guard."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import FLAGS as TRAIN_FLAGS
from test_train import TINY, _tiny_optimizer
from test_train import _params_np as _params

from jif import checkpoint, data, loop, objectives, run_folder, train

FLAGS = [*TRAIN_FLAGS, "--n-samples", "0"]


def _flip_a_byte(step_dir):
    """Changes one byte in the middle of the largest array file of the EMA item."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "ema")) for f in fs]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(data)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--b2", "1.5"], "--b2"),
        (["--clip", "-1"], "--clip"),
        (["--ema", "nan"], "--ema"),
        (["--on-nonfinite", "ignore"], "--on-nonfinite"),
    ],
)
def test_out_of_range_flags_exit_2_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, "--steps", "1", *flags, "--out", "None"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def _nan_gradient(model, batch, key, *, mask_id):
    """The MDLM loss plus 0 * sqrt(0): the loss stays finite, the gradient is NaN."""
    loss, aux = objectives.mdlm(model, batch, key, mask_id=mask_id)
    w = model.embed.table.value.data_array
    return loss + 0.0 * jnp.sqrt(jnp.sum(w) - jnp.sum(w)), aux


@pytest.fixture
def nan_objective(monkeypatch):
    nan = dataclasses.replace(objectives.OBJECTIVES["mdlm"], loss=_nan_gradient)
    monkeypatch.setitem(objectives.OBJECTIVES, "nan_grad", nan)


def test_finite_loss_with_nan_gradient_stops_and_keeps_nothing_non_finite(
    tmp_path, nan_objective, capsys
):
    out = str(tmp_path / "run")
    cfg = train.configure(**TINY, steps=3, objective="nan_grad", eval_every=0, ckpt_every=1)
    result = train.run(dataclasses.replace(cfg, out=out))
    assert result["diverged"] and result["steps"] == 0
    err = capsys.readouterr().err
    lower = f"--lr {train.resolve(cfg).optim.lr / 3:g}"  # a third of the optimizer's default
    assert "non-finite gradient norm at step 1" in err and lower in err
    assert checkpoint.list_checkpoints(out) == []  # nothing was saved
    rows = run_folder.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert rows[-1]["event"] == "diverged"

    # --on-nonfinite skip: every update is dropped, the weights stay the initial ones.
    skip = train.run(dataclasses.replace(cfg, out=out + "-skip", on_nonfinite="skip"))
    assert not skip["diverged"] and skip["steps"] == 3 and np.isnan(skip["losses"]).all()
    init = _params(
        checkpoint.init_model(train.resolve_model_config(train.resolve(cfg), 2050), 0)[1]
    )
    for k, v in _params(skip["final_params"]).items():
        np.testing.assert_array_equal(v, init[k], err_msg=k)
    saved = checkpoint.load_for_inference(out + "-skip", ema=False)
    assert saved.step == 3 and all(np.isfinite(v).all() for v in _params(saved.params).values())


def test_unguarded_step_without_ema_equals_the_guarded_step_and_applies_a_nan_update():
    """The sweep's step (ema=None, guard=False) makes the same parameters as jif.train's on
    finite steps and keeps no EMA; on a NaN gradient it says so and applies the update, where
    the guarded step keeps the previous state."""
    tok, unbound, params, tx = _tiny_optimizer("adamw", 1e-2, {}, 3)
    batch = next(data.TokenBatches("stories", tok, split="train", batch_size=4, seq_len=32))

    def make(**kw):
        return jax.jit(loop.make_train_step(unbound, tx, seed=0, mask_id=tok.mask_id, **kw))

    guarded, lean = make(ema=0.9), make(ema=None, guard=False)
    a, b = loop.init_state(params, tx), loop.init_state(params, tx, ema=False)
    for _ in range(3):
        a, ma = guarded(a, batch)
        b, mb = lean(b, batch)
        assert bool(ma["finite"]) and bool(mb["finite"])
        assert float(ma["loss"]) == float(mb["loss"])
    assert "ema" in a and "ema" not in b
    for k, v in _params(a["params"]).items():
        np.testing.assert_array_equal(_params(b["params"])[k], v, err_msg=k)

    kept = make(ema=0.9, custom_loss=_nan_gradient)(a, batch)[0]
    applied, metrics = make(ema=None, guard=False, custom_loss=_nan_gradient)(b, batch)
    assert not bool(metrics["finite"])
    assert all(np.isfinite(v).all() for v in _params(kept["params"]).values())
    assert any(np.isnan(v).any() for v in _params(applied["params"]).values())


def test_huge_learning_rate_stops_with_a_command_that_works(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = [
        *FLAGS,
        "--optimizer",
        "adamw",
        "--steps",
        "6",
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--eval-every",
        "0",
    ]
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--ckpt-every", "1", "--out", out])
    assert e.value.code == 1
    err = capsys.readouterr().err
    kept = checkpoint.list_checkpoints(out)
    assert "non-finite" in err and kept and f"step {kept[0].step}" in err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python -m jif.train") and "--resume" in command
    assert "--lr 3.33333e+29" in command and "--preset tiny" in command
    # The command it prints is accepted (a lower learning rate may change on resume); this
    # one is still far too high, so it diverges again (exit 1, not a settings error).
    with pytest.raises(SystemExit) as e:
        train.main(command.split()[3:])
    assert e.value.code == 1
    rows = run_folder.read_metrics(os.path.join(out, "metrics.jsonl"))
    assert any(r.get("event") == "resumed" and "lr" in r["changed"] for r in rows)


def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = train.configure(**TINY, steps=6, eval_every=0, ckpt_every=2, keep=3, out=out)
    fresh = train.run(cfg)
    shutil.rmtree(os.path.join(out, "checkpoints", "6"))  # as if killed before the end
    newest = os.path.join(out, "checkpoints", "4")
    _flip_a_byte(newest)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_for_inference(out)
    assert newest in str(e.value)

    capsys.readouterr()
    resumed = train.run(dataclasses.replace(cfg, resume=True))
    err = capsys.readouterr().err
    assert "step 4 cannot be resumed" in err and "trying step 2" in err
    assert os.path.isdir(newest + ".corrupt")  # kept for inspection, listed nowhere
    assert [i.step for i in checkpoint.list_checkpoints(out)] == [6, 4, 2]
    assert len(resumed["losses"]) == 4  # steps 3-6 again, from step 2
    a, b = _params(fresh["final_params"]), _params(resumed["final_params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_changed_checksum_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train.run(train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=out))
    meta_path = os.path.join(out, "checkpoints", "1", "meta", "metadata")
    meta = json.load(open(meta_path))
    label = next(iter(meta["checksums"]["ema"]))
    meta["checksums"]["ema"][label] = "0" * 64
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.load_for_inference(out)
    checkpoint.load_for_inference(out, ema=False)  # the raw weights are intact


def test_one_writer_per_run_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": os.uname().nodename, "pid": alive.pid, "started": "now"}
        (out / ".lock").write_text(json.dumps(lock))
        cfg = train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=str(out))
        with pytest.raises(ValueError, match=f"another jif.train \\(process {alive.pid}"):
            train.run(cfg)
        assert not (out / "checkpoints").exists()  # refused before writing anything
    finally:
        alive.kill()
        alive.wait()
    assert train.run(cfg)["steps"] == 1  # the owner is gone: a stale lock is taken over
    assert not (out / ".lock").exists()  # released at the end


def _wait_for_step(metrics, step, proc, deadline=300):
    end = time.time() + deadline
    while True:
        assert proc.poll() is None, "training exited before the signal"
        assert time.time() < end, "training made no progress"
        rows = run_folder.read_metrics(str(metrics))
        if any(r.get("step", 0) >= step and "loss" in r for r in rows):
            return
        time.sleep(0.05)


def test_sigterm_saves_the_current_step_and_resume_matches(tmp_path):
    out = tmp_path / "run"
    steps = 40
    argv = [*FLAGS, "--steps", str(steps), "--eval-every", "0", "--ckpt-every", "1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jif.train", *argv, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err
    saved = checkpoint.list_checkpoints(str(out))
    assert len(saved) == 1 and 3 <= saved[0].step < steps
    assert "--resume" in err and "stopped by SIGTERM" in err

    resumed = train.main([*argv, "--out", str(out), "--resume"])
    fresh = train.run(train.configure(**TINY, steps=steps, eval_every=0))
    a, b = _params(fresh["final_params"]), _params(resumed["final_params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rows = [r for r in run_folder.read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step logged once


def test_metrics_jsonl_stays_valid_json_without_duplicates(tmp_path):
    out = str(tmp_path / "run")
    cfg = train.configure(**TINY, steps=4, eval_every=2, ckpt_every=2, keep=5, out=out)
    train.run(cfg)
    shutil.rmtree(os.path.join(out, "checkpoints", "4"))  # as after a crash past step 2
    path = os.path.join(out, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a line torn by the crash
    train.run(dataclasses.replace(cfg, resume=True))
    run_folder.Logger(out, start=4).log({"step": 4, "event": "x", "nan": float("nan")})

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    rows = [strict(line) for line in open(path)]
    train_steps = [r["step"] for r in rows if "loss" in r and "event" not in r]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_nelbo" in r] == [2, 4]
    assert rows[-1]["nan"] is None


def test_resume_with_another_model_size_says_what_differs(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.run(train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=out))
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, "--preset", "cpu", "--steps", "2", "--out", out, "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "preset: 'tiny' vs 'cpu'" in err and "Traceback" not in err


def test_folders_of_runs_and_unwritable_folders_are_refused(tmp_path):
    runs = tmp_path / "runs"
    train.run(train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=str(runs / "a")))
    cfg = train.configure(**TINY, steps=2, eval_every=0, out=str(runs), resume=True)
    with pytest.raises(ValueError, match="folder of runs .*--out .*a"):
        train.run(cfg)
    assert sorted(os.listdir(runs)) == ["a"]  # no stray checkpoints folder
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write the run folder"):
        train.run(dataclasses.replace(cfg, out=str(blocker / "run"), resume=False))


def test_newest_checkpoint_is_the_highest_step_whatever_the_file_times(tmp_path):
    out = str(tmp_path / "run")
    train.run(train.configure(**TINY, steps=2, eval_every=0, ckpt_every=1, keep=3, out=out))
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    old = os.path.join(copy, "checkpoints", "1")
    for d, _, files in os.walk(old):  # the older step now looks newer on disk
        for f in files:
            os.utime(os.path.join(d, f))
        os.utime(d)
    assert [i.step for i in checkpoint.list_checkpoints(copy)] == [2, 1]
    assert checkpoint.load_for_inference(copy).step == 2


def test_resume_on_changed_data_is_refused(tmp_path):
    text = tmp_path / "stories.txt"
    docs = ["Once upon a time, a girl named Lily found a red ball. She was happy."] * 200
    text.write_text("\n\n".join(docs))
    out = str(tmp_path / "run")
    cfg = train.configure(**TINY, data=str(text), steps=1, eval_every=0, ckpt_every=1, out=out)
    train.run(cfg)
    train.run(dataclasses.replace(cfg, steps=2, resume=True))  # the same file: fine
    text.write_text("\n\n".join(d.replace("Lily", "Mia") for d in docs))  # edited in place
    with pytest.raises(checkpoint.CheckpointError, match="not the data of the checkpoint"):
        train.run(dataclasses.replace(cfg, steps=3, resume=True))
