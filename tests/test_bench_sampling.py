"""python -m jif.bench.sampling: a row per method, and the --judge quality mode end to end."""

import json

import pytest

from jif import train
from jif.bench import sampling as bench


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_sampling")
    common = ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "32"]
    common += ["--eval-every", "0", "--n-samples", "0", "--no-progress"]
    train.main(common + ["--out", str(root / "mdlm")])
    train.main(common + ["--out", str(root / "ar"), "--objective", "ar"])
    return str(root / "mdlm"), str(root / "ar")


def test_speed_rows_for_every_method(tmp_path):
    out = bench.main(
        ["--preset", "tiny", "--steps", "8", "--length", "16", "--batch", "2", "--repeats", "1"]
        + ["--out", str(tmp_path / "s.json")]
    )
    assert set(out["methods"]) == set(bench.sampling.METHODS)
    for name in ("confidence", "threshold", "interference"):
        assert out["methods"][name]["calls_per_sample"] <= 8
    assert out["methods"]["ddpm"]["calls_per_sample"] == 9  # every step and the final one


def test_quality_mode_end_to_end(runs, tmp_path, capsys):
    mdlm, ar = runs
    figure, path = tmp_path / "q.png", tmp_path / "q.json"
    argv = ["--checkpoint", mdlm, "--judge", ar, "--samples", "4", "--steps", "4", "8"]
    argv += ["--methods", "confidence", "interference", "threshold"]
    out = bench.main(argv + ["--figure", str(figure), "--out", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    assert figure.stat().st_size > 1000
    rows = {(r["method"], r["steps"]): r for r in out["rows"]}
    assert len(rows) == 6
    for steps in (4, 8):
        conf, inter = rows[("confidence", steps)], rows[("interference", steps)]
        assert conf["calls_per_sample"] == steps  # 31 masks: every step reveals something
        assert inter["gen_ppl"] == conf["gen_ppl"]  # no probe: the same samples
        assert rows[("threshold", steps)]["calls_per_sample"] <= steps
        assert 0 <= conf["story_level"] <= 1 and conf["entropy"] > 0
    assert "no probe at" in out["notes"]["interference"]
    assert "no probe at" in capsys.readouterr().out


def test_quality_mode_mistakes(runs, capsys):
    mdlm, _ = runs
    for argv, message in (
        (["--judge", mdlm], "--judge needs --checkpoint"),
        (["--checkpoint", mdlm, "--judge", mdlm], "the judge must be an autoregressive checkpoint"),
        (["--steps", "4", "8"], "several --steps need --judge"),
    ):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
