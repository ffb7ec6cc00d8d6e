"""jif.mup: muP roles and per-parameter Adam learning rates against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jif import model as M
from jif import mup

# Hand-derived table for d_model=64, mup_base_width=16 (m = 4): hidden matrices (fan-in and
# fan-out both grow with width) get lr / 4, everything else the base lr.
EXPECTED = {
    "dit/embed": ("embedding", 1.0),
    "dit/cond/in": ("input", 1.0),
    "dit/cond/in_bias": ("vector", 1.0),
    "dit/cond/out": ("input", 1.0),
    "dit/cond/out_bias": ("vector", 1.0),
    "dit/blocks/attn/norm": ("vector", 1.0),
    "dit/blocks/attn/shift": ("input", 1.0),
    "dit/blocks/attn/scale": ("input", 1.0),
    "dit/blocks/attn/gate": ("input", 1.0),
    "dit/blocks/attn/query": ("hidden", 0.25),
    "dit/blocks/attn/key": ("hidden", 0.25),
    "dit/blocks/attn/value": ("hidden", 0.25),
    "dit/blocks/attn/output": ("hidden", 0.25),
    "dit/blocks/mlp/norm": ("vector", 1.0),
    "dit/blocks/mlp/shift": ("input", 1.0),
    "dit/blocks/mlp/scale": ("input", 1.0),
    "dit/blocks/mlp/gate": ("input", 1.0),
    "dit/blocks/mlp/up": ("hidden", 0.25),
    "dit/blocks/mlp/down": ("hidden", 0.25),
    "dit/out/norm": ("vector", 1.0),
    "dit/out/shift": ("input", 1.0),
    "dit/out/scale": ("input", 1.0),
    "dit/out/unembed": ("output", 1.0),
}


def _params(d_model, base, adaln=True):
    cfg = M.make_config(
        "tiny", d_model=d_model, n_heads=2, adaln=adaln, mup_base_width=base, vocab_size=50
    )
    return cfg, M.params_dict(M.build_model(cfg, jax.random.key(0)))


def test_roles_and_scales_match_hand_table():
    cfg, params = _params(64, 16)
    assert set(params) == set(EXPECTED)
    by_names, by_fan_in = mup.mup_roles(params), mup.mup_roles(params, M.fan_in_axes)
    scales = mup.mup_lr_scales(cfg, params)
    for path, (role, scale) in EXPECTED.items():
        assert by_names[path] == by_fan_in[path] == role, path
        assert scales[path] == pytest.approx(scale), path


def test_unknown_paths_fall_back_to_axis_names():
    shape = lambda **axes: axes
    assert mup.parameter_role("x/proj", shape(blocks=2, embedding=8, neurons=32)) == "hidden"
    assert mup.parameter_role("x/table", shape(vocabulary=10, embedding=8)) == "embedding"
    assert mup.parameter_role("x/unembed", shape(embedding=8, vocabulary=10)) == "output"
    assert mup.parameter_role("x/film", shape(cond=4, embedding=8)) == "input"
    assert mup.parameter_role("x/bias", shape(blocks=3, neurons=8)) == "vector"


def _first_updates(opt, params, grad_value=0.3):
    grads = jax.tree.map(lambda x: jnp.full_like(x, grad_value), params)
    state = opt.init(params)
    updates, _ = jax.jit(opt.update)(grads, state, params)  # one compile, not op by op
    return {k: np.asarray(v.data_array) for k, v in updates.items()}


def test_first_step_equals_scaled_lr_with_decoupled_decay():
    # Adam's first step is g / |g| = 1 per coordinate (bias-corrected), so the update is
    # -lr * scale * (1 + wd_eff * p) with wd_eff = wd / scale on matrices, 0 on vectors.
    cfg, params = _params(64, 16)
    lr, wd = 1e-2, 0.1
    updates = _first_updates(
        mup.mup_adamw(lr, model_config=cfg, params=params, weight_decay=wd), params
    )
    for path, (role, scale) in EXPECTED.items():
        p = np.asarray(params[path].data_array)
        decay = 0.0 if role == "vector" else wd / scale
        expected = -lr * scale * (1.0 + decay * p)
        np.testing.assert_allclose(updates[path], expected, rtol=1e-4, atol=1e-9, err_msg=path)


def test_base_width_equals_plain_adamw():
    cfg, params = _params(32, 32)
    schedule = optax.linear_schedule(0.0, 3e-3, 5)
    ours = mup.mup_adamw(schedule, model_config=cfg, params=params, weight_decay=0.05)
    mask = {k: len([a for a in v.named_shape if a != "blocks"]) >= 2 for k, v in params.items()}
    ref = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, mask=mask)
    key = jax.random.key(1)
    s1, s2 = ours.init(params), ref.init(params)
    ours_update, ref_update = jax.jit(ours.update), jax.jit(ref.update)
    for step in range(3):
        keys = iter(jax.random.split(jax.random.fold_in(key, step), len(params)))
        grads = {
            k: jax.tree.map(lambda x, kk=next(keys): jax.random.normal(kk, x.shape), v)
            for k, v in params.items()
        }
        u1, s1 = ours_update(grads, s1, params)
        u2, s2 = ref_update(grads, s2, params)
        for k in params:
            np.testing.assert_allclose(
                np.asarray(u1[k].data_array), np.asarray(u2[k].data_array), rtol=1e-5, atol=1e-9
            )


def test_missing_base_width_is_a_clear_error():
    cfg, params = _params(64, None, adaln=False)
    with pytest.raises(ValueError, match="mup_base_width"):
        mup.mup_adamw(1e-3, model_config=cfg, params=params)
