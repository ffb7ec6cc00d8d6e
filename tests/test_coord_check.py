"""transfer/coord_check.py: the recorders, the masks, the configuration errors and a quick
coordinate check end to end."""

import csv
import math

import jax
import numpy as np
import pytest

from transfer import coord_check


def _exit_code(call) -> int:
    with pytest.raises(SystemExit) as e:
        call()
    return e.value.code


def test_coord_check_configuration_errors_exit_2(tmp_path, capsys):
    out = ["--quick", "--out", str(tmp_path / "c")]
    cases = [
        (["--optimizers", "sgd"], "unknown optimizer 'sgd'"),
        (["--widths", "66"], "multiple of --head-dim 8"),
        (["--widths", "16", "--head-dim", "1"], "even head size"),  # the model config
        (["--lrs", "-1", "1", "1"], "--lrs -1.0"),
        (["--lrs", "0.1"], "--lrs has 1 values for 3 optimizers"),
        (["--mask-rates", "1.5"], "must lie in [0, 1]"),
        (["--depth", "0"], "--depth 0"),
        (["--steps", "0"], "--steps 0"),
        (["--n-probe", "0"], "--n-probe 0"),
        (["--plot-only"], "run the coordinate check first"),
    ]
    for argv, needle in cases:
        assert _exit_code(lambda argv=argv: coord_check.main([*out, *argv])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, (argv, err)


# ---------------------------------------------------------------------------- coordinate check


def test_recorders_do_not_change_the_model():
    from jif import checkpoint as ckpt
    from jif import model as model_lib

    cfg = model_lib.make_config("tiny", d_model=32, n_heads=2, vocab_size=50)
    unbound, params = ckpt.split_params(model_lib.build_model(cfg, jax.random.key(0)))
    # A non-zero output layer so that the logits are informative.
    params["dit/out/unembed"] = params["dit/out/unembed"] + 0.1
    model = ckpt.bind_params(unbound, params)
    tokens = np.random.default_rng(0).integers(0, 49, (2, 8)).astype(np.int32)
    acts = coord_check.record(model, tokens, 0.5)
    ref = np.asarray(jax.jit(model_lib.apply_logits)(model, tokens, np.full(2, 0.5, np.float32)))
    np.testing.assert_allclose(acts["logits"], ref.ravel(), rtol=1e-5, atol=1e-6)
    emb = np.asarray(params["dit/embed"].unwrap("vocabulary", "embedding"))[tokens]
    np.testing.assert_allclose(acts["embedding"], emb.ravel(), rtol=1e-6)
    n_tokens = tokens.size
    assert acts["attention"].size == acts["mlp"].size == 2 * n_tokens * 32  # 2 blocks
    assert acts["residual"].size == n_tokens * 32


def test_mask_tokens_masks_the_requested_fraction():
    tokens = np.zeros((3, 20), np.int32)
    masked = coord_check.mask_tokens(tokens, 0.25, mask_id=7, seed=0)
    assert ((masked == 7).sum(axis=1) == 5).all()


# ---------------------------------------------------------------------------- quick real runs


def _check_coord_rows(out, rows, n_models, steps=8):
    at = coord_check.record_steps(steps)
    assert at == [0, 1, 2, 4, 8] and len(at) >= 5
    assert len(rows) == n_models * len(at) * 2 * len(coord_check.LAYER_TYPES)
    with (out / "coord.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for stem in ("coord_check", "coord_delta"):
        assert (out / f"{stem}.png").stat().st_size > 1000
        assert (out / f"{stem}.svg").stat().st_size > 1000
    for r in rows:
        if r["layer"] == "logits":
            assert r["rms_init"] == 0.0  # zero-initialised output layer
        if r["step"] == 0:  # the initial model itself
            assert r["delta_rms"] == 0.0 and r["rms"] == pytest.approx(r["rms_init"])
        if r["step"] == steps:
            assert r["delta_rms"] > 0.0 and math.isfinite(r["rms"])
        if r["layer"] == "embedding" and r["optimizer"] == "modula":
            assert r["rms_init"] == pytest.approx(1.0, rel=1e-5)  # unit-RMS embedding rows
    # The change since initialisation is recorded at every step, and it grows: the logits
    # have moved more by the last step than by step 2 (step 1 is warmup at lr 0).
    for name in {r["optimizer"] for r in rows}:
        logit = {
            r["step"]: r["delta_rms"]
            for r in rows
            if r["optimizer"] == name
            and r["layer"] == "logits"
            and r["width"] == rows[0]["width"]
            and r["mask_rate"] == 0.15
        }
        assert set(logit) == set(at) and logit[steps] > logit[2] > 0.0, (name, logit)
    # The figures redraw from coord.csv alone.
    (out / "coord_delta.png").unlink()
    assert len(coord_check.main(["--quick", "--out", str(out), "--plot-only"])) == len(rows)
    assert (out / "coord_delta.png").exists()


def test_record_steps_double_up_to_the_last():
    assert coord_check.record_steps(10) == [0, 1, 2, 4, 8, 10]
    assert coord_check.record_steps(1) == [0, 1]


def test_coord_check_quick_one_model(tmp_path):
    out = tmp_path / "coord1"
    rows = coord_check.main(
        ["--quick", "--out", str(out), "--optimizers", "modula", "--widths", "16"]
    )
    _check_coord_rows(out, rows, 1)


@pytest.mark.slow
def test_coord_check_quick_end_to_end(tmp_path):
    out = tmp_path / "coord"
    rows = coord_check.main(["--quick", "--out", str(out)])
    _check_coord_rows(out, rows, 3 * 2)
