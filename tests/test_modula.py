"""modula: Newton-Schulz vs SVD, dual norms, composition rules and measured bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import _muon
from penzai import pz

import modula
from modula.core import reduce_max

D, H = 16, 24  # small widths: every test runs in seconds on CPU


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def _named(key, shape: dict, scale=1.0):
    return pz.nx.wrap(scale * jax.random.normal(key, tuple(shape.values()))).tag(*shape)


def _scalar(norm) -> float:
    return float(reduce_max(norm).unwrap())


def _random_like(key, weights):
    keys = jax.random.split(key, len(weights))
    return {
        k: pz.nx.nmap(lambda a, kk=kk: jax.random.normal(kk, a.shape))(w)
        for kk, (k, w) in zip(keys, weights.items(), strict=True)
    }


def _add(w, d):
    return {k: w[k] + d[k] for k in w}


# ----------------------------------------------------------------------------- Newton-Schulz


def _matrix_with_spectrum(key, m, n, s):
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, len(s))))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, len(s))))
    return (u * s) @ v.T, u, v


def test_newton_schulz_matches_polar_factor_through_its_scalar_map():
    """NS(X) = U f(S/||X||_F) V^T with f the iterated quintic: compare with the SVD."""
    s = jnp.geomspace(1.0, 0.05, 12)
    x, u, v = _matrix_with_spectrum(jax.random.key(0), 20, 32, s)
    coeffs = np.array([_muon._DEFAULT_NS_COEFFS] * 5, np.float32)
    out = modula.orthogonalize(x, coeffs)
    core = u.T @ out @ v  # should be diagonal: NS acts on singular values only
    y = np.asarray(s / jnp.linalg.norm(x))
    a, b, c = _muon._DEFAULT_NS_COEFFS
    for _ in range(5):
        y = a * y + b * y**3 + c * y**5
    np.testing.assert_allclose(np.diag(core), y, atol=2e-3)
    assert float(jnp.abs(core - jnp.diag(jnp.diag(core))).max()) < 2e-3
    # the band the quintic coefficients promise for s/||X||_F >= 3e-3: about [0.68, 1.2]
    sv = jnp.linalg.svd(out, compute_uv=False)[:12]
    assert 0.68 <= float(sv.min()) and float(sv.max()) <= 1.21


def test_default_coefficients_give_the_polar_factor():
    x, u, v = _matrix_with_spectrum(jax.random.key(1), 24, 40, jnp.geomspace(3.0, 0.1, 24))
    out = modula.orthogonalize(x)
    sv = jnp.linalg.svd(out, compute_uv=False)
    assert 0.995 <= float(sv.min()) and float(sv.max()) <= 1.0005
    np.testing.assert_allclose(out, u @ v.T, atol=5e-3)


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_max_slope(approximate):
    """GELU_MAX_SLOPE is the largest slope of GELU (exact or tanh form) rounded up: dividing
    by it gives a 1-Lipschitz function that still reaches slope 1 - 1e-4."""
    x = jnp.linspace(-6, 6, 1_200_001)
    slope = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=approximate)))(x)
    assert float(slope.max()) <= modula.GELU_MAX_SLOPE < float(slope.max()) + 1e-4
    peak = math.sqrt(2) if not approximate else 1.4185  # exact: (2 - x^2) phi(x) = 0
    assert abs(float(x[jnp.argmax(slope)]) - peak) < 1e-3


# ----------------------------------------------------------------------------- atoms


def test_linear_norm_and_dual_against_svd():
    lin = modula.Linear("w", {"embedding": D}, {"heads": 2, "projection": 12})
    g = {
        "w": _named(jax.random.key(2), {"blocks": 3, "embedding": D, "heads": 2, "projection": 12})
    }
    per_copy = g["w"].unwrap("blocks", "embedding", "heads", "projection").reshape(3, D, 24)
    svd_norm = [float(jnp.linalg.norm(m, 2)) * math.sqrt(D / 24) for m in per_copy]
    np.testing.assert_allclose(lin.norm(g).unwrap("blocks"), svd_norm, rtol=1e-5)
    dual = lin.dualize(g, 0.37)["w"].unwrap("blocks", "embedding", "heads", "projection")
    for m in dual.reshape(3, D, 24):
        sv = jnp.linalg.svd(m, compute_uv=False) * math.sqrt(D / 24)
        np.testing.assert_allclose(sv, 0.37, rtol=5e-3)  # every direction at the target


def test_atom_duals_have_target_norm():
    key = jax.random.key(3)
    atoms = [
        modula.Embedding("e", ("vocabulary", 11), {"embedding": D}),
        modula.Gain("g", {"embedding": D}),
        modula.Bias("b", {"embedding": D}),
    ]
    for atom in atoms:
        w = atom.initialize(key)
        g = _random_like(key, w)
        assert abs(_scalar(atom.norm(atom.dualize(g, 0.2))) - 0.2) < 1e-5, atom
    e = atoms[0].dualize({"e": _named(key, {"vocabulary": 11, "embedding": D})}, 0.2)["e"]
    np.testing.assert_allclose(
        jnp.sqrt(jnp.mean(e.unwrap("vocabulary", "embedding") ** 2, 1)), 0.2, rtol=1e-5
    )


# ----------------------------------------------------------------------------- composition


def _lin(name, mass=1.0, d_in=D, d_out=D):
    return modula.Linear(name, {"embedding": d_in}, {"out": d_out} if d_out else {}, mass=mass)


def test_masses_and_sensitivities_by_hand():
    a, b, c = _lin("a", 1.0), _lin("b", 2.0), _lin("c", 3.0)
    seq = b @ (0.5 * a)
    assert (seq.mass, seq.sensitivity) == (3.0, 0.5)
    tup = modula.Tuple(a, b, c)
    assert (tup.mass, tup.sensitivity) == (6.0, 3.0)
    add = 2.0 * a + b
    assert (add.mass, add.sensitivity) == (3.0, 3.0)
    res = modula.residual(2.0 * c, 4)  # 3/4 + 2/4
    assert (res.mass, res.sensitivity) == (3.0, 1.25)
    rep = modula.Repeat(res, 3)
    assert (rep.mass, rep.sensitivity) == (9.0, 1.25**3)
    assert rep.tare(4.5).mass == 4.5 and c.mass == 1.5
    assert modula.GELU().mass == 0 and modula.GELU().sensitivity == 1


def test_sequential_norm_and_dual_targets_by_hand():
    """second @ 2 * first: norm = max(nu2 mu/mu1 ||w1||, mu/mu2 ||w2||), nu2 = 1 * ..."""
    first, second = _lin("first", 1.0), modula.Linear("second", {"out": D}, {"y": 8}, mass=3.0)
    m = second @ (2.0 * first)  # mass 4; first's downstream sensitivity 1
    w = {
        "first": _named(jax.random.key(4), {"embedding": D, "out": D}),
        "second": _named(jax.random.key(5), {"out": D, "y": 8}),
    }
    n1, n2 = _scalar(first.norm(w)), _scalar(second.norm(w))
    # the scaled atom 2 * first has norm 2 ||w1|| and mass 1
    assert abs(_scalar(m.norm(w)) - max(1 * 4 / 1 * 2 * n1, 4 / 3 * n2)) < 1e-4
    d = m.dualize(w, 0.8)
    assert abs(_scalar(first.norm(d)) - 0.8 * (1 / 4) / 2) < 1e-3
    assert abs(_scalar(second.norm(d)) - 0.8 * (3 / 4)) < 1e-3
    assert abs(_scalar(m.norm(d)) - 0.8) < 1e-3


def test_repeat_splits_targets_by_downstream_sensitivity():
    block = 2.0 * _lin("w")  # sensitivity 2: copy k has downstream sensitivity 2^(2-k)
    rep = modula.Repeat(block, 3)
    w = rep.initialize(jax.random.key(6))
    assert w["w"].named_shape == {"blocks": 3, "embedding": D, "out": D}
    d = rep.dualize(_random_like(jax.random.key(7), w), 1.0)
    per_copy = rep.children[0].children[0].norm(d).unwrap("blocks")  # the Linear's own norms
    # block target 1/(3 * 2^(2-k)); through the x2 the Linear gets half of it
    np.testing.assert_allclose(per_copy, [1 / 24, 1 / 12, 1 / 6], rtol=5e-3)
    assert abs(_scalar(rep.norm(d)) - 1.0) < 5e-3


# ----------------------------------------------------------------------------- measured bounds


def _block(d=D, heads=2, dh=8, depth=4):
    """A pre-norm transformer block built from modula modules (with its own forward)."""
    emb, hp = {"embedding": d}, {"heads": heads, "projection": dh}
    norm = lambda n: modula.Gain(n, emb) @ modula.RMSNorm("embedding")
    qkv = modula.Tuple(*(modula.Linear(n, emb, hp) for n in ("q", "k", "v")))
    attn = modula.Linear("o", hp, emb) @ modula.Attention() @ qkv @ norm("n1")
    mlp = modula.Linear("down", {"neurons": 4 * d}, emb) @ modula.GELU()
    mlp = mlp @ modula.Linear("up", emb, {"neurons": 4 * d}) @ norm("n2")
    return modula.residual(mlp, depth) @ modula.residual(attn, depth)


def _unit_rms_input(key, batch=3, seq=10, d=D):
    x = _named(key, {"batch": batch, "seq": seq, "embedding": d})
    return pz.nx.nmap(lambda v: v / jnp.sqrt(jnp.mean(v**2)))(x.untag("embedding")).tag("embedding")


def _out_rms(y):
    return _rms(y.unwrap(*sorted(y.named_shape)))


_JITTED = {}


def _jit(module, method):
    """One compiled function per (module, method): the bound checks reuse it."""
    key = (id(module), method)
    if key not in _JITTED:
        _JITTED[key] = (module, jax.jit(getattr(module, method)))
    return _JITTED[key][1]


def _ratio_input(module, w, x, key, eps=1e-3):
    """RMS(f(x + dx) - f(x)) / RMS(dx) for a random dx."""
    dx = _named(key, x.named_shape, eps)
    fwd = _jit(module, "forward")
    return _out_rms(fwd(w, x + dx) - fwd(w, x)) / _out_rms(dx)


def _weight_ratio(module, w, x, dw, eps=1e-3):
    """RMS(output change) / ||dw|| with dw scaled to modular norm eps."""
    scale = eps / _scalar(_jit(module, "norm")(dw))
    dw = {k: v * scale for k, v in dw.items()}
    fwd = _jit(module, "forward")
    return _out_rms(fwd(_add(w, dw), x) - fwd(w, x)) / eps


@pytest.mark.parametrize("name", ["linear", "gain", "bias", "block", "two_blocks"])
def test_measured_bounds_hold(name):
    key = jax.random.key(8)
    module = {
        "linear": modula.Linear("w", {"embedding": D}, {"out": H}),
        "gain": modula.Gain("g", {"embedding": D}),
        "bias": modula.Bias("b", {"embedding": D}),
        "block": _block(),
        "two_blocks": modula.Repeat(_block(), 2),
    }[name]
    w = module.initialize(key)
    x = _unit_rms_input(jax.random.key(9))
    dualize = jax.jit(lambda g: module.dualize(g, 1.0))
    for i in range(2):
        k = jax.random.key(10 + i)
        assert _ratio_input(module, w, x, k) <= module.sensitivity * 1.01
        g = _random_like(k, w)
        assert _weight_ratio(module, w, x, g) <= 1.01  # random direction
        assert _weight_ratio(module, w, x, dualize(g)) <= 1.01  # steepest one


def test_linear_bound_is_attained():
    """A rank-one change aligned with the input moves the output by exactly its norm."""
    lin = modula.Linear("w", {"embedding": D}, {"out": H})
    u = jax.random.normal(jax.random.key(11), (D,))
    x = pz.nx.wrap(u / jnp.sqrt(jnp.mean(u**2))).tag("embedding")
    dw = {"w": pz.nx.wrap(jnp.outer(u, jnp.ones(H))).tag("embedding", "out")}
    assert abs(_weight_ratio(lin, lin.initialize(jax.random.key(12)), x, dw) - 1.0) < 1e-3


@pytest.mark.parametrize("bond", ["gelu", "rmsnorm", "rope", "attention"])
def test_bond_sensitivity(bond):
    x = _unit_rms_input(jax.random.key(13), d=8)
    x = x.untag("embedding").tag("projection")
    for i in range(3):
        k1, k2, k3 = jax.random.split(jax.random.key(20 + i), 3)
        if bond == "attention":
            qkv = tuple(
                _unit_rms_input(k, d=8).untag("embedding").tag("projection") for k in (k1, k2, k3)
            )
            dqkv = tuple(_named(k, x.named_shape, 1e-3) for k in jax.random.split(k1, 3))
            out = modula.Attention()({}, tuple(a + b for a, b in zip(qkv, dqkv, strict=True)))
            change = _out_rms(out - modula.Attention()({}, qkv))
            assert change <= sum(_out_rms(d) for d in dqkv)
            continue
        b = {"gelu": modula.GELU(), "rmsnorm": modula.RMSNorm("projection"), "rope": modula.RoPE()}[
            bond
        ]
        fwd = (lambda v, b=b: b({}, (v, v))[0]) if bond == "rope" else (lambda v, b=b: b({}, v))
        dx = _named(k1, x.named_shape, 1e-3)
        ratio = _out_rms(fwd(x + dx) - fwd(x)) / _out_rms(dx)
        assert ratio <= b.sensitivity * 1.001
        if bond == "rope":  # a rotation: exactly norm preserving
            assert abs(ratio - 1) < 1e-3


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_step_has_modular_norm_lr_and_projects():
    module = modula.Repeat(_block(), 2)
    w = module.initialize(jax.random.key(30))
    g = _random_like(jax.random.key(31), w)
    sched = optax.linear_schedule(0.2, 0.1, 10)
    opt = modula.optimizer(sched, module=module, weight_decay=0.0)
    u, _ = jax.jit(opt.update)(g, opt.init(w), w)
    assert abs(_scalar(module.norm(u)) - 0.2) < 2e-3
    proj = modula.optimizer(0.5, module=module, project=True, weight_decay=0.1)
    u, _ = jax.jit(proj.update)(g, proj.init(w), w)
    new = _add(w, u)
    q = new["q"].unwrap("blocks", "embedding", "heads", "projection").reshape(2, D, 16)
    sv = jnp.linalg.svd(q, compute_uv=False)
    np.testing.assert_allclose(sv, 1.0, atol=5e-3)  # square: orthogonal, RMS->RMS norm 1
    assert float(jnp.abs(new["n1"].unwrap("blocks", "embedding")).max()) <= 1.0


def test_optimizer_rejects_mismatched_params_and_a_missing_module():
    opt = modula.optimizer(0.1, module=_lin("a"))
    with pytest.raises(ValueError, match="disagree"):
        opt.init({"b": pz.nx.zeros({"embedding": D})})
    with pytest.raises(TypeError, match="module"):
        modula.optimizer(0.1)
    with pytest.raises(TypeError, match="modula.Module"):
        modula.optimizer(0.1, module={"a": pz.nx.zeros({"embedding": D})})
