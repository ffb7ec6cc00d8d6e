"""jif.train end to end: the CLI, kill -9 + resume equality, divergence, optimizers."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from jif import checkpoint, data, loop, optim, tokenizer, train
from jif import model as model_lib

TINY = dict(
    preset="tiny",
    batch_size=4,
    seq_len=32,
    eval_sequences=4,
    eval_times=2,
    n_samples=0,
    log_every=1,
    progress=False,
)
FLAGS = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-sequences", "4"]
FLAGS += ["--eval-times", "2", "--log-every", "1", "--no-progress"]


def _params_np(params):
    return {k: np.asarray(v.data_array) for k, v in params.items()}


def test_cli_two_steps_writes_a_loadable_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*FLAGS, "--steps", "2", "--out", str(out), "--eval-every", "2", "--ckpt-every", "2"]
    # 48 tokens: long enough for some friends' introductions (val_hero_as_friend)
    result = train.main([*argv, "--n-samples", "1", "--sample-steps", "8", "--seq-len", "48"])
    assert result["steps"] == 2 and not result["diverged"]
    assert all(np.isfinite(result["losses"])) and len(result["losses"]) == 2
    assert result["val_nelbo"] is not None and np.isfinite(result["val_nelbo"])

    # The resolved config is stored in the run folder; the terminal gets a summary of it
    # and, at the end, what was reached and what to run next.
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 2 and config["model_config"]["d_model"] > 0
    printed = capsys.readouterr().out
    assert f"tiny preset ({config['model_config']['arch']} DiT" in printed
    assert f"full config: {out}/config.json" in printed
    assert f"validation NELBO {result['val_nelbo']:.3f} nats/token" in printed
    assert (
        f"checkpoint: {out}/checkpoints/2\nnext: python -m jif.sample --checkpoint {out}" in printed
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert {"tokens_per_s", "mfu", "lr", "grad_norm"} <= set(train_rows[-1])
    evals = [r for r in rows if "val_nelbo" in r]
    assert evals and evals[-1]["step"] == 2 and len(evals[-1]["samples"]) == 1
    assert 0.0 <= evals[-1]["grammar_score"] <= evals[-1]["grammatical"] <= 1.0
    assert evals[-1]["val_name_nats"] > 0 and 0 <= evals[-1]["val_name_exact"] <= 1
    assert 0 < evals[-1]["val_hero_as_friend"] < 1

    # The checkpoint loads for inference with the EMA weights and the raw weights.
    loaded = checkpoint.load_for_inference(str(out), ema=False)
    assert loaded.step == 2 and loaded.data == "stories"
    assert loaded.config["steps"] == 2
    final = _params_np(result["final_params"])
    restored = _params_np(loaded.params)
    for k in final:
        np.testing.assert_array_equal(final[k], restored[k])
    tokens = np.full((2, 32), loaded.tokenizer.mask_id, np.int32)
    logits = loaded.denoise_fn(tokens)
    assert logits.shape == (2, 32, loaded.tokenizer.vocab_size)


def test_cli_help_and_typo(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--preset", "--data", "--steps", "--batch-size", "--seq-len", "--lr"]:
        assert flag in text
    for flag in ["--optimizer", "--seed", "--out", "--resume", "--mesh", "--eval-every"]:
        assert flag in text
    assert "--ckpt-every" in text and "--dtype" in text and "--show-model" in text
    with pytest.raises(SystemExit) as e:
        train.main(["--stesp", "3"])
    assert e.value.code != 0
    captured = capsys.readouterr()
    assert "--stesp" in captured.out + captured.err


def test_bad_values_give_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*FLAGS, "--optimizer", "sgdd", "--out", "None"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "sgdd" in err and "adamw" in err
    with pytest.raises(ValueError, match="mesh"):
        train.validate(train.configure(mesh="4by2"))
    with pytest.raises(ValueError, match="'entropyy'.*must be one of .*'entropy'"):
        train.validate(train.configure(sample_method="entropyy"))


def test_resume_matches_uninterrupted_run(tmp_path):
    """Resuming from a mid-run checkpoint (later ones gone, as after a crash) gives bitwise
    the same weights and losses as the uninterrupted run."""
    out = str(tmp_path / "run")
    cfg = train.configure(**TINY, steps=5, lr=0.01, warmup=2, eval_every=0, ckpt_every=1, keep=5)
    full = train.run(dataclasses.replace(cfg, out=out))
    for info in checkpoint.list_checkpoints(out):
        if info.step > 2:
            shutil.rmtree(info.path)
    resumed = train.run(dataclasses.replace(cfg, out=out, resume=True))
    assert resumed["steps"] == 5 and len(resumed["losses"]) == 3
    a, b = _params_np(full["final_params"]), _params_np(resumed["final_params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(full["losses"][2:], resumed["losses"])


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 8
    out = tmp_path / "run"
    argv = [*FLAGS, "--steps", str(steps), "--eval-every", "0", "--ckpt-every", "1"]
    argv += ["--lr", "0.01", "--warmup", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jif.train", *argv, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "3").exists():
            assert proc.poll() is None, "training exited before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(i.step for i in checkpoint.list_checkpoints(str(out)))
    assert killed_at < steps, "the run finished before the kill: make it longer"

    resumed = train.main([*argv, "--out", str(out), "--resume"])
    assert resumed["steps"] == steps
    assert len(resumed["losses"]) == steps - killed_at
    fresh = train.run(
        train.configure(**{**TINY, "steps": steps, "lr": 0.01, "warmup": 2, "eval_every": 0})
    )
    a, b = _params_np(fresh["final_params"]), _params_np(resumed["final_params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(fresh["losses"][killed_at:], resumed["losses"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        *FLAGS,
        "--optimizer",
        "adamw",
        "--steps",
        "8",
        "--lr",
        "1e36",
        "--warmup",
        "1",
        "--eval-every",
        "0",
    ]
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--ckpt-every", "1", "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step" in err and "--lr" in err
    kept = checkpoint.list_checkpoints(str(out))
    assert kept and kept[0].step < 8 and str(kept[0].path) in err
    # The kept checkpoint is finite (the diverged state was never saved).
    loaded = checkpoint.load_for_inference(str(out), ema=False)
    for v in loaded.params.values():
        assert np.all(np.isfinite(np.asarray(v.data_array)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "diverged"


def test_existing_run_needs_resume(tmp_path):
    out = str(tmp_path / "run")
    cfg = train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=out)
    train.run(cfg)
    with pytest.raises(ValueError, match="--resume"):
        train.run(cfg)
    with pytest.raises(checkpoint.CheckpointError, match="seq_len"):
        train.run(train.configure(**{**TINY, "seq_len": 16}, steps=2, out=out, resume=True))


# (optimizer, learning rate, model overrides): each trains the tiny DiT on one fixed batch.
OVERFIT = [
    ("adamw", 1e-2, {}),
    ("schedule_free", 1e-2, {}),
    ("muon", 1e-2, {}),
    ("mup_adamw", 1e-2, {"mup_base_width": 32}),
    ("modula", 0.3, {"arch": "modula"}),
]


def _tiny_optimizer(name, lr, overrides, steps):
    """(tokenizer, unbound model, initial params, optimizer) of the tiny DiT, constant lr."""
    cfg = train.configure(**TINY, **overrides, steps=steps, optimizer=name, lr=lr, warmup=0)
    tok = tokenizer.load_tokenizer(cfg.n_bpe)
    model_config = train.resolve_model_config(cfg, tok.vocab_size)
    unbound, params = checkpoint.init_model(model_config, 0)
    tx, _ = optim.make_optimizer(
        dataclasses.replace(cfg.optim, schedule="constant"), steps, model_config, params
    )
    return tok, unbound, params, tx


def _fixed_batch_losses(name, lr, overrides, steps=30):
    """Losses of `steps` updates on ONE batch with ONE noise draw (the step counter that
    seeds the noise is held at 0), so the loss can only fall by learning."""
    tok, unbound, params, tx = _tiny_optimizer(name, lr, overrides, steps)
    step = jax.jit(loop.make_train_step(unbound, tx, seed=0, ema=0.9, mask_id=tok.mask_id))
    batch = next(data.TokenBatches("stories", tok, split="train", batch_size=4, seq_len=32))
    state, losses = loop.init_state(params, tx), []
    for _ in range(steps):
        state, metrics = step({**state, "step": jax.numpy.zeros((), jax.numpy.int32)}, batch)
        losses.append(float(metrics["loss"]))
    return losses


def _params_after_updates_at_lr_0(name, overrides, steps=5):
    """(initial, final) params of `steps` updates at learning rate 0 on varied gradients.
    The train step changes the parameters only through the optimizer's update (jif.loop), so
    this is what the train step does at lr 0, compiled without the model around it."""
    _, _, params, tx = _tiny_optimizer(name, 0.0, overrides, steps)
    update, opt_state, moved = jax.jit(tx.update), tx.init(params), params
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda x, i=i: jax.numpy.cos(7.0 * x + i), moved)
        updates, opt_state = update(grads, opt_state, moved)
        moved = optax.apply_updates(moved, updates)
    return params, moved


@pytest.mark.parametrize("name, lr, overrides", OVERFIT, ids=[o[0] for o in OVERFIT])
def test_every_optimizer_overfits_a_fixed_batch(name, lr, overrides):
    losses = _fixed_batch_losses(name, lr, overrides)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])  # 0.15-0.31 measured
    before, after = _params_after_updates_at_lr_0(name, overrides)  # lr 0: nothing moves
    # (schedule-free recomputes its iterate as a mix of two others: equal up to rounding)
    rtol = 1e-5 if name == "schedule_free" else 0.0
    for k, v in _params_np(after).items():
        np.testing.assert_allclose(v, np.asarray(before[k].data_array), rtol=rtol, err_msg=k)


def test_warmup_cosine_schedule_known_values():
    cfg = optim.OptimConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, 110)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # half way down the cosine
    np.testing.assert_allclose(s(110), 0.1, atol=1e-6)


def test_adamw_matches_optax_on_named_params():
    """The registry's adamw on a dict of NamedArrays == optax.adamw on the plain arrays, with
    the embedding table's step times embed_lr_mult."""
    cfg = optim.OptimConfig(optimizer="adamw", lr=1e-2, warmup=0, clip=0.0, weight_decay=0.1)
    params = checkpoint.init_model(model_lib.make_config("tiny"), 0)[1]
    tx, schedule = optim.make_optimizer(cfg, 10, None, params)
    grads = jax.tree_util.tree_map(lambda x: 0.01 * x + 0.001, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    plain = {k: v.data_array for k, v in params.items()}
    mask = {k: v.ndim - ("blocks" in params[k].named_shape) >= 2 for k, v in plain.items()}
    ref_tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, mask=mask)
    g = {k: 0.01 * v + 0.001 for k, v in plain.items()}
    ref, _ = jax.jit(ref_tx.update)(g, ref_tx.init(plain), plain)
    assert cfg.embed_lr_mult == 100.0  # the default
    for k in plain:
        mult = cfg.embed_lr_mult if k == "dit/embed" else 1.0
        np.testing.assert_allclose(updates[k].data_array, mult * ref[k], rtol=1e-6, err_msg=k)
    assert not mask["dit/out/norm"] and mask["dit/blocks/mlp/up"]


