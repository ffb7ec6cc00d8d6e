"""transfer/: sweep harness (CSV, resume, parabola fit, summary, figures) and its engines
(the coordinate check: tests/test_coord_check.py)."""

import json
import math
import os

import jax
import numpy as np
import pytest

from jif import optim
from transfer import analysis, runs, sweep, workers

FIGURES = ("loss_vs_lr", "optimum_vs_width")


# ---------------------------------------------------------------------------- parabola fit


def test_fit_recovers_vertex_of_known_parabola():
    lrs = np.geomspace(1e-4, 1e-1, 7)
    true = 2.7e-3
    losses = 0.3 * (np.log(lrs) - np.log(true)) ** 2 + 2.0
    lr, loss, method = analysis.fit_optimum(list(lrs), list(losses))
    assert method == "parabola"
    assert lr == pytest.approx(true, rel=1e-9)
    assert loss == min(losses) > 2.0  # the measured best, never the vertex's value


def test_fit_falls_back_to_grid_at_edges_and_next_to_divergence():
    lrs = [1e-3, 1e-2, 1e-1]
    assert analysis.fit_optimum(lrs, [1.0, 2.0, 3.0]) == (1e-3, 1.0, "grid")
    assert analysis.fit_optimum(lrs, [3.0, 2.0, 1.0]) == (1e-1, 1.0, "grid")
    assert analysis.fit_optimum(lrs, [3.0, 1.0, math.inf]) == (1e-2, 1.0, "grid")
    lr, _, method = analysis.fit_optimum(lrs, [math.nan, math.inf, math.nan])
    assert math.isnan(lr) and method == "diverged"


# ---------------------------------------------------------------------------- harness (fake runs)


# ---------------------------------------------------------------------------- verdicts


def _rows(name, optimum_at, widths=(32, 64, 128, 256), seeds=(0, 1, 2), floor=2.0, n_lrs=9):
    """Synthetic runs.csv rows: loss = floor + 0.3 (log lr - log optimum_at(width, seed))^2
    plus a small seed-dependent offset, on a log grid 1e-4..1e0."""
    rows = []
    for width in widths:
        for seed in seeds:
            for lr in np.geomspace(1e-4, 1.0, n_lrs):
                x = math.log(lr / optimum_at(width, seed))
                rows.append(
                    dict(
                        optimizer=name,
                        width=width,
                        depth=2,
                        lr=float(lr),
                        seed=seed,
                        val_nelbo=floor + 0.01 * seed + 0.3 * x * x,
                        diverged=False,
                    )
                )
    return rows


JITTER = {0: 1.0, 1: 1.15, 2: 0.87}  # each seed's optimum a little off the others'


def test_synthetic_sweeps_get_the_right_verdicts():
    rows = (
        # slope -1; widths 3.16x apart keep each optimum on a grid point (a drifting optimum
        # midway between two points leaves the seeds split between them: no basin there)
        _rows("drifting", lambda w, s: 1e-2 * JITTER[s] * 32 / w, widths=(32, 101, 320, 1012))
        + _rows("flat", lambda w, s: 1e-2 * JITTER[s])  # slope 0
        + _rows("slow", lambda w, s: 1e-2 * JITTER[s] * (w / 32) ** 0.1)  # 1.07x per doubling
        + _rows("plateau", lambda w, s: 1e-2, floor=4.9)  # never 1.5 nats below 5.0
        + _rows("edge", lambda w, s: 3.0)  # optimum beyond the largest lr
    )
    summary = analysis.summarize(rows, "val_nelbo", plateau=5.0)
    verdict = {n: e["depths"]["2"] for n, e in summary["optimizers"].items()}
    assert verdict["drifting"]["verdict"] == "drifts"
    assert verdict["drifting"]["drift_slope"] == pytest.approx(-1.0, abs=0.05)
    lo, hi = verdict["drifting"]["drift_slope_seed_range"]
    assert -1.2 < lo <= hi < -0.8
    assert verdict["flat"]["verdict"] == verdict["slow"]["verdict"] == "transfers"
    assert abs(verdict["flat"]["drift_slope"]) < 0.05
    assert verdict["plateau"]["verdict"] == "inconclusive"
    assert "width 32 does not learn" in verdict["plateau"]["verdict_reason"]
    assert verdict["edge"]["verdict"] == "inconclusive"
    assert "optimum at the grid edge" in verdict["edge"]["verdict_reason"]
    for o in summary["optimizers"]["edge"]["optima"]:
        assert o["at_edge"] and o["best_lr"] == 1.0 and not o["basin"]
    for o in summary["optimizers"]["flat"]["optima"]:
        assert o["learns"] and o["basin"] and not o["at_edge"]
        lo, hi = o["seed_lr_range"]  # each seed's own optimum: 0.87e-2..1.15e-2
        assert lo == pytest.approx(0.87e-2, rel=0.05) and hi == pytest.approx(1.15e-2, rel=0.05)
        assert o["seed_loss_spread"] == pytest.approx(0.02, abs=0.01)
    # Without a plateau nothing counts as learning: every verdict is inconclusive.
    blind = analysis.summarize(rows, "val_nelbo")
    assert {e["depths"]["2"]["verdict"] for e in blind["optimizers"].values()} == {"inconclusive"}


