"""The modular-dualisation optimizer as an optax GradientTransformation.

    update = -lr * (dualize(momentum) + weight_decay * w)      [then optionally projected]

where ``dualize`` maps the momentum of the whole model to the update of modular norm 1 that
is steepest for it (each atom's share set by mass and downstream sensitivity); the learning
rate (a float or an optax schedule) is therefore the modular norm of every step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from penzai import pz

from modula.core import Module, Weights

_is_named = lambda x: isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView)


def _check_labels(module: Module, params: Weights) -> None:
    missing = set(module.labels) - set(params)
    extra = set(params) - set(module.labels)
    if missing or extra:
        raise ValueError(
            f"modular structure and parameters disagree: labels without parameters "
            f"{sorted(missing)}, parameters without a module {sorted(extra)}; build the "
            "structure from the same model (modula.dit_module(model_config, params))."
        )


def scale_by_dualization(module: Module) -> optax.GradientTransformation:
    """Replaces the updates by their dual of modular norm 1 (stateless)."""

    def update_fn(updates, state, params=None):
        return pz.nx.order_like(module.dualize(dict(updates), 1.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def projection(module: Module) -> optax.GradientTransformation:
    """Turns updates u into project(w + u) - w, keeping weights on their constraint sets."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("projection needs params: call update(grads, state, params)")
        new = module.project(jax.tree.map(lambda w, u: w + u, params, updates))
        return jax.tree.map(lambda n, w: n - w, new, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class _Nothing(NamedTuple):
    pass


def optimizer(
    learning_rate: float | optax.Schedule,
    *,
    model_config: Any = None,
    params: Weights,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    project: bool = False,
    module: Module | None = None,
) -> optax.GradientTransformation:
    """Momentum -> modular dualisation (target norm = learning rate) -> weight decay.

    Args:
      learning_rate: modular norm of each step (float or optax schedule of the step).
      model_config: ``jif.model.ModelConfig``; the DiT's structure is built from it and
        ``params`` unless ``module`` is given.
      params: {label: NamedArray}; only their labels and axes are read.
      momentum: EMA coefficient of the gradient (0 turns momentum off).
      weight_decay: decoupled, w <- w - lr * weight_decay * w.
      project: after each step, project the weights back to each atom's constraint set
        (orthogonal matrices, unit-RMS embeddings, clipped gains).
      module: an explicit modular structure (e.g. for models other than the DiT).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    if module is None:
        if model_config is None:
            raise ValueError("pass model_config (for the DiT) or an explicit module=")
        from modula.dit import dit_module

        module = dit_module(model_config, params)
    _check_labels(module, params)
    parts = [optax.ema(momentum, debias=False)] if momentum > 0 else []
    parts.append(scale_by_dualization(module))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if project:
        parts.append(projection(module))
    return optax.chain(*parts)
