"""AdamW under the maximal update parametrisation (muP; Yang et al. 2022, the `mup` package).

muP makes the best hyperparameters of a small "base" model carry over to wider ones. It has
three parts; the model (`ModelConfig.mup_base_width`) does the forward-pass ones (logits times
base_width / d_model, attention scores times 1/d_head, a zero-initialised output layer), and
this file does the optimizer one: Adam learning rates per parameter, chosen by its role.

Roles follow the `mup` package's `MuAdam` (its Table 8 convention); fan-in and fan-out axes
come from `jif.model.fan_in_axes(label)`, width axes are the ones that grow with d_model:

    role        example path            fan-in | fan-out                  Adam lr
    ----------  ----------------------  --------------------------------  ---------------------
    embedding   dit/embed               vocabulary | embedding            lr
    output      dit/out/unembed         embedding | vocabulary            lr (logits x 1/m)
    hidden      dit/blocks/attn/query   embedding | heads, projection     lr / m
                dit/blocks/mlp/down     neurons | embedding               lr / m
    input       dit/blocks/attn/shift   cond | embedding (fixed fan-in)   lr
    vector      dit/blocks/attn/norm    gains and biases                  lr

with the width multiplier m = d_model / mup_base_width. A matrix is "hidden" when its fan-in
and fan-out both grow with width; every such fan-in is a fixed multiple of d_model (d_model,
n_heads x d_head = d_model, or mlp_ratio x d_model), so its ratio to the base model's fan-in
is exactly m. Decoupled weight decay (matrices only) is multiplied by m on hidden matrices,
as `MuAdamW` does, so that lr x wd stays width-independent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from penzai import pz

from jif import model as model_lib

# Axes whose size grows with d_model, grouped by the width they follow (every one of them is a
# fixed multiple of d_model: d_model itself, n_heads x d_head = d_model, mlp_ratio x d_model).
WIDTH_AXIS_GROUPS: dict[str, str] = {
    "embedding": "embedding",
    "neurons": "neurons",
    "heads": "attention",
    "kv_heads": "attention",
    "projection": "attention",
}
# Axes that index copies of a parameter rather than its fan_in / fan_out.
STACK_AXES = frozenset({"blocks"})
VOCAB_AXIS = "vocabulary"


def parameter_role(
    path: str, named_shape: Mapping[str, int], fan_in: tuple[str, ...] | None = None
) -> str:
    """muP role of one parameter: "embedding", "output", "hidden", "input" or "vector".

    path: the parameter label, e.g. "dit/blocks/mlp/up".
    named_shape: its axis sizes, e.g. {"blocks": 2, "embedding": 64, "neurons": 256}.
    fan_in: its fan-in axes (`jif.model.fan_in_axes(path)`); without them the role is read from
        axis names alone (vocabulary tables by name, a matrix spanning two width groups is
        hidden).
    """
    axes = [name for name in named_shape if name not in STACK_AXES]
    if len(axes) <= 1 or fan_in == ():
        return "vector"  # norm gains, biases
    if fan_in is None:
        if VOCAB_AXIS in axes:
            return "output" if "unembed" in path else "embedding"
        groups = {WIDTH_AXIS_GROUPS[name] for name in axes if name in WIDTH_AXIS_GROUPS}
        return "hidden" if len(groups) >= 2 else "input"
    fan_out = [name for name in axes if name not in fan_in]
    if VOCAB_AXIS in fan_in:
        return "embedding"
    if VOCAB_AXIS in fan_out:
        return "output"
    wide_in = any(name in WIDTH_AXIS_GROUPS for name in fan_in)
    wide_out = any(name in WIDTH_AXIS_GROUPS for name in fan_out)
    # Fan-in fixed (cond, frequencies): an input-like matrix, whatever its fan-out.
    return "hidden" if wide_in and wide_out else "input"


# Adam learning-rate multiplier per role, as a function of the width multiplier m.
LR_MULTIPLIERS: dict[str, Callable[[float], float]] = {
    "embedding": lambda m: 1.0,
    "output": lambda m: 1.0,
    "hidden": lambda m: 1.0 / m,
    "input": lambda m: 1.0,
    "vector": lambda m: 1.0,
}


def width_multiplier(model_config: Any) -> float:
    """m = d_model / mup_base_width; raises ValueError when muP is not configured."""
    base = getattr(model_config, "mup_base_width", None)
    if base is None or base <= 0:
        raise ValueError(
            f"mup_adamw needs ModelConfig.mup_base_width > 0, got {base!r}; set it to the width "
            "the learning rate was tuned at (e.g. --mup-base-width 64)."
        )
    return model_config.d_model / base


def _named_leaves(params: Any) -> list[tuple[str, Any]]:
    """Flattens params to (path, NamedArray-or-array) pairs; dict keys joined with "/"."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView)
    )[0]
    out = []
    for keypath, leaf in leaves:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
        out.append(("/".join(parts), leaf))
    return out


