"""python -m jif.probe end to end, its loader, and the new samplers from jif.sample."""

import json
import os

import jax
import numpy as np
import pytest

from jif import interference, probe, train
from jif import sample as sample_cli
from jif.checkpoint import load_for_inference
from jif.sampling import sample


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    train.main(
        ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "32"]
        + ["--out", str(out), "--eval-every", "0", "--n-samples", "0", "--no-progress"]
    )
    return str(out)


def test_sample_cli_new_methods_without_probe(tiny_run, capsys):
    base = ["--checkpoint", tiny_run, "--steps", "16", "--num", "2", "--json"]
    out = sample_cli.main(base + ["--method", "interference"])
    assert "interference: no probe at" in capsys.readouterr().err
    conf = sample_cli.main(base + ["--method", "confidence"])
    capsys.readouterr()
    assert out["tokens"] == conf["tokens"]  # no probe: confidence order exactly
    # 2 training steps: every token has probability about 1/2050, above 1e-4, below 0.9
    low = sample_cli.main(base + ["--method", "threshold", "--threshold", "0.0001"])
    assert low["n_calls"] == 1 and low["calls_per_sample"] == [1, 1]
    high = sample_cli.main(base + ["--method", "threshold"])
    assert high["n_calls"] == 16 and high["calls_per_sample"] == [16, 16]
    rem = sample_cli.main(base + ["--method", "remdm_cap", "--eta", "0.5"])
    assert rem["calls_per_sample"] is None and rem["n_calls"] <= 18
    capsys.readouterr()
    for argv, message in (
        (["--method", "threshold", "--threshold", "0"], "--threshold=0.0: must be a finite"),
        (["--method", "remdm_cap", "--eta", "2"], "--eta=2.0: must be a finite number in [0, 1]"),
        (["--method", "interference", "--probe", "/nowhere"], "no interference probe at"),
    ):
        with pytest.raises(SystemExit) as e:
            sample_cli.main(base + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err, err


def test_probe_cli_trains_stores_and_the_sampler_uses_it(tiny_run, capsys):
    meta = probe.main(
        ["--checkpoint", tiny_run, "--windows", "40", "--steps", "30", "--dim", "4"]
        + ["--batch-size", "8", "--no-progress"]
    )
    folder = os.path.join(tiny_run, "probe")
    assert meta["folder"] == folder and meta["dim"] == 4 and meta["n_held_out_windows"] == 8
    assert np.isfinite(meta["held_out_r2"]) and np.isfinite(meta["distance_baseline_r2"])
    assert (
        json.loads(capsys.readouterr().out.splitlines()[-1])["held_out_r2"] == meta["held_out_r2"]
    )
    loaded = load_for_inference(tiny_run)
    got = interference.load_probe(folder, d_model=loaded.model_config.d_model, step=loaded.step)
    assert got.weights.shape == (loaded.model_config.d_model, 4) and got.meta["step"] == loaded.step

    fn, note = interference.denoise_fn_for(loaded)
    assert note.startswith(f"interference: probe {folder}")
    tokens = np.full((3, 32), loaded.tokenizer.mask_id, np.int32)
    tokens[:, 0] = loaded.tokenizer.eot_id
    tokens[:, 5] = 7
    logits, emb = fn(tokens)
    np.testing.assert_allclose(logits, loaded.denoise_fn(tokens), rtol=1e-4, atol=1e-4)
    assert emb.shape == (3, 32, 4)
    out = sample(
        fn,
        jax.random.key(0),
        tokens,
        mask_id=loaded.tokenizer.mask_id,
        steps=8,
        method="interference",
    )
    got = np.asarray(out.tokens)
    assert (got[:, 0] == tokens[:, 0]).all() and (got[:, 5] == 7).all()
    assert int(out.n_calls) == 8 and (got != loaded.tokenizer.mask_id).all()
    cli = sample_cli.main(
        ["--checkpoint", tiny_run, "--steps", "8", "--num", "1", "--method", "interference"]
    )
    assert cli["probe"].startswith("interference: probe")

    with pytest.raises(ValueError, match="was trained on step 2, the checkpoint is step 5"):
        interference.load_probe(folder, step=5)
    with pytest.raises(ValueError, match="maps 32-wide activations, the model's are 99"):
        interference.load_probe(folder, d_model=99)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dim", "0"], "--dim=0: must be at least 1"),
        (["--windows", "3"], "--windows=3: must be at least 10"),
        (["--lr", "nan"], "--lr=nan: must be a finite number > 0"),
        (["--groups", "0"], "--groups (0,): give one or more sizes >= 1"),
    ],
)
def test_probe_cli_mistakes(tiny_run, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--checkpoint", tiny_run, "--no-progress", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err, err


def test_probe_cli_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--checkpoint", str(tmp_path / "none"), "--no-progress"])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