def test_muon_dimensions_by_axis_name():
    params = checkpoint.init_model(model_lib.make_config("tiny", adaln=True), 0)[1]
    dims = optim.muon_dimensions(params)
    # query {blocks, embedding, heads, projection}: reads embedding, writes heads x projection
    assert dims["dit/blocks/attn/query"].reduction_axis == 1
    assert dims["dit/blocks/attn/query"].output_axis == (2, 3)
    # output {blocks, heads, projection, embedding}: reads heads x projection
    assert dims["dit/blocks/attn/output"].reduction_axis == (1, 2)
    assert dims["dit/blocks/mlp/down"].output_axis == 2
    for label in ["dit/embed", "dit/out/unembed", "dit/out/norm", "dit/blocks/attn/shift"]:
        assert dims[label] is None, label


def test_each_optimizer_alone_gets_its_own_learning_rate_and_architecture():
    names = ("adamw", "muon", "modula", "mup_adamw", "schedule_free")
    resolved = {
        (preset, name): train.resolve(train.configure(preset=preset, out=None, optimizer=name))
        for preset in ("tiny", "cpu", "big")
        for name in names
    }
    # At the cpu preset's width each optimizer gets its own default as it stands.
    assert optim.LR_WIDTH == model_lib.PRESETS["cpu"].d_model
    assert {n: resolved["cpu", n].optim.lr for n in names} == optim.DEFAULT_LR
    # Other widths: AdamW moves by its measured drift (width 32 and 512 are 4x either side),
    # the others keep theirs; muP's base stays at the width its learning rate holds at.
    drift = 4.0**0.81
    for preset, factor in (("tiny", drift), ("big", 1 / drift)):
        lr = {n: resolved[preset, n].optim.lr for n in names}
        assert lr["adamw"] == pytest.approx(3e-3 * factor, rel=1e-12)
        assert {n: v for n, v in lr.items() if n != "adamw"} == {
            n: v for n, v in optim.DEFAULT_LR.items() if n != "adamw"
        }
        assert resolved[preset, "mup_adamw"].mup_base_width == 128
    assert resolved["tiny", "modula"].arch == "modula" and resolved["tiny", "adamw"].arch is None
    # What the user gives wins.
    tiny = dict(preset="tiny", out=None)
    given = train.resolve(train.configure(**tiny, optimizer="modula", lr=0.1, arch="standard"))
    assert (given.optim.lr, given.arch) == (0.1, "standard")
    # The modula default trains the tiny model: its loss falls on a fixed batch.
    losses = _fixed_batch_losses("modula", optim.DEFAULT_LR["modula"], {"arch": "modula"})
    assert losses[-1] < 0.5 * losses[0]


def test_throughput_counts_only_the_steps_after_a_pause(monkeypatch):
    """An evaluation between two log lines must not make the steps before it look free: each
    step takes 1 s of a fake clock, the pause 50 s, and tokens/s stays 100 throughout."""
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    meter = loop.Throughput(tokens_per_step=100, flops_per_step=1e3, peak=1e3)

    def run(n):
        for _ in range(n):
            clock[0] += 1.0
            meter.step()

    clock[0] += 30.0  # compilation
    run(11)  # the first step (compilation) is left out: 10 timed steps
    assert meter.read() == (100.0, 1.0)
    run(5)
    clock[0] += 50.0
    meter.pause()  # an evaluation at step 16, between log lines
    run(5)
    tok_s, mfu = meter.read()
    assert tok_s == pytest.approx(100.0) and mfu == pytest.approx(1.0)
