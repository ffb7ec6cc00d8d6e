"""The penzai DiT: shapes of every preset, init properties, variants, embedding, overfitting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import treescope
from penzai import pz

from jif import diffusion as D
from jif import model as M
from jif.layers import DotProductAttention, ScaledResidual, Unembed

MASK = 2049


def tokens(b=2, seq=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 2049, (b, seq)), jnp.int32)


@jax.jit
def _logits_frozen(frozen_model, x, r):
    return M.apply_logits(frozen_model, x, r)


def logits(model, x, r):
    """Jitted apply_logits on the model's current parameter values."""
    return _logits_frozen(pz.freeze_params(model), x, r)


def set_param(model, label, fn):
    """Replaces one parameter's value in place by fn(old NamedArray)."""
    _, params = pz.unbind_params(model)
    (p,) = [p for p in params if p.label == label]
    p.value = fn(p.value)


def randomize(model, label, scale=0.5, seed=1):
    set_param(
        model,
        label,
        lambda v: (
            v
            + scale
            * pz.nx.wrap(jax.random.normal(jax.random.key(seed), v.data_array.shape)).tag(
                *v.named_shape
            )
        ),
    )


@pytest.mark.parametrize("preset", list(M.PRESETS))
@pytest.mark.parametrize("adaln", [False, True])
def test_preset_shapes(preset, adaln):
    cfg = M.make_config(preset, adaln=adaln)
    x = jax.ShapeDtypeStruct((3, 64), jnp.int32)
    r = jax.ShapeDtypeStruct((3,), jnp.float32)
    out = jax.eval_shape(
        lambda k, x, r: M.apply_logits(M.build_model(cfg, k), x, r), jax.random.key(0), x, r
    )
    assert out.shape == (3, 64, cfg.vocab_size) and out.dtype == jnp.float32
    _, values = jax.eval_shape(
        lambda k: pz.unbind_params(M.build_model(cfg, k), freeze=True), jax.random.key(0)
    )
    shapes = {v.label: v.value.named_shape for v in values}
    d, L = cfg.d_model, cfg.n_layers
    assert shapes["dit/embed"] == {"vocabulary": cfg.padded_vocab, "embedding": d}
    assert shapes["dit/blocks/attn/query"] == {
        "blocks": L,
        "embedding": d,
        "heads": cfg.n_heads,
        "projection": cfg.d_head,
    }
    assert shapes["dit/blocks/mlp/up"] == {"blocks": L, "embedding": d, "neurons": 4 * d}
    assert shapes["dit/out/unembed"] == {"embedding": d, "vocabulary": cfg.padded_vocab}
    assert ("dit/blocks/attn/gate" in shapes) == adaln
    assert cfg.padded_vocab % 128 == 0


def test_param_count_by_hand():
    cfg = M.make_config("tiny")
    d, L, Vp = cfg.d_model, cfg.n_layers, cfg.padded_vocab
    expected = 2 * Vp * d + d + L * (2 * d + 4 * d * d + 2 * 4 * d * d)
    assert M.count_params(M.build_model(cfg, jax.random.key(0))) == expected
    cfg = M.make_config("tiny", adaln=True)
    c = cfg.cond_dim
    expected += (256 * c + c + c * c + c) + (6 * L + 2) * c * d
    assert M.count_params(M.build_model(cfg, jax.random.key(0))) == expected