def _named_shape(leaf: Any) -> dict[str, int]:
    if isinstance(leaf, pz.nx.NamedArray | pz.nx.NamedArrayView):
        return dict(leaf.named_shape)
    # Plain arrays carry no axis names: positional names make them vectors / matrices of
    # non-width axes, i.e. unscaled.
    return {f"axis{i}": n for i, n in enumerate(jnp.shape(leaf))}


def mup_roles(
    params: Any, fan_in_axes: Callable[[str], tuple[str, ...]] | None = None
) -> dict[str, str]:
    """Role of every parameter, keyed by path (see `parameter_role`); fan-in axes are
    ``fan_in_axes(path)`` when given (e.g. `jif.model.fan_in_axes`), else roles come from
    axis names alone."""
    return {
        path: parameter_role(path, _named_shape(leaf), fan_in_axes(path) if fan_in_axes else None)
        for path, leaf in _named_leaves(params)
    }


def mup_lr_scales(model_config: Any, params: Any) -> dict[str, float]:
    """Per-parameter learning-rate multiplier (relative to the base lr), keyed by path."""
    m = width_multiplier(model_config)
    roles = mup_roles(params, model_lib.fan_in_axes)
    return {path: LR_MULTIPLIERS[role](m) for path, role in roles.items()}


def _map_like(params: Any, values: dict[str, Any]) -> Any:
    """A pytree shaped like params (NamedArrays as leaves) holding values[path] per leaf."""
    flat = iter([values[path] for path, _ in _named_leaves(params)])
    return jax.tree_util.tree_map(
        lambda _: next(flat),
        params,
        is_leaf=lambda x: isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView),
    )


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-leaf scalar; scales is a prefix tree of updates."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(
            lambda s, u: jax.tree_util.tree_map(lambda x: x * s, u),
            scales,
            updates,
            is_leaf=lambda x: x is None,
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def mup_adamw(
    learning_rate: float | optax.Schedule,
    *,
    model_config: Any,
    params: Any,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW with muP per-parameter learning rates (see the module docstring).

    learning_rate: the base learning rate (or schedule), i.e. the one tuned at mup_base_width;
        parameters get learning_rate x `mup_lr_scales(...)[path]`.
    model_config: a ModelConfig with d_model and mup_base_width set.
    params: the parameter tree (dict of path -> NamedArray), used for its paths and axes only.
    weight_decay: decoupled weight decay, applied to matrices (not vectors), times m on hidden
        matrices so that the product lr x wd is width-independent.
    """
    m = width_multiplier(model_config)
    roles = mup_roles(params, model_lib.fan_in_axes)
    lr_scales = {path: LR_MULTIPLIERS[role](m) for path, role in roles.items()}
    chain = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
        decay = {
            path: (weight_decay / s if role != "vector" else 0.0)
            for (path, role), s in zip(roles.items(), lr_scales.values(), strict=True)
        }
        chain.append(_add_decayed_weights_by_tree(_map_like(params, decay)))
    chain.append(optax.scale_by_learning_rate(learning_rate))
    chain.append(scale_by_tree(_map_like(params, lr_scales)))
    return optax.chain(*chain)


def _add_decayed_weights_by_tree(decay: Any) -> optax.GradientTransformation:
    """updates + decay[leaf] * params, with a fixed per-leaf decay coefficient."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("mup_adamw with weight_decay > 0 needs params in update().")
        new = jax.tree_util.tree_map(
            lambda d, u, p: jax.tree_util.tree_map(lambda a, b: a + d * b, u, p),
            decay,
            updates,
            params,
            is_leaf=lambda x: x is None,
        )
        return new, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
