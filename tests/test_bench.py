"""Smoke test of the benchmarks with tiny settings: the JSON's fields are sane and agree."""

import json
import statistics

import jax
import jax.numpy as jnp
import pytest

from bench import run as bench_run
from bench import train as train_bench


def test_xla_flops_of_a_matmul_is_2mnk():
    m, k, n = 64, 32, 48
    f = jax.jit(lambda a, b: a @ b)
    compiled = f.lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert train_bench.xla_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.01)


def test_bench_cli_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--presets", "tiny", "--batch-size", "4", "--seq-len", "16", "--steps", "2",
        "--rounds", "2", "--peak-n", "128", "--sample-preset", "tiny",
        "--sample-methods", "ddpm_cache", "--sample-steps", "4", "--sample-length", "16",
        "--sample-batch", "2", "--sample-repeats", "1", "--out", str(out),
    ]  # fmt: skip
    result = bench_run.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    m = result["machine"]
    assert m["backend"] == jax.default_backend() and m["cpu_count"] >= 1
    (r,) = result["train"]
    assert r["preset"] == "tiny" and (r["batch_size"], r["seq_len"]) == (4, 16)
    assert r["compile_s"] > 0 and r["trace_s"] > 0
    assert 0 < r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
    assert r["tokens_per_s"] == pytest.approx(4 * 16 / r["step_s"])
    # XLA counts the model's matmuls plus elementwise work and the optimizer: a bit more.
    assert 0.9 < r["xla_over_model"] < 3.0
    assert r["achieved_flops"] == pytest.approx(r["flops_per_step_model"] / r["step_s"])
    assert len(r["mfu_rounds"]) == 2 and r["mfu"] == pytest.approx(
        statistics.median(r["mfu_rounds"])
    )
    assert all(0 < x < 5 for x in r["mfu_rounds"])  # ratios, not timings: any machine
    assert r["peak_flops"] > 0 and r["final_loss"] > 0
    assert r["memory_argument_bytes"] > 0 and r.get("peak_rss_bytes", 1) > 0
    assert r["data_batch_s"] >= 0 and r["data_first_batch_s"] >= r["data_batch_s"]

    s = result["sampling"]["methods"]["ddpm_cache"]
    assert 1 <= s["n_calls"] <= 4 and s["wall_s"] > 0
    assert "tiny" in bench_run.format_table(result)


def test_bench_rejects_unknown_preset():
    with pytest.raises(ValueError, match="huge"):
        bench_run.run(bench_run.BenchConfig(presets=("huge",), sampling=False, out=""))