def test_one_seed_that_disagrees_makes_the_verdict_inconclusive():
    widths = [32, 64, 128, 256]
    good = lambda w: dict(width=w, best_lr=1e-2, learns=True, basin=True, at_edge=False)
    per_seed = {0: [1e-2] * 4, 1: [1.1e-2] * 4, 2: [1e-2 * (32 / w) ** 0.5 for w in widths]}
    v = analysis.width_verdict([good(w) for w in widths], per_seed)
    assert v["verdict"] == "inconclusive" and "some within" in v["verdict_reason"]
    assert v["drift_slope_seed_range"] == pytest.approx([-0.5, 0.0], abs=1e-9)
    per_seed[2] = [1e-2] * 4
    assert analysis.width_verdict([good(w) for w in widths], per_seed)["verdict"] == "transfers"


def test_basin_is_judged_seed_by_seed():
    lrs = [1e-3, 1e-2, 1e-1]
    # Seeds 0.3 apart at every lr, each 0.1 worse at both neighbours: the offset is the seed's,
    # not the curve's, so the paired rule finds a basin where the unpaired one cannot.
    losses = np.array([[3.00, 2.90, 3.00], [3.30, 3.20, 3.30]])
    o = analysis.optimum(lrs, losses, plateau=6.0)
    assert o["seed_loss_spread"] == pytest.approx(0.3)
    assert o["basin"] and not o["basin_unpaired"] and o["learns"] and not o["at_edge"]
    assert o["neighbour_excess"]["lower"] == pytest.approx([0.1, 0.1])
    # The seeds disagree about the lower neighbour (one finds it better): no basin.
    o = analysis.optimum(lrs, np.array([[2.85, 2.90, 3.00], [3.45, 3.20, 3.30]]), plateau=6.0)
    assert not o["basin"] and not o["basin_unpaired"]
    # Worse on every seed, by 0.05 on one and 0.4 on the other: a basin (the unpaired rule,
    # against the 0.3 spread at the best point, says no).
    o = analysis.optimum(lrs, np.array([[2.95, 2.90, 3.5], [3.60, 3.20, 3.7]]), plateau=6.0)
    assert o["basin"] and not o["basin_unpaired"]
    assert o["neighbour_excess"]["lower"] == pytest.approx([0.05, 0.4])
    o = analysis.optimum(lrs, np.array([[3.5, 2.9, 3.5], [3.7, 3.0, 3.7]]), plateau=6.0)
    assert o["basin"] and o["basin_unpaired"]
    # A neighbour that diverged on one seed is worse there; the other seed must agree.
    inf = math.inf
    o = analysis.optimum(lrs, np.array([[3.5, 2.9, inf], [3.7, 3.0, 3.2]]), plateau=6.0)
    assert o["basin"] and o["neighbour_excess"]["upper"][0] is None
    o = analysis.optimum(lrs, np.array([[3.5, 2.9, inf], [3.7, 3.0, 2.9]]), plateau=6.0)
    assert not o["basin"]


def test_reported_loss_is_measured_and_never_below_the_best_run():
    rng = np.random.default_rng(0)
    lrs = list(np.geomspace(1e-3, 1.0, 7))
    for _ in range(200):
        losses = 2.0 + rng.random((3, 7)) + 0.1 * (np.arange(7) - rng.integers(7)) ** 2
        o = analysis.optimum(lrs, losses, plateau=None)
        mean = losses.mean(axis=0)
        i = int(np.argmin(mean))
        assert o["best_loss"] == pytest.approx(mean[i]) and o["best_loss"] >= losses.min()
        assert o["grid_best_lr"] == lrs[i]
        assert lrs[max(i - 1, 0)] <= o["best_lr"] <= lrs[min(i + 1, 6)]
        assert o["at_edge"] == (i in (0, 6))
        assert o["seed_lr_range"][0] <= o["seed_lr_range"][1]


