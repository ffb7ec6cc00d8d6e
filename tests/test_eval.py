"""python -m jif.eval: likelihood with intervals, bits per byte, the AR judge, and errors."""

import json
import math
import shutil

import numpy as np
import pytest
import scipy.stats

from jif import checkpoint, data, diffusion, genppl, train, windows
from jif import eval as jif_eval
from jif.tokenizer import load_tokenizer

TINY = dict(
    preset="tiny",
    batch_size=4,
    seq_len=32,
    eval_sequences=4,
    eval_times=2,
    log_every=1,
    progress=False,
)
FAST = ["--sequences", "8", "--batch-size", "4", "--times", "2"]
TEXT = "\n<|endoftext|>\n".join(
    f"Story {i}: once upon a time a fox named Ada-{i} found {i * 7} shiny stones by the river. "
    "She gave them to her friends, and they all smiled. Ça va, said the crow. 🐦"
    for i in range(40)
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny run folders of 3 steps, evaluated and sampled at the end: "mdlm", "ar" and
    "untrained" (mdlm at learning rate 0: the initial weights, whose zero output layer
    predicts uniformly)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, objective, lr in [
        ("mdlm", "mdlm", 3e-3),
        ("ar", "ar", 3e-3),
        ("untrained", "mdlm", 0.0),
    ]:
        cfg = train.configure(
            **TINY,
            steps=3,
            optimizer="adamw",
            lr=lr,
            objective=objective,
            eval_every=3,
            n_samples=1,
            sample_steps=8,
            out=str(root / name),
        )
        train.run(cfg)
        out[name] = str(root / name)
    return out


def run_cli(capsys, *argv):
    """jif.eval's main with --json: the one JSON object it prints."""
    jif_eval.main([*argv, "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


# ----------------------------------------------------------------------------- pieces


def test_token_bytes_are_the_utf8_bytes_of_the_text():
    tok = load_tokenizer(2048)
    ids = tok.encode(TEXT)
    # the separators' text "<|endoftext|>" becomes the end-of-text token: no bytes
    assert windows.token_bytes(tok)[ids].sum() == len(TEXT.replace("<|endoftext|>", "").encode())
    assert windows.token_bytes(tok)[[tok.eot_id, tok.mask_id]].tolist() == [0, 0]


def test_ratio_interval_is_students_t_and_covers():
    """Equal denominators: the mean and t interval of the ratios; and on synthetic data the
    95% interval covers the true ratio about 95% of the time."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 0.5, 12)
    ratio, half = genppl.ratio_interval(x * 3, np.full(12, 3.0))
    lo, hi = scipy.stats.t.interval(0.95, 11, loc=x.mean(), scale=scipy.stats.sem(x))
    np.testing.assert_allclose([ratio - half, ratio + half], [lo, hi], rtol=1e-10)
    hits = 0
    for _ in range(2000):
        den = rng.integers(50, 150, 20).astype(float)
        num = 0.7 * den + rng.normal(0, 3, 20)
        r, h = genppl.ratio_interval(num, den)
        hits += abs(r - 0.7) <= h
    assert 0.93 < hits / 2000 < 0.97
    assert math.isnan(genppl.ratio_interval([1.0], [2.0])[1])


def test_repetitive_samples_get_low_entropy():
    """Known answers: one token repeated has entropy 0 and every 4-gram repeated; distinct
    tokens have entropy log(n) and none repeated; real story windows lie between."""
    tok = load_tokenizer(2048)
    n = 31
    same = np.full((3, n + 1), 7)
    distinct = np.tile(np.arange(n + 1), (3, 1))
    s, d = genppl.sample_stats(same), genppl.sample_stats(distinct)
    assert s["entropy"] == 0 and s["repeated_4grams"] == pytest.approx(1 - 1 / (n - 3))
    assert d["entropy"] == pytest.approx(math.log(n)) and d["repeated_4grams"] == 0
    phrase = tok.encode(" the dog ran.")
    k = len(phrase)  # a loop of k distinct tokens, 10 times: entropy log k, k distinct 4-grams
    loop = np.array([[tok.eot_id] + phrase * 10] * 4)
    real = data.validation_tokens("stories", tok, seq_len=64, n_sequences=4)
    r, lo = genppl.sample_stats(real), genppl.sample_stats(loop)
    assert lo["entropy"] == pytest.approx(math.log(k)) and lo["entropy"] < 0.6 * r["entropy"]
    assert lo["repeated_4grams"] == pytest.approx(1 - k / (10 * k - 3))
    assert r["repeated_4grams"] < 0.5


def test_retokenize_goes_through_text():
    big, small = load_tokenizer(2048), load_tokenizer(512)
    text = "Once upon a time, Mia found a red ball."
    rows = np.array([[big.eot_id] + big.encode(text)])
    out, valid = genppl.retokenize(rows, big, small, 40)
    want = [small.eot_id] + small.encode(text)
    assert len(want) > rows.shape[1]  # the smaller vocabulary needs more tokens
    np.testing.assert_array_equal(out[0, : len(want)], want)
    assert valid[0].sum() == len(want) and (out[0, len(want) :] == small.eot_id).all()


# ----------------------------------------------------------------------------- end to end


def test_training_evaluates_an_ar_run_by_its_nll(runs):
    rows = [json.loads(x) for x in open(f"{runs['ar']}/metrics.jsonl")]
    (ev,) = [r for r in rows if "val_nelbo" in r]
    assert ev["val_nll"] == ev["val_nelbo"] and ev["val_nll"] > 0
    assert ev["val_name_nats"] > 0 and len(ev["samples"]) == 1
    config = json.load(open(f"{runs['ar']}/config.json"))
    assert config["objective"] == "ar" and config["model_config"]["causal"] is True
    assert jif_eval.summary_line(ev).startswith("step 3: val NLL")


def test_cli_ar_equals_numpy_cross_entropy(runs, capsys):
    """The AR checkpoint's nats/token and bits/byte against numpy on the same windows."""
    out = run_cli(capsys, "--checkpoint", runs["ar"], *FAST)
    loaded = checkpoint.load_for_inference(runs["ar"])
    tok = loaded.tokenizer
    x = data.validation_tokens("stories", tok, seq_len=32, n_sequences=8)
    z = np.asarray(loaded.denoise_fn(x), np.float64)[:, :-1]
    z[..., tok.mask_id] = -np.inf
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats = -np.take_along_axis(logp, x[:, 1:, None], -1).sum()
    n_bytes = sum(len(tok.decode([t for t in r if t < tok.n_bpe]).encode()) for r in x)
    assert out["objective"] == "ar" and out["measure"] == "nll" and out["step"] == 3
    np.testing.assert_allclose(out["nelbo"], nats / x.size, rtol=1e-5)
    np.testing.assert_allclose(out["bits_per_byte"], nats / math.log(2) / n_bytes, rtol=1e-5)
    assert out["n_bytes"] == n_bytes and out["n_sequences"] == 8 and out["n_times"] is None
    lo, hi = out["nelbo_ci95"]
    assert lo < out["nelbo"] < hi and out["n_batches"] == 2
    want = {"data": "stories", "split": "validation", "seq_len": 32, "packing": "pack", "seed": 0}
    assert out["data"] == want


def test_cli_mdlm_untrained_has_the_known_nelbo(runs, capsys):
    """Uniform predictions over the 2049 real ids: the NELBO's expectation is
    (1 - eps) log 2049 per token; the interval (masks and windows) covers it."""
    loaded = checkpoint.load_for_inference(runs["untrained"])
    assert np.all(np.asarray(loaded.denoise_fn(np.zeros((1, 32), np.int32))) == 0)
    argv = ["--sequences", "64", "--batch-size", "8", "--times", "4"]
    out = run_cli(capsys, "--checkpoint", runs["untrained"], *argv)
    want = (1 - diffusion.EPS) * math.log(2049)
    lo, hi = out["nelbo_ci95"]
    assert out["measure"] == "nelbo" and out["n_times"] == 4 and out["n_batches"] == 8
    assert lo < want < hi and hi - lo < 0.2 * want, (lo, want, hi)
    bytes_per_token = out["n_bytes"] / out["n_tokens"]
    np.testing.assert_allclose(
        out["bits_per_byte"], out["nelbo"] / math.log(2) / bytes_per_token, rtol=1e-9
    )


def test_cli_on_a_text_file(runs, capsys, tmp_path):
    """Any text file: its held-out windows, or all of them (never a window twice)."""
    path = tmp_path / "notes.txt"
    path.write_text(TEXT, encoding="utf-8")
    tok = load_tokenizer(2048)
    held = run_cli(capsys, "--checkpoint", runs["mdlm"], "--data", str(path), *FAST)
    argv = ["--data", str(path), "--split", "all", "--sequences", "1000"]
    every = run_cli(capsys, "--checkpoint", runs["ar"], *argv)
    # windows are BOS + 31 tokens of each split's stream (every story followed by eot); a
    # window that would start on a separator skips it, so up to one fewer per split
    expect = {
        split: sum(len(tok.encode(d)) + 1 for d in data.read_documents(path, split)) // 31
        for split in ("train", "validation")
    }
    assert len(data.read_documents(path, "validation")) == 2  # 5% of 40 stories
    assert held["data"]["split"] == "validation"
    assert expect["validation"] - 1 <= held["n_sequences"] <= expect["validation"]
    total = sum(expect.values())
    assert total - 2 <= every["n_sequences"] <= total, (every["n_sequences"], expect)
    assert every["data"]["sha256"] == held["data"]["sha256"]
    assert 1.0 < every["bytes_per_token"] < 4.0 and every["bits_per_byte"] > 0


def test_judge_end_to_end(runs, capsys):
    """Diffusion samples scored by the AR checkpoint, and AR samples (left to right) too."""
    argv = ["--judge", runs["ar"], "--samples", "4", "--steps", "8", *FAST]
    out = run_cli(capsys, "--checkpoint", runs["mdlm"], *argv)
    g = out["generative"]
    assert g["tokenization"].startswith("same tokenizer") and g["n_samples"] == 4
    assert g["method"] == "confidence" and g["sample_length"] == 32
    np.testing.assert_allclose(g["gen_ppl"], math.exp(g["nll"]))
    assert 0 < g["entropy"] <= math.log(31) and 0 <= g["repeated_4grams"] <= 1
    assert g["reference"]["n_rows"] == 4 and g["reference"]["nll"] > 0
    only = ["--judge", runs["ar"], "--samples", "4", "--sequences", "0"]  # no likelihood
    ar_out = run_cli(capsys, "--checkpoint", runs["ar"], *only)
    assert "nelbo" not in ar_out and np.isfinite(ar_out["generative"]["gen_ppl"])
    assert ar_out["generative"]["reference"]["n_rows"] == 4
    jif_eval.main(["--checkpoint", runs["mdlm"], *argv])
    assert "gen PPL" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors


def _bad_inputs(runs, tmp):
    corrupt = tmp / "corrupt"
    shutil.copytree(runs["mdlm"], corrupt)
    for meta in corrupt.glob("checkpoints/*/meta/metadata"):
        meta.write_text("{not json")
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("Caf\xe9 au lait.\n\nUne autre histoire.".encode("latin1"))
    (tmp / "masked.txt").write_text("One story.\n\nA <|mask|> in the second.\n")
    (tmp / "short.txt").write_text("Tiny.\n\nStories.\n")
    return {
        "missing checkpoint": (["--checkpoint", str(tmp / "nope")], "does not exist"),
        "corrupt checkpoint": (["--checkpoint", str(corrupt)], "corrupt"),
        "empty file": (["--data", str(tmp / "empty.txt")], "is empty"),
        "not UTF-8": (["--data", str(tmp / "latin1.txt")], "not UTF-8 text: byte 0xe9"),
        "mask token": (["--data", str(tmp / "masked.txt")], "line 3 contains '<|mask|>'"),
        "too short": (["--data", str(tmp / "short.txt"), "--split", "all"], "less than one window"),
        "judge not AR": (["--judge", runs["mdlm"]], "must be an autoregressive"),
        "split of a stream": (["--split", "all"], "stream"),
    }


CASES = ["missing checkpoint", "corrupt checkpoint", "empty file", "not UTF-8", "mask token"]
CASES += ["too short", "judge not AR", "split of a stream"]


@pytest.mark.parametrize("case", CASES)
def test_errors_exit_2_with_a_message(runs, tmp_path, capsys, case):
    argv, message = _bad_inputs(runs, tmp_path)[case]
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", runs["mdlm"], *argv]
    with pytest.raises(SystemExit) as e:
        jif_eval.main([*argv, *FAST, "--samples", "2", "--steps", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert message in err, err


def test_bad_options_are_refused():
    for kw, message in [({"times": 0}, "--times"), ({"split": "dev"}, "--split")]:
        with pytest.raises(ValueError, match=message):
            jif_eval.MeasureConfig(checkpoint="x", **kw).validate()
