"""jif.well_normed: the DiT's modular structure by label, dual norms, measured bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from penzai import pz

import modula
from jif import model as M
from jif import well_normed
from modula.core import reduce_max

# vocab_size 256 = a multiple of vocab_multiple: no padded rows, so the RMS over the returned
# logits is the RMS over the whole output layer.
CFG = M.make_config("tiny", arch="modula", vocab_size=256)


def _scalar(x) -> float:
    return float(reduce_max(x).unwrap())


def _random_like(key, weights):
    keys = jax.random.split(key, len(weights))
    return {
        k: pz.nx.nmap(lambda a, kk=kk: jax.random.normal(kk, a.shape))(w)
        for kk, (k, w) in zip(keys, weights.items(), strict=True)
    }


@pytest.fixture(scope="module")
def dit():
    model = M.build_model(CFG, jax.random.key(0))
    params = M.params_dict(model)
    module = well_normed.dit_module(CFG, params)
    # the output layer is zero at init (logits 0); give it an orthogonal matrix (a random one
    # projected: projecting the zero matrix leaves it zero) so that every weight moves the
    # output to first order
    projected = module.project(_random_like(jax.random.key(5), params))
    params["dit/out/unembed"] = projected["dit/out/unembed"]
    assert float(jnp.abs(params["dit/out/unembed"].data_array).min()) > 0
    return model, params, module


def _bind(model, params):
    """The model with its parameters replaced by ``params`` (by label)."""
    unbound, _ = pz.unbind_params(model, freeze=True)
    return pz.bind_variables(
        unbound, [pz.ParameterValue(label=k, value=v) for k, v in params.items()]
    )


def test_structure_masses_and_sensitivity(dit):
    _, params, module = dit
    assert sorted(module.labels) == sorted(params)
    # embedding 1 + blocks 5 + (unembed 1 + output gain 0.1)
    assert module.mass == pytest.approx(7.1)
    # each block: attention branch (1 - 1/R) + 3/R (q, k, v in a tuple), MLP branch 1; R = 4
    assert module.sensitivity == pytest.approx((1 - 1 / 4 + 3 / 4) ** CFG.n_layers)


def test_dual_has_target_modular_norm(dit):
    _, params, module = dit
    g = _random_like(jax.random.key(1), params)
    d = jax.jit(lambda g: module.dualize(g, 0.3))(g)
    assert _scalar(module.norm(d)) == pytest.approx(0.3, rel=2e-3)
    atoms = {a.name: a for a in module.atoms()}
    # output layer: target 0.3 * mass 1 / 7.1; embedding: also / downstream sensitivity 2.25
    assert _scalar(atoms["dit/out/unembed"].norm(d)) == pytest.approx(0.3 / 7.1, rel=2e-3)
    assert _scalar(atoms["dit/embed"].norm(d)) == pytest.approx(0.3 / 7.1 / 2.25, rel=2e-3)


def test_adaln_variant_is_covered():
    cfg = M.make_config("tiny", arch="modula", adaln=True, vocab_size=256)
    params = M.params_dict(M.build_model(cfg, jax.random.key(0)))
    module = well_normed.dit_module(cfg, params)
    assert sorted(module.labels) == sorted(params)
    d = jax.jit(lambda g: module.dualize(g, 0.1))(_random_like(jax.random.key(2), params))
    assert _scalar(jax.jit(module.norm)(d)) == pytest.approx(0.1, rel=2e-3)


def _logits(model, params, tokens):
    return M.apply_logits(_bind(model, params), tokens, jnp.zeros(tokens.shape[0]))


def test_whole_dit_weight_perturbation_bound(dit):
    """RMS(logit change) <= modular norm of the weight change, at initialisation."""
    model, params, module = dit
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, CFG.vocab_size)
    logits = jax.jit(lambda p: _logits(model, p, tokens))
    norm, dualize = jax.jit(module.norm), jax.jit(lambda g: module.dualize(g, 1.0))
    base, eps = logits(params), 1e-3
    for i in range(2):
        g = _random_like(jax.random.key(10 + i), params)
        for dw in (g, dualize(g)):  # a random and the steepest direction
            scale = eps / _scalar(norm(dw))
            moved = {k: params[k] + scale * dw[k] for k in params}
            change = float(jnp.sqrt(jnp.mean((logits(moved) - base) ** 2)))
            assert change <= eps * 1.01


def test_blocks_input_sensitivity(dit):
    """The stacked blocks change the residual stream by at most the declared sensitivity."""
    model, params, module = dit
    bound = _bind(model, params)
    x = jax.random.normal(jax.random.key(4), (2, 32, CFG.d_model))
    x = x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True))
    blocks = jax.jit(
        lambda a: bound.blocks(
            pz.nx.wrap(a).tag("batch", "seq", "embedding"),
            token_positions=pz.nx.arange("seq", 32),
        ).unwrap("batch", "seq", "embedding")
    )
    dx = 1e-3 * jax.random.normal(jax.random.key(5), x.shape)
    ratio = float(jnp.sqrt(jnp.mean((blocks(x + dx) - blocks(x)) ** 2) / jnp.mean(dx**2)))
    assert 0 < ratio <= (1 - 1 / 4 + 3 / 4) ** CFG.n_layers  # declared, as above


def test_optimizer_trains_the_dit(dit):
    """A few modula steps fit a fixed batch (token reconstruction cross-entropy)."""
    model, params, module = dit
    tokens = jax.random.randint(jax.random.key(6), (4, 16), 0, CFG.vocab_size)

    def loss(p):
        logp = jax.nn.log_softmax(_logits(model, p, tokens))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))

    opt = modula.optimizer(0.5, module=module)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    p, s = params, opt.init(params)
    losses = [float(step(p, s)[2])]
    for _ in range(15):
        p, s, value = step(p, s)
        losses.append(float(value))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_adaln_modulations_of_every_block_get_equal_shares():
    """The blocks' shift/scale/gate matrices read the condition side by side, so the same
    gradient in every block must give the same step in every block (a sequential split
    would give block 0 a share 6**5 times smaller than block 5's at 6 layers)."""
    cfg = M.make_config("tiny", arch="modula", adaln=True, n_layers=6, vocab_size=256)
    params = M.params_dict(M.build_model(cfg, jax.random.key(0)))
    module = well_normed.dit_module(cfg, params)

    def same_in_every_block(label, x):
        names = list(x.named_shape)
        g = jnp.cos(3.0 * x.unwrap(*names) + 0.5)
        if "blocks" in names:
            first = jnp.take(g, jnp.array([0]), axis=names.index("blocks"))
            g = jnp.broadcast_to(first, g.shape)
        return pz.nx.wrap(g).tag(*names)

    grads = {k: same_in_every_block(k, v) for k, v in params.items()}
    update = jax.jit(lambda g: module.dualize(g, 1.0))(grads)  # one compile, not op by op
    for label in [
        f"dit/blocks/{b}/{n}" for b in ("attn", "mlp") for n in ("shift", "scale", "gate")
    ]:
        per_block = np.abs(np.asarray(update[label].unwrap("blocks", "cond", "embedding")))
        norms = per_block.reshape(6, -1).sum(axis=1)
        np.testing.assert_allclose(norms, norms[0], rtol=1e-4, err_msg=label)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_learning_rate_is_the_modular_norm_of_the_dualised_step(weight_decay):
    cfg = M.make_config("tiny", arch="modula", vocab_size=256)
    params = M.params_dict(M.build_model(cfg, jax.random.key(0)))
    module = well_normed.dit_module(cfg, params)
    grads = jax.tree.map(lambda x: jnp.cos(3.0 * x + 0.5), params)
    lr = 0.05
    tx = modula.optimizer(lr, module=module, momentum=0.0, weight_decay=weight_decay)
    update, _ = tx.update(grads, tx.init(params), params)
    dual = jax.tree.map(lambda u, w: u + lr * weight_decay * w, update, params)
    assert float(module.norm(dual).data_array) == pytest.approx(lr, rel=1e-4)
    if weight_decay:  # the decay is a separate shrink: the whole step is larger
        assert float(module.norm(update).data_array) > 2 * lr


def test_reference_attention_gain_scales_the_output_and_the_qkv_share(dit):
    """arch="modula_ref" is modula with attention's output times 1/3, as the reference
    library's GPT: its logits equal modula's with the attention output matrix divided by 3,
    and the same gradient gives query, key and value 3 times the step of the output matrix
    that they get under modula (their downstream sensitivity is 1/3 of it)."""
    model, params, module = dit
    ref_cfg = M.make_config("tiny", arch="modula_ref", vocab_size=256)
    ref_model = M.build_model(ref_cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, CFG.vocab_size)
    out = "dit/blocks/attn/output"
    divided = {**params, out: params[out] / 3.0}
    np.testing.assert_allclose(
        _logits(ref_model, params, tokens), _logits(model, divided, tokens), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(_logits(ref_model, params, tokens), _logits(model, params, tokens))

    ref_module = well_normed.dit_module(ref_cfg, params)
    g = _random_like(jax.random.key(4), params)
    size = lambda d, label: float(jnp.sqrt(jnp.sum(d[label].data_array ** 2)))
    ratio = {}
    for name, m in (("modula", module), ("modula_ref", ref_module)):
        d = jax.jit(lambda g, m=m: m.dualize(g, 1.0))(g)
        ratio[name] = {
            n: size(d, f"dit/blocks/attn/{n}") / size(d, out) for n in ("query", "key", "value")
        }
    for n in ("query", "key", "value"):
        assert ratio["modula_ref"][n] == pytest.approx(3 * ratio["modula"][n], rel=1e-3), n


def test_optimizer_flags_reach_the_momentum_and_the_blocks_mass():
    """--momentum and --blocks-mass: the second step equals the dual of the momentum-weighted
    gradients under the module with that blocks mass (dualisation ignores scale), and
    differs from the default mass's."""
    from jif import optim

    cfg = M.make_config("tiny", arch="modula", vocab_size=256)
    params = M.params_dict(M.build_model(cfg, jax.random.key(0)))
    g1 = jax.tree.map(lambda x: jnp.cos(3.0 * x + 0.5), params)
    g2 = jax.tree.map(lambda x: jnp.sin(2.0 * x - 0.3), params)
    lr, beta, mass = 0.05, 0.6, 2.0
    ocfg = optim.OptimConfig(optimizer="modula", lr=lr, clip=0.0, momentum=beta, blocks_mass=mass)
    tx = optim.OPTIMIZERS["modula"](ocfg.validate(), optax.constant_schedule(lr), cfg, params)
    state = tx.init(params)
    _, state = tx.update(g1, state, params)
    update, _ = tx.update(g2, state, params)
    mixed = jax.tree.map(lambda a, b: beta * a + b, g1, g2)
    for blocks_mass, same in ((mass, True), (well_normed.BLOCKS_MASS, False)):
        module = well_normed.dit_module(cfg, params, blocks_mass=blocks_mass)
        want = module.dualize(mixed, lr)
        label = "dit/blocks/mlp/up"
        got, ref = (np.asarray(-update[label].data_array), np.asarray(want[label].data_array))
        assert np.allclose(got, ref, rtol=1e-3, atol=1e-6) == same, blocks_mass


def test_modula_only_flags_are_refused_with_other_optimizers():
    from jif import optim

    with pytest.raises(ValueError, match="--momentum is the modula optimizer's"):
        optim.OptimConfig(optimizer="adamw", momentum=0.9).validate()
    with pytest.raises(ValueError, match="--blocks-mass must be in"):
        optim.OptimConfig(optimizer="modula", blocks_mass=0.0).validate()
