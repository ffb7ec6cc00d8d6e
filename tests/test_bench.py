"""The benchmark: its FLOP count is the model's matmul work, and the CLI runs end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jif import flops
from jif import model as model_lib
from jif.bench import cli as bench_cli
from jif.bench import train as train_bench


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
        "--sweep-widths", "16", "--sweep-n-lrs", "2", "--sweep-seeds", "2", "--sweep-steps", "2",
    ]  # fmt: skip
    result = bench_cli.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["machine"]["processor"]  # every record names its processor
    (r,) = result["train"]
    assert r["flops_per_step_model"] == flops.train_step_flops(
        model_lib.make_config("tiny", vocab_size=train_bench.VOCAB_SIZE), 4, 16
    )
    # XLA counts the model's matmuls plus elementwise work and the optimizer: a bit more.
    assert 0.9 < r["xla_over_model"] < 3.0
    assert all(0 < x < 5 for x in r["mfu_rounds"]) and np.isfinite(r["final_loss"])
    assert 1 <= result["sampling"]["methods"]["ddpm_cache"]["n_calls"] <= 4
    sweep = result["sweep"]["16"]
    assert sweep["runs"] == 4 and sweep["speedup"] > 0
    assert "tiny" in bench_cli.format_table(result)


def test_bench_rejects_unknown_preset():
    with pytest.raises(ValueError, match="huge"):
        bench_cli.run(bench_cli.BenchConfig(presets=("huge",), sampling=False, out=""))