VARIANTS = {
    "standard": {},
    "modula": {"arch": "modula"},
    "adaln": {"adaln": True},
    "mup": {"mup_base_width": 16},
    "modula_adaln": {"arch": "modula", "adaln": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fan_in_axes_table_describes_the_layers(variant):
    """fan_in_axes(label) is the input side of the layer that holds each parameter."""
    cfg = M.make_config("tiny", **VARIANTS[variant])
    model = jax.eval_shape(lambda k: pz.freeze_params(M.build_model(cfg, k)), jax.random.key(0))
    layers = pz.select(model).at_instances_of(pz.nn.Linear | Unembed | pz.nn.AddBias)
    from_layers = {model.embed.table.label: ("vocabulary",)}  # a lookup: one-hot input axis
    for layer in layers.get_sequence():
        if isinstance(layer, pz.nn.AddBias):
            from_layers[layer.bias.label] = ()
        elif isinstance(layer, Unembed):
            from_layers[layer.weights.label] = ("embedding",)
        else:
            from_layers[layer.weights.label] = tuple(layer.in_axis_names)
    values = pz.select(model).at_instances_of(pz.ParameterValue).get_sequence()
    assert set(from_layers) == {v.label for v in values}
    for label, axes in from_layers.items():
        assert M.fan_in_axes(label) == axes, label
    with pytest.raises(ValueError, match="dit/unknown"):
        M.fan_in_axes("dit/unknown")


def test_output_layer_zero_at_init_and_adaln():
    x = tokens()
    for adaln in [False, True]:
        m = M.build_model(M.make_config("tiny", adaln=adaln), jax.random.key(0))
        out = logits(m, x, jnp.array([0.2, 0.8]))
        assert np.all(np.asarray(out) == 0.0)
        randomize(m, "dit/out/unembed")
        a = logits(m, x, jnp.array([0.2, 0.8]))
        b = logits(m, x, jnp.array([0.9, 0.1]))
        # zero-initialised modulation: the noise level does not matter yet
        np.testing.assert_allclose(a, b, atol=1e-6)
        randomize(m, "dit/out/shift" if adaln else "dit/out/norm")
        a = logits(m, x, jnp.array([0.2, 0.8]))
        b = logits(m, x, jnp.array([0.9, 0.1]))
        assert np.isfinite(np.asarray(a)).all()
        assert (np.abs(np.asarray(a - b)).max() > 1e-3) == adaln


@pytest.mark.parametrize("kind", ["adaln", "mup"])
def test_features_then_readout_is_the_model(kind):
    """model = readout . features, the readout position by position (any subset of rows)."""
    cfg = dict(adaln=True) if kind == "adaln" else dict(arch="modula", mup_base_width=8)
    m = M.build_model(M.make_config("tiny", **cfg), jax.random.key(0))
    for label in ("dit/out/unembed", "dit/out/shift" if kind == "adaln" else "dit/out/norm"):
        randomize(m, label)
    x, r = tokens(), jnp.array([0.2, 0.8])
    h = M.apply_features(m, x, r)
    assert h.shape == (2, 16, m.config.d_model)
    whole = np.asarray(logits(m, x, r))
    rows = np.array([5, 0, 31, 17])
    some = M.apply_readout(m, h.reshape(32, -1)[rows])
    np.testing.assert_allclose(some, whole.reshape(32, -1)[rows], rtol=1e-5, atol=1e-6)
    assert np.abs(whole).max() > 1e-3


def test_adaln_requires_mask_rate():
    m = M.build_model(M.make_config("tiny", adaln=True), jax.random.key(0))
    with pytest.raises(ValueError, match="mask_rate"):
        m(pz.nx.wrap(tokens()).tag("batch", "seq"))


def test_bidirectional_and_permutation_sensitive():
    """Changing the last token changes the first position's logits (no causal mask), and RoPE
    makes the model depend on token order."""
    m = M.build_model(M.make_config("tiny"), jax.random.key(0))
    randomize(m, "dit/out/unembed")
    x = tokens(1, 16)
    base = logits(m, x, jnp.zeros(1))
    changed = logits(m, x.at[0, -1].set(5), jnp.zeros(1))
    assert np.abs(np.asarray(base - changed)[0, 0]).max() > 1e-4
    swapped = logits(m, x.at[0, 3].set(x[0, 9]).at[0, 9].set(x[0, 3]), jnp.zeros(1))
    assert np.abs(np.asarray(base - swapped)[0, 0]).max() > 1e-4


def test_denoise_fn_uses_mask_fraction():
    m = M.build_model(M.make_config("tiny", adaln=True), jax.random.key(0))
    randomize(m, "dit/out/unembed")
    randomize(m, "dit/out/scale")
    x = tokens().at[0, :4].set(MASK)
    got = M.make_denoise_fn(m, mask_id=MASK)(x)
    want = logits(m, x, jnp.array([4 / 16, 0.0]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_single_index_embedding_equals_naive_lookup():
    m = M.build_model(M.make_config("tiny"), jax.random.key(0))
    x = tokens(3, 7)
    named = pz.nx.wrap(x).tag("batch", "seq")
    table = m.embed.table.value
    naive = pz.nn.EmbeddingLookup(
        pz.nn.EmbeddingTable(embeddings=m.embed.table, vocabulary_axis="vocabulary")
    )
    ours = m.embed(named).unwrap("batch", "seq", "embedding")
    ref = naive(named).unwrap("batch", "seq", "embedding")
    onehot = jax.nn.one_hot(x, table.named_shape["vocabulary"]) @ table.unwrap(
        "vocabulary", "embedding"
    )
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, onehot, rtol=1e-6)
    # same gradient wrt the table as the vmapped lookup
    w = table.unwrap("vocabulary", "embedding")

    def via(layer_cls, w):
        p = pz.nx.wrap(w).tag("vocabulary", "embedding")
        if layer_cls is M.Embed:
            layer = M.Embed(table=pz.ParameterValue(value=p, label="t"))
        else:
            layer = pz.nn.EmbeddingLookup(
                pz.nn.EmbeddingTable(
                    embeddings=pz.ParameterValue(value=p, label="t"), vocabulary_axis="vocabulary"
                )
            )
        return jnp.sum(jnp.sin(layer(named).unwrap("batch", "seq", "embedding")))

    np.testing.assert_allclose(
        jax.grad(lambda w: via(M.Embed, w))(w), jax.grad(lambda w: via(None, w))(w), rtol=1e-6
    )


def test_modula_arch_builds_runs_and_is_well_normed():
    cfg = M.make_config("tiny", arch="modula", adaln=True)
    m = M.build_model(cfg, jax.random.key(0))
    randomize(m, "dit/out/unembed")
    out = logits(m, tokens(), jnp.array([0.3, 0.6]))
    assert out.shape == (2, 16, 2050) and np.isfinite(np.asarray(out)).all()
    p = M.params_dict(m)
    q = p["dit/blocks/attn/query"].unwrap("blocks", "embedding", "heads", "projection")[0]
    s = np.linalg.svd(np.asarray(q).reshape(cfg.d_model, -1), compute_uv=False)
    np.testing.assert_allclose(s, 1.0, rtol=1e-5)  # fan_in == fan_out: orthogonal
    up = p["dit/blocks/mlp/up"].unwrap("blocks", "embedding", "neurons")[1]
    s = np.linalg.svd(np.asarray(up), compute_uv=False)  # RMS->RMS norm 1: sigma = sqrt(4)
    np.testing.assert_allclose(s, 2.0, rtol=1e-5)
    emb = np.asarray(p["dit/embed"].unwrap("vocabulary", "embedding"))
    np.testing.assert_allclose(np.sqrt((emb**2).mean(-1)), 1.0, rtol=1e-5)
    residuals = pz.select(m).at_instances_of(ScaledResidual).get_sequence()
    assert len(residuals) == 2 and all(r.alpha == 1 / (2 * cfg.n_layers) for r in residuals)
    gelu = M.ARCHS["modula"].gelu  # 1-Lipschitz: its slope at the steepest point is <= 1
    x = jnp.linspace(1.35, 1.5, 15_001)
    assert float(jnp.max(jax.vmap(jax.grad(gelu))(x))) <= 1.0


def test_mup_output_multiplier():
    base = M.build_model(M.make_config("tiny", arch="modula"), jax.random.key(0))
    mup = M.build_model(M.make_config("tiny", arch="modula", mup_base_width=8), jax.random.key(0))
    for m in (base, mup):
        randomize(m, "dit/out/unembed")
    x = tokens()
    a = logits(base, x, jnp.zeros(2))
    b = logits(mup, x, jnp.zeros(2))
    np.testing.assert_allclose(b, a * 8 / 32, rtol=1e-5, atol=1e-6)


def test_bfloat16():
    m = M.build_model(M.make_config("tiny", dtype="bfloat16", adaln=True), jax.random.key(0))
    assert all(v.dtype == jnp.bfloat16 for v in M.params_dict(m).values())
    randomize(m, "dit/out/unembed")
    out = logits(m, tokens(), jnp.array([0.3, 0.6]))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_bad_config_messages():
    with pytest.raises(ValueError, match="n_heads"):
        M.make_config("tiny", n_heads=3)
    with pytest.raises(ValueError, match="arch"):
        M.make_config("tiny", arch="nope")
    with pytest.raises(ValueError, match="preset"):
        M.make_config("huge")
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        M.make_config("tiny", attention="flash")


def test_show_model_renders():
    model = M.build_model(M.make_config("tiny"), jax.random.key(0))
    html = M.show_model(model)
    assert "treescope" in html and len(html) > 1000
    assert "dit/blocks/attn/query" in treescope.render_to_text(model)


@pytest.mark.parametrize("adaln", [False, True])
def test_tiny_model_overfits_one_batch(adaln):
    """300 AdamW steps on one batch of 4 random sequences. With adaLN every block starts
    gated shut (zero modulation, as SEDD), so it learns more slowly."""
    cfg = M.make_config("tiny", adaln=adaln, vocab_size=64)
    model = M.build_model(cfg, jax.random.key(0))
    unbound, params = pz.unbind_params(model, freeze=True)
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 62, (4, 16)), jnp.int32)
    opt = optax.adamw(5e-3 if adaln else 1e-2)

    def loss_fn(p, key):
        m = pz.bind_variables(unbound, p)
        k1, k2 = jax.random.split(key)
        t = D.sample_t(k1, 16)
        return D.mdlm_loss(lambda xt, r: logits(m, xt, r), jnp.tile(x0, (4, 1)), t, k2, mask_id=63)[
            0
        ]

    @jax.jit
    def step(p, s, key):
        loss, g = jax.value_and_grad(loss_fn)(p, key)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = opt.init(params)
    losses = []
    for i in range(300):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    uniform = (1 - D.EPS) * math.log(63)  # zero output layer: uniform over the real tokens
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    assert 0.7 * uniform < first < 1.3 * uniform and last < (0.55 if adaln else 0.3) * uniform, (
        first,
        last,
    )


# ----------------------------------------------------------------------------- causal option


@pytest.mark.parametrize("variant", ["standard", "adaln", "modula"])
def test_causal_position_independent_of_later_tokens(variant):
    """With causal=True a later token leaves every earlier position's logits exactly as they
    were and changes its own and later ones."""
    m = M.build_model(M.make_config("tiny", causal=True, **VARIANTS[variant]), jax.random.key(0))
    for label in (
        "dit/out/unembed",
        "dit/blocks/attn/value",
        "dit/out/scale" * (variant == "adaln"),
    ):
        if label:
            randomize(m, label)
    x, r = tokens(2, 16), jnp.array([0.3, 0.7])
    base = np.asarray(logits(m, x, r))
    for i in (1, 9, 15):
        changed = np.asarray(logits(m, x.at[:, i].set((x[:, i] + 7) % 2049), r))
        np.testing.assert_array_equal(changed[:, :i], base[:, :i])
        assert np.abs(changed[:, i:] - base[:, i:]).max() > 1e-4


def test_causal_equals_the_bidirectional_model_on_each_prefix():
    """Position i of a one-block causal model attends to exactly tokens 0..i: its logits
    equal those of the bidirectional model (same weights) run on the prefix x[:, :i + 1]
    alone. (With more blocks they differ: there the prefix's earlier positions have seen
    the prefix's later tokens.)"""
    causal = M.build_model(M.make_config("tiny", causal=True, n_layers=1), jax.random.key(0))
    bidir = M.build_model(M.make_config("tiny", n_layers=1), jax.random.key(0))
    for m in (causal, bidir):
        randomize(m, "dit/out/unembed")
        randomize(m, "dit/blocks/attn/key", seed=2)
    x, r = tokens(2, 12), jnp.zeros(2)
    got = np.asarray(logits(causal, x, r))
    for i in range(12):
        want = np.asarray(logits(bidir, x[:, : i + 1], r))[:, i]
        np.testing.assert_allclose(got[:, i], want, rtol=1e-5, atol=1e-5)


def test_causal_option_changes_only_the_attention_flag():
    """causal=False (the default) builds bidirectional attention and causal=True the same
    layers and parameters with the kernel's causal flag (penzai's mask in its reference)."""
    cfg = M.make_config("tiny")
    assert cfg.causal is False and cfg.attention == "auto"
    plain = M.build_model(cfg, jax.random.key(0))
    causal = M.build_model(M.make_config("tiny", causal=True), jax.random.key(0))
    attn = [
        pz.select(m).at_instances_of(DotProductAttention).get_sequence() for m in (plain, causal)
    ]
    assert [len(a) for a in attn] == [1, 1]  # one layer inside the stacked blocks
    assert (attn[0][0].causal, attn[1][0].causal) == (False, True)
    ref = [a[0].as_penzai().query_key_to_attn.sublayers for a in attn]
    assert [type(la).__name__ for la in ref[0]] == ["NamedEinsum", "SoftmaxF32"]
    assert type(ref[1][1]) is pz.nn.ApplyCausalAttentionMask
    a, b = M.params_dict(plain), M.params_dict(causal)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].data_array, b[k].data_array)


def test_attention_and_dtype_choices():
    """attention="auto" resolves per platform when traced (XLA on CPU); dtype="auto" is
    float32 on CPU and bfloat16 on accelerators; a forced kernel this platform lacks fails
    with a message when the model first runs."""
    assert M.make_config("tiny", dtype="auto").dtype == "float32"  # this test runs on CPU
    assert M.default_dtype("gpu") == M.default_dtype("tpu") == "bfloat16"
    x, r = tokens(2, 16), jnp.array([0.3, 0.6])
    base = logits(M.build_model(M.make_config("tiny"), jax.random.key(0)), x, r)
    forced = M.build_model(M.make_config("tiny", attention="xla"), jax.random.key(0))
    np.testing.assert_allclose(logits(forced, x, r), base, rtol=1e-5, atol=1e-6)
    cudnn = M.build_model(M.make_config("tiny", attention="cudnn"), jax.random.key(0))
    with pytest.raises(ValueError, match="attention='cudnn' runs on"):
        logits(cudnn, x, r)