def _fake_run(optimum_at, diverge_at=2.5):
    """A run function whose loss is a parabola in log-lr around optimum_at(spec); diverges
    beyond diverge_at (in log-lr) to the right of it. Records the specs it was asked to train."""
    calls = []

    def run(spec, config):
        calls.append(spec)
        x = math.log(spec.lr / optimum_at(spec))
        if x > diverge_at:
            return {"val_nelbo": math.nan, "train_loss_smoothed": math.nan, "diverged": True}
        return {"val_nelbo": 3.0 + 0.2 * x * x, "train_loss_smoothed": 3.1 + 0.2 * x * x}

    return run, calls


def _optimum(spec):
    # adamw drifts as 1/width, muP stays put, modula stays put at a larger lr.
    return {"adamw": 1e-2 * 64 / spec.width, "mup_adamw": 1e-2, "modula": 0.4}[spec.optimizer]


def _check_outputs(out, n_rows):
    rows = analysis.read_rows(out / "runs.csv")
    assert len(rows) == n_rows
    summary = json.loads((out / "summary.json").read_text())
    for stem in FIGURES:
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
    # The reported optimum is the best grid point or a fitted vertex beside it.
    curves = analysis.curves(rows, "val_nelbo")
    for name, entry in summary["optimizers"].items():
        for o in entry["optima"]:
            lrs, losses = curves[(name, o["width"], o["depth"])]
            i = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
            assert o["grid_best_lr"] == lrs[i]
            if o["method"] == "grid":
                assert o["best_lr"] == lrs[i]
            else:
                assert lrs[i - 1] <= o["best_lr"] <= lrs[i + 1]
            assert o["best_loss"] == pytest.approx(losses[i], rel=1e-12)  # measured
            assert o["at_edge"] == (i in (0, len(lrs) - 1))
        best = [o["best_lr"] for o in entry["optima"]]
        if len(best) > 1:
            assert entry["spread"] == pytest.approx(max(best) / min(best))
        else:  # one width: no spread to speak of
            assert entry["spread"] is None
    return rows, summary


def test_sweep_csv_summary_figures_and_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--widths", "64", "128", "256", "--n-lrs", "9", "--no-progress"]
    run, calls = _fake_run(_optimum, diverge_at=1.5)
    sweep.main(argv, run_fn=run)
    n = 3 * 3 * 9 * 3  # optimizers x widths x learning rates x seeds (0, 1, 2 by default)
    assert len(calls) == n and {s.seed for s in calls} == {0, 1, 2}
    rows, summary = _check_outputs(out, n)
    assert any(r["diverged"] for r in rows)  # recorded, not dropped
    ops = summary["optimizers"]
    # Optima of the exact parabolas are recovered; adamw drifts 4x over widths 64..256.
    assert ops["adamw"]["spread"] == pytest.approx(4.0, rel=1e-6)
    assert ops["mup_adamw"]["spread"] == pytest.approx(1.0, rel=1e-6)
    # (rel 1e-5: runs.csv stores losses to 6 decimals, which moves the fitted vertex slightly)
    assert [o["best_lr"] for o in ops["modula"]["optima"]] == pytest.approx([0.4] * 3, rel=1e-5)
    # The fake losses (3.0 at the optimum) lie far below the stories' plateau (about 5).
    assert 4.0 < summary["unigram_plateau"] < 6.0
    d2 = {name: e["depths"]["2"] for name, e in ops.items()}
    assert d2["adamw"]["verdict"] == "drifts"
    assert d2["adamw"]["drift_slope"] == pytest.approx(-1.0, rel=1e-6)
    assert d2["mup_adamw"]["verdict"] == d2["modula"]["verdict"] == "transfers"

    # Resume: nothing left to do; a wider grid trains only the new runs.
    run2, calls2 = _fake_run(_optimum)
    with monkeypatch.context() as m:
        m.setattr(analysis, "plot", lambda summary, out: None)  # the same figures again
        sweep.main(argv, run_fn=run2)
    assert calls2 == []
    run3, calls3 = _fake_run(_optimum)
    sweep.main([*argv[:2], "--widths", "64", "128", "256", "512", *argv[6:]], run_fn=run3)
    assert {s.width for s in calls3} == {512} and len(calls3) == 3 * 9 * 3
    _check_outputs(out, n + 3 * 9 * 3)

    # Plot-only redraws from the CSV alone.
    (out / "summary.json").unlink()
    sweep.main(["--out", str(out), "--plot-only"], run_fn=None)
    assert (out / "summary.json").exists()

    # A different training setting refuses to mix rows into this CSV.
    capsys.readouterr()
    assert _exit_code(lambda: sweep.main([*argv, "--steps", "7"], run_fn=run)) == 2
    assert "another --out" in capsys.readouterr().err


