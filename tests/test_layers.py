"""jif.layers: each fast layer against the penzai layer it replaces (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from jif import layers as L


def test_single_index_embedding_equals_naive_lookup():
    table = pz.nx.wrap(jax.random.normal(jax.random.key(0), (130, 8))).tag(
        "vocabulary", "embedding"
    )
    x = jnp.asarray(np.random.default_rng(0).integers(0, 130, (3, 7)), jnp.int32)
    named = pz.nx.wrap(x).tag("batch", "seq")

    def via(layer_cls, w):
        p = pz.ParameterValue(value=pz.nx.wrap(w).tag("vocabulary", "embedding"), label="t")
        if layer_cls is L.Embed:
            layer = L.Embed(table=p)
        else:
            layer = pz.nn.EmbeddingLookup(
                pz.nn.EmbeddingTable(embeddings=p, vocabulary_axis="vocabulary")
            )
        return layer(named).unwrap("batch", "seq", "embedding")

    w = table.unwrap("vocabulary", "embedding")
    ours, ref = via(L.Embed, w), via(None, w)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, jax.nn.one_hot(x, 130) @ w, rtol=1e-6)
    # same gradient wrt the table as the vmapped lookup
    grads = [jax.grad(lambda w, c=c: jnp.sum(jnp.sin(via(c, w))))(w) for c in (L.Embed, None)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)


def test_flat_linear_equals_penzai_linear():
    """The one-matmul Linear gives penzai's Linear values and gradients (multi-axis in/out)."""
    w = pz.nx.wrap(jax.random.normal(jax.random.key(0), (2, 3, 5))).tag(
        "heads", "projection", "embedding"
    )
    x = pz.nx.wrap(jax.random.normal(jax.random.key(1), (4, 6, 2, 3))).tag(
        "batch", "seq", "heads", "projection"
    )

    def run(cls, w_raw):
        weights = pz.ParameterValue(value=pz.nx.wrap(w_raw).tag(*w.named_shape), label="w")
        layer = cls(
            weights=weights, in_axis_names=("heads", "projection"), out_axis_names=("embedding",)
        )
        return layer(x).unwrap("batch", "seq", "embedding")

    raw = w.unwrap("heads", "projection", "embedding")
    np.testing.assert_allclose(run(L.FlatLinear, raw), run(pz.nn.Linear, raw), rtol=1e-5, atol=1e-6)
    grads = [
        jax.grad(lambda r, c=c: jnp.sum(jnp.sin(run(c, r))))(raw)
        for c in (L.FlatLinear, pz.nn.Linear)
    ]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_flat_norm_equals_penzai_norm():
    """RMS standardisation and the gain in x's axis order equal penzai's RMSLayerNorm."""
    x = pz.nx.wrap(jax.random.normal(jax.random.key(0), (3, 5, 8))).tag("batch", "seq", "embedding")
    g = pz.ParameterValue(
        value=pz.nx.wrap(jax.random.normal(jax.random.key(1), (8,))).tag("embedding"), label="g"
    )
    ours = pz.nn.RMSLayerNorm(
        [
            L.FlatRMSStandardize(across="embedding", epsilon=1e-6),
            L.FlatLinear(weights=g, in_axis_names=(), out_axis_names=()),
        ]
    )
    ref = pz.nn.RMSLayerNorm(
        [
            pz.nn.RMSStandardize(across="embedding", epsilon=1e-6),
            pz.nn.Linear(weights=g, in_axis_names=(), out_axis_names=()),
        ]
    )
    names = ("batch", "seq", "embedding")
    np.testing.assert_allclose(ours(x).unwrap(*names), ref(x).unwrap(*names), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("static", [True, False])
def test_table_rope_equals_penzai_rope(static):
    """The table RoPE rotates like penzai's ApplyRoPE (values and gradients), with positions
    held in numpy (constant tables) or traced, and with other axes in any order."""
    x = pz.nx.wrap(jax.random.normal(jax.random.key(0), (3, 16, 2, 8))).tag(
        "batch", "seq", "heads", "projection"
    )
    pos = L.static_positions(16) if static else pz.nx.arange("seq", 16)
    names = ("heads", "batch", "seq", "projection")

    def run(cls, raw):
        inp = pz.nx.wrap(raw).tag(*x.named_shape)
        return cls("projection", 1e4, "p")(inp, p=pos).unwrap(*names)

    raw = x.unwrap(*x.named_shape)
    ours, ref = jax.jit(lambda r: run(L.TableRoPE, r)), lambda r: run(pz.nn.ApplyRoPE, r)
    np.testing.assert_allclose(ours(raw), ref(raw), rtol=1e-5, atol=2e-6)
    grads = [jax.grad(lambda r, f=f: jnp.sum(jnp.sin(f(r)) * f(r)))(raw) for f in (ours, ref)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=2e-6)
    assert not np.allclose(ours(raw), raw.transpose(2, 0, 1, 3))  # it does rotate


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_f32_equals_penzai_softmax_in_float32(dtype):
    x = pz.nx.wrap(3 * jax.random.normal(jax.random.key(0), (2, 5, 7))).tag(
        "heads", "seq", "kv_seq"
    )
    names = ("heads", "seq", "kv_seq")
    ours = L.SoftmaxF32("kv_seq")(x.astype(dtype))
    assert ours.dtype == dtype
    ref = pz.nn.Softmax("kv_seq")(x.astype(dtype).astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(ours.unwrap(*names), ref.unwrap(*names))


def test_unembed_equals_penzai_linear_on_the_real_columns():
    """The padded table's first `size` columns, by one matmul: penzai's Linear on them."""
    w = pz.nx.wrap(jax.random.normal(jax.random.key(0), (8, 12))).tag("embedding", "vocabulary")
    x = pz.nx.wrap(jax.random.normal(jax.random.key(1), (3, 4, 8))).tag("batch", "seq", "embedding")
    names = ("batch", "seq", "vocabulary")
    ours = L.Unembed(weights=pz.ParameterValue(value=w, label="u"), size=10)(x)
    real = pz.ParameterValue(value=w[{"vocabulary": pz.slice[:10]}], label="u")
    ref = pz.nn.Linear(weights=real, in_axis_names=("embedding",), out_axis_names=("vocabulary",))
    assert ours.named_shape["vocabulary"] == 10
    np.testing.assert_allclose(ours.unwrap(*names), ref(x).unwrap(*names), rtol=1e-5, atol=1e-6)


def test_scaled_residual_is_a_convex_mix():
    x = pz.nx.wrap(jnp.arange(6.0)).tag("embedding")
    layer = L.ScaledResidual(delta=pz.nn.Elementwise(jnp.square), alpha=0.25)
    np.testing.assert_allclose(
        layer(x).unwrap("embedding"), 0.75 * np.arange(6.0) + 0.25 * np.arange(6.0) ** 2
    )
