"""The benchmark: its FLOP count is the model's matmul work, and the CLI runs end to end."""

import json
import statistics
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jif import flops
from jif import model as model_lib
from jif.bench import accel as accel_bench
from jif.bench import attention as attention_bench
from jif.bench import cli as bench_cli
from jif.bench import sweep as sweep_bench
from jif.bench import train as train_bench
from transfer import workers


def test_xla_flops_of_a_matmul_is_2mnk():
    m, k, n = 64, 32, 48
    f = jax.jit(lambda a, b: a @ b)
    compiled = f.lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert train_bench.xla_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.01)


def _dot_flops(jaxpr) -> int:
    """2 x (output size) x (contracted size) summed over every dot_general, sub-jaxprs too
    (a scan's body once per iteration)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = int(np.prod([lhs[d] for d in contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += repeats * _dot_flops(sub)
    return total


@pytest.mark.parametrize("overrides", [{}, {"adaln": True}, {"arch": "modula"}], ids=str)
def test_flops_per_token_counts_every_matmul_of_the_forward_pass(overrides):
    """flops.flops_per_token against the matmuls jax actually traces (an independent count)."""
    config = model_lib.make_config("tiny", vocab_size=300, **overrides)
    model = model_lib.build_model(config, jax.random.key(0))
    batch, seq = 2, 24
    tokens, rate = jnp.zeros((batch, seq), jnp.int32), jnp.full((batch,), 0.5)
    jaxpr = jax.make_jaxpr(lambda t, r: model_lib.apply_logits(model, t, r))(tokens, rate).jaxpr
    counted = flops.flops_per_token(config, seq) * batch * seq
    if config.adaln:  # per-sequence conditioning is spread over the sequence's tokens
        assert counted == pytest.approx(_dot_flops(jaxpr), rel=1e-9)
    else:
        assert counted == _dot_flops(jaxpr)


def test_bench_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--presets", "tiny", "--batch-size", "4", "--seq-len", "16", "--steps", "2",
        "--rounds", "2", "--peak-n", "128", "--sample-preset", "tiny",
        "--sample-methods", "ddpm_cache", "--sample-steps", "4", "--sample-length", "16",
        "--sample-batch", "2", "--sample-repeats", "1", "--out", str(out),
        "--sweep-widths", "32", "--sweep-n-lrs", "2", "--sweep-seeds", "1", "--sweep-steps", "2",
        "--sweep-rounds", "2",
    ]  # fmt: skip
    result = bench_cli.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["machine"]["processor"] == flops.processor()  # every record names it
    (r,) = result["train"]
    assert r["processor"] == flops.processor()
    assert (r["dtype"], r["attention"]) == ("float32", "xla")  # the CPU's defaults
    # the peak is the faster of XLA's matmul and numpy's (the BLAS), both measured here
    assert r["peak_flops"] >= max(r["peak_xla_flops"], r["peak_numpy_flops"]) * (1 - 1e-9)
    assert r["flops_per_step_model"] == flops.train_step_flops(
        model_lib.make_config("tiny", vocab_size=train_bench.VOCAB_SIZE), 4, 16
    )
    # XLA counts the model's matmuls plus elementwise work and the optimizer: a bit more.
    assert 0.9 < r["xla_over_model"] < 3.0
    assert all(0 < x < 5 for x in r["mfu_rounds"]) and np.isfinite(r["final_loss"])
    assert 1 <= result["sampling"]["methods"]["ddpm_cache"]["n_calls"] <= 4
    sweep = result["sweep"]["32"]
    # two parameterisations x 2 learning rates x 1 seed, the groups in a worker per core
    assert (sweep["runs"], sweep["groups"]) == (4, 2)
    assert sweep["workers"] == min(2, len(workers.cores()))
    # every ratio is taken within a round (the steady state is the engines' time of the
    # steps after the first, here one: may be noise); the record holds each round's medians
    assert len(sweep["rounds"]) == 2
    for one in sweep["rounds"]:
        for way, suffix in (("batched", ""), ("workers", "_workers")):
            for pre in ("", "steady_"):
                ratio = one[f"{pre}one_at_a_time_s"] / one[f"{pre}{way}_s"]
                assert one[f"{pre}speedup{suffix}"] == ratio
        # the timed steps are part of each way's wall time
        assert all(0 < one[f"steady_{way}_s"] < one[f"{way}_s"] for way in sweep_bench.WAYS)
    for key in sweep["rounds"][0]:
        assert sweep[key] == statistics.median(one[key] for one in sweep["rounds"])
    assert sweep["runs_per_hour_batched"] == 3600 * 4 / sweep["batched_s"]
    assert "tiny" in bench_cli.format_table(result) and "steady state" in bench_cli.format_table(
        result
    )


def test_bench_rejects_unknown_preset():
    with pytest.raises(ValueError, match="huge"):
        bench_cli.run(bench_cli.BenchConfig(presets=("huge",), sampling=False, out=""))
    with pytest.raises(ValueError, match="sweep_rounds must be at least 1"):
        sweep_bench.run(sweep_bench.SweepBench(sweep_rounds=0))
    with pytest.raises(ValueError, match="sweep_steps must be at least 2"):
        sweep_bench.run(sweep_bench.SweepBench(sweep_steps=1))


def test_processor_is_the_os_model_name_with_its_family_and_model():
    with open("/proc/cpuinfo") as f:
        lines = [ln.split(":", 1) for ln in f if ":" in ln]
    first = lambda key: next(v.strip() for k, v in lines if k.strip() == key)
    expected = f"{first('model name')} (cpu family {first('cpu family')}, model {first('model')})"
    assert flops.processor() == expected


def test_cpu_peak_is_the_faster_of_xla_and_numpy():
    peak = flops.MatmulPeak(128)
    best = peak.measure(repeats=2)
    assert set(peak.last) == {"xla", "numpy"} and best == max(peak.last.values())
    assert flops.stated_peak("float32") is None  # on CPU the peak is measured


def test_stated_peak_per_dtype_and_device_count(monkeypatch):
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(jax, "devices", lambda: [gpu, gpu])
    assert flops.stated_peak("bfloat16") == 2 * 989e12
    assert flops.stated_peak("float32") == 2 * 494e12  # TF32 tensor cores
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    monkeypatch.setattr(jax, "devices", lambda: [tpu])
    assert flops.stated_peak("bfloat16") == 197e12
    odd = types.SimpleNamespace(platform="gpu", device_kind="Some New Card")
    monkeypatch.setattr(jax, "devices", lambda: [odd])
    assert flops.stated_peak("bfloat16") is None  # unknown: measured instead


def test_accel_bench_quick_runs_on_cpu(tmp_path):
    """The accelerator benchmark, unchanged, at --quick sizes: one cell per sequence length,
    equal tokens per step, each with tokens/s, MFU, memory and the kernel that ran."""
    out = tmp_path / "accel.json"
    result = accel_bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cells = result["cells"]
    assert [(c["preset"], c["seq_len"], c["batch_size"]) for c in cells] == [
        ("tiny", 32, 8),
        ("tiny", 64, 4),
    ]
    for c in cells:
        assert c["processor"] == flops.processor() and c["attention"] == "xla"
        assert c["tokens_per_s"] > 0 and 0 < c["mfu"] < 5 and c["peak_rss_bytes"] > 0
        assert c["flops_per_step_model"] == flops.train_step_flops(
            model_lib.make_config("tiny", vocab_size=train_bench.VOCAB_SIZE),
            c["batch_size"],
            c["seq_len"],
        )
    assert "tiny" in accel_bench.format_table(result)


def test_accel_bench_rejects_bad_settings(capsys):
    with pytest.raises(SystemExit) as e:
        accel_bench.main(["--quick", "--attention", "cudnn", "--out", ""])
    assert e.value.code == 2 and "attention='cudnn' runs on" in capsys.readouterr().err


def test_attention_bench_runs_end_to_end(tmp_path):
    """jif.bench.attention at tiny sizes: every variant timed, and the scaling rows' FLOP
    growth is jif.flops' count at equal tokens."""
    out = tmp_path / "attention.json"
    argv = [
        "--preset", "tiny", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
        "--batch-size", "4", "--seq-len", "16", "--scaling-lens", "16", "32",
        "--steps", "1", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    result = attention_bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["machine"]["processor"] == flops.processor()
    share = result["share"]
    assert (
        list(share) == ["fused", "chunked", "penzai", "no_core"]
        and share["fused"]["over_first"] == 1
    )
    assert all(len(r["rounds"]) == 2 and r["step_s"] > 0 for r in share.values())
    config = model_lib.make_config(
        "tiny", vocab_size=train_bench.VOCAB_SIZE, d_model=32, n_layers=1, n_heads=2
    )
    per_token = lambda n: flops.train_step_flops(config, 64 // n, n) / 64
    rows = {(r["variant"], r["seq_len"]): r for r in result["scaling"]}
    assert set(rows) == {(v, n) for v in ("fused", "chunked", "penzai") for n in (16, 32)}
    assert rows["fused", 32]["flop_growth"] == pytest.approx(per_token(32) / per_token(16))
    assert rows["penzai", 16]["time_growth"] == 1.0
    with pytest.raises(SystemExit):
        attention_bench.main(["--variants", "nope", "--out", ""])
