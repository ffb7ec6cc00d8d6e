"""Named-axis sharding on 8 forced host CPU devices (tests/conftest.py sets XLA_FLAGS)."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jif import checkpoint, sharding, train
from jif import model as model_lib

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced host) devices")


def test_parse_mesh():
    assert sharding.parse_mesh("4x2") == (4, 2)
    assert sharding.parse_mesh("1X8") == (1, 8)
    for bad in ["4", "4x", "ax2", "0x2"]:
        with pytest.raises(ValueError, match="mesh"):
            sharding.parse_mesh(bad)
    assert sharding.make_mesh(None) is None
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh("64x64")


@needs_8
def test_parameters_sharded_by_axis_name():
    mesh = sharding.make_mesh("4x2")
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    params = checkpoint.init_model(model_lib.make_config("tiny"), 0)[1]
    specs = {k: s.data_array.spec for k, s in sharding.tree_shardings(params, mesh).items()}
    # named_shape order: query {blocks, embedding, heads, projection}
    assert specs["dit/blocks/attn/query"] == P(None, None, "model", None)
    assert specs["dit/blocks/mlp/up"] == P(None, None, "model")  # neurons
    assert specs["dit/blocks/mlp/down"] == P(None, "model", None)
    assert specs["dit/embed"] == P("model", None)  # vocabulary
    assert specs["dit/out/norm"] == P(None)
    # An axis the mesh does not divide stays replicated (tiny has 2 heads; model axis 8).
    mesh8 = sharding.make_mesh("1x8")
    spec8 = sharding.tree_shardings(params, mesh8)["dit/blocks/attn/query"].data_array.spec
    assert spec8 == P(None, None, None, None)
    # Batches go over "data"; the batch size must divide.
    batch = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)
    arr = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    np.testing.assert_array_equal(np.asarray(arr), batch)
    assert arr.sharding.spec == P("data", None)
    with pytest.raises(ValueError, match="divisible"):
        sharding.put_batch(batch[:6], sharding.batch_sharding(mesh))


@needs_8
def test_sharded_losses_equal_single_device():
    cfg = train.configure(
        preset="tiny",
        batch_size=8,
        seq_len=32,
        steps=4,
        optimizer="adamw",
        lr=1e-2,
        warmup=1,
        eval_every=4,
        eval_sequences=8,
        eval_times=2,
        n_samples=0,
    )
    single = train.run(cfg, progress=False)
    sharded = train.run(dataclasses.replace(cfg, mesh="4x2"), progress=False)
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=0, atol=1e-5)
    assert sharded["val_nelbo"] == pytest.approx(single["val_nelbo"], abs=1e-5)
    up = sharded["final_params"]["dit/blocks/mlp/up"].data_array
    assert up.sharding.spec == P(None, None, "model") and len(up.sharding.device_set) == 8
    # Weights agree to reduction-order noise (Adam's 1/sqrt(v) amplifies it a little, and the
    # embedding's steps are embed_lr_mult times larger).
    for k, v in single["final_params"].items():
        atol = 1e-4 * (cfg.optim.embed_lr_mult if k == "dit/embed" else 1.0)
        np.testing.assert_allclose(
            np.asarray(sharded["final_params"][k].data_array), v.data_array, atol=atol, err_msg=k
        )
