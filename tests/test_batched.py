"""transfer/batched.py: a group trained as one vmapped program equals its runs trained alone."""

import numpy as np
import pytest

from transfer import batched, sweep


@pytest.mark.parametrize("name", ["adamw", "modula"])
def test_batched_group_equals_runs_trained_one_at_a_time(name):
    """Each run of a group, a diverging one among them, ends as it does trained alone."""
    config = sweep.resolve(sweep.SweepConfig(quick=True, widths=(16,), steps=8))
    lo, hi = sweep.PARAMETERISATIONS[name].lr_range
    lrs = [lo * 3, (lo * hi) ** 0.5]  # stable rates: chaos at the top amplifies rounding
    specs = [
        sweep.RunSpec(optimizer=name, width=16, depth=1, lr=lr, seed=seed)
        for seed in (0, 1)
        for lr in lrs
    ]
    # A diverging run in the same group (one compile for the whole group): it is reported,
    # and it does not spoil the others.
    specs.append(sweep.RunSpec(optimizer=name, width=16, depth=1, lr=1e30, seed=0))
    one_at_a_time = sweep.CompiledRuns()  # one compile per seed, the learning rate as data
    alone = [one_at_a_time(spec, config) for spec in specs[:-1]]
    together = batched.BatchedRuns().run_group(specs, config)
    *together, bad = together
    assert bad["diverged"] and np.isnan(bad["val_nelbo"])
    assert np.isnan(bad["train_loss_smoothed"])
    for spec, a, b in zip(specs, alone, together, strict=False):
        assert a["diverged"] == b["diverged"] is False, spec
        for key in ("val_nelbo", "train_loss_smoothed"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (spec, key)
    # The runs differ from each other: each kept its own seed and learning rate.
    assert len({round(r["val_nelbo"], 6) for r in together}) == len(specs) - 1
    # Both engines time the steps after the first (the benchmark's steady state); a group's
    # runs share its time.
    assert all(0 < r["steps_s"] < 60 for r in alone)
    assert len({r["steps_s"] for r in (*together, bad)}) == 1 and 0 < bad["steps_s"] < 60


def test_a_group_needs_one_shape():
    config = sweep.resolve(sweep.SweepConfig(quick=True))
    specs = [sweep.RunSpec(optimizer="adamw", width=w, depth=1, lr=0.01, seed=0) for w in (16, 32)]
    with pytest.raises(ValueError, match="one optimizer, width and depth"):
        batched.BatchedRuns().run_group(specs, config)
