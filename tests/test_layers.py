"""jif.layers: each fast layer against the penzai layer it replaces (values and gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from penzai import pz

from jif import checkpoint as ckpt
from jif import layers as L
from jif import model as M


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


def _attention(causal: bool, arch: str):
    """A DiT attention layer (d_model 16, 2 heads) with random weights, split into its
    parameter slots and values, and the arrays x {"batch", "seq", "embedding"} it reads."""
    config = M.make_config("tiny", d_model=16, n_heads=2, causal=causal, arch=arch)
    layer = M.build_attention("attn", jax.random.key(0), config)
    unbound, params = ckpt.split_params(layer)
    keys = jax.random.split(jax.random.key(1), len(params))
    params = {
        k: pz.nx.wrap(0.3 * jax.random.normal(r, v.data_array.shape)).tag(*v.named_shape)
        for r, (k, v) in zip(keys, sorted(params.items()), strict=True)
    }
    x = jax.random.normal(jax.random.key(2), (3, 24, 16))
    return unbound, params, x


def _run(unbound, params, x):
    side = {"token_positions": L.static_positions(x.shape[1])}
    out = ckpt.bind_params(unbound, params)(pz.nx.wrap(x).tag("batch", "seq", "embedding"), **side)
    return out.unwrap("batch", "seq", "embedding")


@pytest.mark.parametrize("arch", ["standard", "modula"])  # scores 1/sqrt(d_head) and 1/d_head
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["xla", "chunked"])
def test_dot_product_attention_equals_penzai_attention(kernel, causal, arch):
    """The fused layer (each kernel that runs on CPU) against pz.nn.Attention built from the
    same layers: values, and gradients wrt the input and every parameter."""
    unbound, params, x = _attention(causal, arch)
    assert isinstance(unbound, L.DotProductAttention) and unbound.causal is causal
    assert unbound.implementation == "auto"
    unbound = dataclasses.replace(unbound, implementation=kernel)
    assert unbound.scale == (1 / 8 if arch == "modula" else 8**-0.5)  # d_head = 8
    reference = unbound.as_penzai()
    run = lambda layer: jax.jit(lambda p, x: _run(layer, p, x))
    np.testing.assert_allclose(
        run(unbound)(params, x), run(reference)(params, x), rtol=1e-5, atol=1e-5
    )
    loss = lambda layer: lambda p, x: jnp.sum(jnp.sin(_run(layer, p, x)))
    grad = lambda layer: jax.jit(jax.grad(loss(layer), argnums=(0, 1)))(params, x)
    ours, ref = grad(unbound), grad(reference)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if causal:  # position 5's output does not depend on later inputs
        jac = jax.jit(jax.jacobian(lambda x: _run(unbound, params, x)[0, 5]))(x)
        assert np.abs(jac[:, :, 6:]).max() == 0 and np.abs(jac[:, 0, :6]).max() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_tpu_kernel_equals_xla_in_interpret_mode(causal):
    """The TPU flash-attention kernel itself, run by Pallas' TPU interpreter on CPU, against
    the XLA kernel: values and gradients (seq 128, its block size)."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 128, 2, 8))
    run = lambda name: (
        lambda q, k, v: L.ATTENTION_KERNELS[name][0](q, k, v, scale=0.3, causal=causal)
    )
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    both = lambda name: jax.jit(jax.value_and_grad(loss(run(name)), argnums=(0, 1, 2)))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        got = both("pallas")
    want = both("xla")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 128"):
        run("pallas")(q[:, :96], k[:, :96], v[:, :96])


def test_pick_attention_per_platform_and_its_messages():
    pick = lambda name, platform, dtype=jnp.bfloat16, seq_len=256: L.pick_attention(
        name, platform=platform, dtype=dtype, seq_len=seq_len
    )
    assert pick("auto", "gpu") == pick("auto", "cuda") == "cudnn"
    assert pick("auto", "gpu", jnp.float32) == "xla"  # cuDNN's flash kernel is (b)f16 only
    assert pick("chunked", "gpu") == "chunked"  # runs anywhere (sequential: made for CPUs)
    assert pick("auto", "tpu") == "pallas" and pick("auto", "tpu", seq_len=100) == "xla"
    assert pick("auto", "cpu") == "xla" and pick("xla", "tpu") == "xla"
    assert pick("cudnn", "gpu") == "cudnn" and pick("pallas", "tpu") == "pallas"
    with pytest.raises(ValueError, match="'cudnn' runs on .*'cpu'.*auto"):
        pick("cudnn", "cpu")
    with pytest.raises(ValueError, match="'pallas' runs on"):
        pick("pallas", "gpu")
    with pytest.raises(ValueError, match="'flash' is not one of"):
        pick("flash", "cpu")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        L.ATTENTION_KERNELS["cudnn"][0](*[jnp.ones((1, 8, 2, 8))] * 3, scale=1.0, causal=False)