def _exit_code(call) -> int:
    with pytest.raises(SystemExit) as e:
        call()
    return e.value.code


def test_torn_last_row_is_repaired_and_the_sweep_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analysis, "plot", lambda summary, out: None)  # figures: the test above
    out = tmp_path / "torn"
    argv = ["--out", str(out), "--widths", "64", "--n-lrs", "3", "--no-progress"]
    run, calls = _fake_run(_optimum)
    sweep.main(argv, run_fn=run)
    path = out / "runs.csv"
    text = path.read_text()
    # Rows as JSON (NaN equals NaN there), without the one field that is a timing.
    read = lambda: [json.dumps({**r, "seconds": 0}) for r in analysis.read_rows(path)]
    rows = read()
    last = text.splitlines()[-1]
    for torn in (last[:-7], last[: last.index(",", 20)] + "\r\n"):  # no line end; fields cut
        path.write_text(text[: text.rindex(last)] + torn)
        assert read() == rows[:-1]  # plots skip it, with a warning
        assert "ignoring a torn last row" in capsys.readouterr().err
        run2, calls2 = _fake_run(_optimum)
        sweep.main(argv, run_fn=run2)
        assert calls2 == [calls[-1]], "only the torn run is trained again"
        assert "removed a torn last row" in capsys.readouterr().err
        assert read() == rows and path.read_text().count("\n") == text.count("\n")
    # A row cut inside the header leaves nothing to keep: the sweep starts the CSV again.
    path.write_text(text[:20])
    run3, calls3 = _fake_run(_optimum)
    sweep.main(argv, run_fn=run3)
    assert len(calls3) == len(calls) and read() == rows
    # A malformed row that is not the last is not guessed at: the message names its line.
    lines = text.splitlines(keepends=True)
    path.write_text("".join([lines[0], "adamw,64,oops\r\n", *lines[1:]]))
    assert _exit_code(lambda: sweep.main(argv, run_fn=run)) == 2
    assert "runs.csv line 2 is malformed" in capsys.readouterr().err
    (out / "settings.json").write_text('{"steps": 2')  # torn JSON
    assert _exit_code(lambda: sweep.main(argv, run_fn=run)) == 2
    assert "settings.json is not valid JSON" in capsys.readouterr().err


def test_depth_sweep_and_seeds(tmp_path):
    out = tmp_path / "depth"
    run, calls = _fake_run(lambda spec: 3e-3 * spec.depth)
    argv = ["--out", str(out), "--optimizers", "mup_adamw", "--widths", "64", "128"]
    summary = sweep.main([*argv, "--depths", "1", "2", "--seeds", "0", "1", "--no-progress"], run)
    assert len(calls) == 2 * 2 * 5 * 2
    entry = summary["optimizers"]["mup_adamw"]
    assert entry["spread_across_widths"]["1"] == pytest.approx(1.0)
    assert entry["spread_across_depths"]["64"] == pytest.approx(2.0, rel=1e-5)
    assert (out / "optimum_vs_depth.png").exists() and (out / "loss_vs_lr_depth.svg").exists()


def test_configuration_errors_exit_2_with_a_message(tmp_path, capsys):
    """Every mistake in the flags stops the sweep before anything trains: status 2, one
    `error: ...` line naming the flag, no traceback, no CSV row."""
    out = ["--out", str(tmp_path / "s")]
    cases = [
        (["--optimizers", "sgd"], "unknown optimizer 'sgd'"),
        (["--widths", "66"], "multiple of --head-dim 32"),
        (["--lrs", "-1"], "--lrs -1.0: a learning rate must be a finite number > 0"),
        (["--lrs", "nan"], "--lrs nan"),
        (["--lrs", "0.01", "0"], "--lrs 0.0"),
        (["--steps", "0"], "--steps 0: must be a finite number >= 1"),
        (["--seq-len", "1"], "--seq-len 1"),
        (["--depths", "0"], "--depths 0"),
        (["--seeds", "-1"], "--seeds -1"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--eval-times", "0"], "--eval-times 0"),
        (["--lr-span", "-2"], "--lr-span -2.0"),
        (["--n-lrs", "0"], "n_lrs=0"),
        (["--engine", "gpu"], "engine 'gpu'"),
        (["--engine", "train_run"], "pass --embed-lr-mult 1"),  # muP: no multiplier there
        (["--embed-lr-mult", "-1"], "--embed-lr-mult -1.0"),
        (["--metric", "loss"], "metric 'loss'"),
        (["--widths", "64", "--head-dim", "1"], "even head size"),  # the model config
        (["--data", str(tmp_path / "none.txt")], "not found"),
        (["--plot-only"], "run the sweep first"),
        (["--workers", "-1"], "--workers -1"),
        (["--workers", str(len(workers.cores()) + 1)], "cores; pass --workers"),
    ]
    for argv, needle in cases:
        run, calls = _fake_run(_optimum)
        assert _exit_code(lambda argv=argv, run=run: sweep.main([*out, *argv], run_fn=run)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and "Traceback" not in err, (argv, err)
        assert calls == [] and not (tmp_path / "s" / "runs.csv").exists(), argv


# ---------------------------------------------------------------------------- quick real runs


def test_nelbo_of_a_position_independent_predictor_is_the_unigram_plateau():
    """A predictor that outputs the training unigram at every masked position, whatever its
    input, has the MDLM NELBO per token of the plateau the sweep computes."""
    from jif import data as data_lib
    from jif import diffusion
    from jif.tokenizer import load_tokenizer

    config = sweep.SweepConfig(seq_len=64, eval_sequences=256)
    log_q = jax.numpy.asarray(runs.unigram_log_probs(config), jax.numpy.float32)
    tokenizer = load_tokenizer()
    val = data_lib.validation_tokens(config.data, tokenizer, seq_len=64, n_sequences=256, seed=0)
    ignore_input = lambda xt, rate: jax.numpy.broadcast_to(log_q, (*xt.shape, log_q.size))
    out = diffusion.eval_nelbo(ignore_input, val, mask_id=tokenizer.mask_id, n_times=16)
    plateau = runs.unigram_plateau(config)
    assert 4.0 < plateau < 6.0
    assert out["masked_ce"] == pytest.approx(plateau, rel=0.01)
    assert out["nelbo"] == pytest.approx(plateau, rel=0.03)


def test_default_sweep_has_three_seeds():
    assert sweep.SweepConfig().seeds == (0, 1, 2)


def test_head_size_is_fixed_and_heads_grow_with_width():
    """Every width gets heads of --head-dim (32 by default): 1, 2, 4 heads at 32, 64, 128."""
    config = sweep.resolve(sweep.SweepConfig())
    for width, heads in ((32, 1), (64, 2), (128, 4)):
        spec = sweep.RunSpec(optimizer="modula", width=width, depth=2, lr=0.1, seed=0)
        cfg = sweep.train_config_for(spec, config)
        assert (cfg.d_model, cfg.n_heads) == (width, heads)


def test_sweep_quick_end_to_end(tmp_path):
    """The real engine end to end, every parameterisation; one width (each width compiles
    every optimizer's program again; several widths are the fake sweeps' business above).
    By default the groups train in worker processes, one per core: the rows equal those of
    the same sweep trained in this process (--workers 1)."""
    rows = {}
    for n in (0, 1):
        out = tmp_path / f"quick-{n}"
        argv = ["--quick", "--out", str(out), "--widths", "16", "--no-progress", "--workers"]
        summary = sweep.main([*argv, str(n)])
        rows[n], _ = _check_outputs(out, 3 * 1 * 3 * 2)
        assert set(summary["optimizers"]) == {"adamw", "mup_adamw", "modula"}
    finite = [r for r in rows[1] if not r["diverged"]]
    assert finite and all(0 < r["val_nelbo"] < 50 for r in finite)
    key = lambda r: (r["optimizer"], r["lr"], r["seed"])
    for a, b in zip(sorted(rows[0], key=key), sorted(rows[1], key=key), strict=True):
        assert key(a) == key(b) and a["diverged"] == b["diverged"]
        for field in ("val_nelbo", "train_loss_smoothed"):
            assert a[field] == pytest.approx(b[field], rel=1e-4, nan_ok=True), (a, b)


class _FailingRun:
    """A picklable run function (it trains in a worker process): the run of width 64 at the
    lower learning rate fails at once; the other takes a second, so it is still training in
    the other worker when the first fails."""

    def __call__(self, spec, config):
        import time

        if spec.width == 64 and spec.lr == min(sweep.lr_grid(config, spec.optimizer)):
            raise ValueError("boom")
        time.sleep(1.0)
        return {"val_nelbo": 3.0 + spec.lr, "train_loss_smoothed": 3.0}


def test_workers_keep_the_finished_runs_when_one_fails(tmp_path):
    """With two workers, a run that fails stops the sweep with a RuntimeError naming it; the
    runs that finished (other workers' included) are in runs.csv, and the next run of the same
    command trains only the rest."""
    if len(workers.cores()) < 2:
        pytest.skip("needs two cores")
    out = tmp_path / "fail"
    argv = ["--out", str(out), "--optimizers", "adamw", "--widths", "32", "64", "--n-lrs", "2"]
    argv += ["--seeds", "0", "--no-progress", "--workers", "2"]
    with pytest.raises(RuntimeError, match="run RunSpec.*width=64.*failed: boom"):
        sweep.main(argv, run_fn=_FailingRun())
    kept = {(r["width"], r["lr"]) for r in analysis.read_rows(out / "runs.csv")}
    lo, hi = sweep.lr_grid(sweep.resolve(sweep.SweepConfig(n_lrs=2)), "adamw")
    assert (64, hi) in kept and (64, lo) not in kept  # the other worker's run was kept
    run, calls = _fake_run(_optimum)
    sweep.main([*argv[:-2], "--workers", "1"], run_fn=run)  # the rest, here
    assert (64, lo) in {(s.width, s.lr) for s in calls} and len(calls) + len(kept) == 4


def test_workers_split_the_cores():
    n = len(workers.cores())
    assert workers.resolve_workers(0, 9, "cpu") == min(n, 9)
    assert workers.resolve_workers(0, 9, "gpu") == workers.resolve_workers(0, 9, "given") == 1
    assert workers.resolve_workers(4, 2, "cpu") == 2  # never more than the groups
    for k in range(1, n + 1):
        sets = workers.core_sets(k)
        assert len(sets) == k and {len(s) for s in sets} == {n // k}
        used = [c for s in sets for c in s]
        assert len(set(used)) == len(used) and set(used) <= set(workers.cores())
    # Equal sets whatever the machine, so no run's rounding depends on the worker it drew.
    assert workers.core_sets(9, range(16)) == [[c] for c in range(9)]
    assert workers.core_sets(2, range(5)) == [[0, 1], [2, 3]]
    assert workers.core_sets(3, [4, 5, 6, 7, 8, 9]) == [[4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="--workers"):
        workers.core_sets(n + 1)


# ---------------------------------------------------------------------------- compiled engine


def test_lr_as_data_matches_optimizer_built_with_that_lr():
    """The sweep builds each optimizer with lr = 1 and multiplies by the run's lr: exact for
    every swept optimizer (all linear in the learning rate)."""
    import dataclasses

    import optax

    from jif import model as model_lib
    from jif import train

    spec = sweep.RunSpec(optimizer="adamw", width=32, depth=1, lr=1.0, seed=0)
    config = sweep.resolve(sweep.SweepConfig(quick=True, widths=(32,)))
    for name in sweep.PARAMETERISATIONS:
        cfg = sweep.train_config_for(dataclasses.replace(spec, optimizer=name), config)
        model_config = train.resolve_model_config(cfg, 50)
        params = model_lib.params_dict(model_lib.build_model(model_config, jax.random.key(0)))
        grads = jax.tree.map(lambda x: jax.numpy.cos(7.0 * x + 1.0), params)
        lr = 0.037
        ref_cfg = dataclasses.replace(cfg.optim, lr=lr)
        ref, _ = optim.make_optimizer(ref_cfg, cfg.steps, model_config, params)
        ours, _ = optim.make_optimizer(cfg.optim, cfg.steps, model_config, params)
        ours = optax.chain(ours, sweep.scale_by_state_lr())
        s_ref, s_ours = ref.init(params), ours.init(params)
        s_ours = (*s_ours[:-1], sweep._LrState(jax.numpy.asarray(lr, jax.numpy.float32)))
        ref_update, our_update = jax.jit(ref.update), jax.jit(ours.update)  # one compile each
        for _ in range(3):  # warmup is 1 step in quick mode: steps 2-3 use the peak lr
            u_ref, s_ref = ref_update(grads, s_ref, params)
            u_ours, s_ours = our_update(grads, s_ours, params)
        for k in params:
            np.testing.assert_allclose(
                np.asarray(u_ours[k].data_array),
                np.asarray(u_ref[k].data_array),
                rtol=2e-5,
                atol=1e-8,
                err_msg=f"{name} {k}",
            )


def test_embedding_multiplier_scales_only_the_embedding_step():
    """--embed-lr-mult M: AdamW's and muP AdamW's embedding step is M times the one without
    it, in both engines; every other step, and Modula's, is unchanged."""
    from transfer import batched

    grads_of = lambda params: jax.tree.map(lambda x: jax.numpy.cos(7.0 * x + 1.0), params)
    base = sweep.resolve(sweep.SweepConfig(quick=True, widths=(16,), embed_lr_mult=1.0))
    scaled = sweep.resolve(sweep.SweepConfig(quick=True, widths=(16,), embed_lr_mult=30.0))
    for name in sweep.PARAMETERISATIONS:
        spec = sweep.RunSpec(optimizer=name, width=16, depth=1, lr=1.0, seed=0)
        mult = 1.0 if sweep.PARAMETERISATIONS[name].optimizer == "modula" else 30.0
        for engine in (sweep.CompiledRuns(), batched.BatchedRuns()):
            updates = []
            for config in (base, scaled):
                if isinstance(engine, batched.BatchedRuns):
                    tx = engine._batched_step(spec, config)["tx"]
                else:
                    tx = engine._group(spec, config)["tx"]
                _, params = engine.init_params(spec, config)
                state, update = tx.init(params), jax.jit(tx.update)  # one compile, not op by op
                for _ in range(3):  # step 1 is warmup at lr 0
                    u, state = update(grads_of(params), state, params)
                updates.append(u)
            for k in params:
                ratio = mult if k.endswith("/embed") else 1.0
                np.testing.assert_allclose(
                    np.asarray(updates[1][k].data_array),
                    ratio * np.asarray(updates[0][k].data_array),
                    rtol=1e-5,
                    atol=1e-9,
                    err_msg=f"{name} {type(engine).__name__} {k}",
                )
            assert np.abs(np.asarray(updates[0]["dit/embed"].data_array)).max() > 0


def test_adamw_default_lr_drift_is_the_committed_sweeps():
    """jif.optim carries AdamW's default learning rate to other widths by the slope the
    committed default sweep measured; the two must not part."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "transfer", "summary.json")
    with open(path) as f:
        adamw = json.load(f)["optimizers"]["adamw"]["depths"]["2"]
    assert adamw["verdict"] == "drifts"
    assert optim.LR_WIDTH_SLOPE["adamw"] == pytest.approx(adamw["drift_slope"], abs=0.005)
    assert set(optim.LR_WIDTH_SLOPE) == {"adamw"}  # only what a sweep found to drift


@pytest.mark.parametrize("name", ["adamw", "mup_adamw", "modula"])
def test_centre_half_steps_add_two_points_beside_the_centre(name):
    """--centre-half-steps adds to the 5-point log grid over the range the two points half a
    step (a factor 10 ** 0.25 for a range of 100x) either side of its centre."""
    lo, hi = sweep.PARAMETERISATIONS[name].lr_range
    lrs = sweep.lr_grid(sweep.SweepConfig(centre_half_steps=True), name)
    coarse = sweep.lr_grid(sweep.SweepConfig(), name)
    assert len(coarse) == 5 and set(coarse) < set(lrs) and len(lrs) == 7
    centre, ratio = math.sqrt(lo * hi), (hi / lo) ** 0.125
    extra = sorted(set(lrs) - set(coarse))
    assert extra == pytest.approx([centre / ratio, centre * ratio], rel=5e-3)  # 3 digits
    assert coarse[1] < extra[0] < coarse[2] < extra[1] < coarse[3]
    quick = sweep.resolve(sweep.SweepConfig(quick=True, centre_half_steps=True))
    assert len(sweep.lr_grid(quick, name)) == quick.n_lrs + 2  # 3 points, centre included
