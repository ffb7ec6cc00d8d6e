"""The modular-dualisation optimizer as an optax GradientTransformation.

    update = -lr * dualize(momentum)  -  lr * weight_decay * w     [then optionally projected]

where ``dualize`` maps the momentum of the whole model to the update of modular norm 1 that
is steepest for it (each atom's share set by mass and downstream sensitivity). The learning
rate (a float or an optax schedule) is therefore the modular norm of the dualised step; the
decoupled weight decay is a separate shrink of every weight by the factor (1 - lr *
weight_decay), not part of that norm (with weight_decay > 0 the whole update's norm is larger).
"""

from __future__ import annotations

import jax
import optax
from penzai import pz

from modula.core import Module, Weights


def _check_labels(module: Module, params: Weights) -> None:
    missing = set(module.labels) - set(params)
    extra = set(params) - set(module.labels)
    if missing or extra:
        raise ValueError(
            f"modular structure and parameters disagree: labels without parameters "
            f"{sorted(missing)}, parameters without a module {sorted(extra)}; build the "
            "structure from the parameters of the same model."
        )


def scale_by_dualization(module: Module) -> optax.GradientTransformation:
    """Replaces the updates by their dual of modular norm 1 (stateless); its init checks
    that the parameters' labels are the module's."""

    def init_fn(params):
        _check_labels(module, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        return pz.nx.order_like(module.dualize(dict(updates), 1.0), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def projection(module: Module) -> optax.GradientTransformation:
    """Turns updates u into project(w + u) - w, keeping weights on their constraint sets."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("projection needs params: call update(grads, state, params)")
        new = module.project(jax.tree.map(lambda w, u: w + u, params, updates))
        return jax.tree.map(lambda n, w: n - w, new, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def optimizer(
    learning_rate: float | optax.Schedule,
    *,
    module: Module,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    project: bool = False,
) -> optax.GradientTransformation:
    """Momentum -> modular dualisation (target norm = learning rate) -> weight decay.

    Args:
      learning_rate: modular norm of the dualised step (float or optax schedule of the step).
      module: the modular structure of the model, its atoms labelled like the parameters
        ({label: NamedArray}); ``init(params)`` raises ValueError when the labels differ.
      momentum: EMA coefficient of the gradient (0 turns momentum off).
      weight_decay: decoupled, w <- w - lr * weight_decay * w.
      project: after each step, project the weights back to each atom's constraint set
        (orthogonal matrices, unit-RMS embeddings, clipped gains).
    """
    if not isinstance(module, Module):
        raise TypeError(
            f"module must be a modula.Module describing the model, got {type(module).__name__}"
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    parts = [optax.ema(momentum, debias=False)] if momentum > 0 else []
    parts.append(scale_by_dualization(module))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if project:
        parts.append(projection(module))
    return optax.chain(*parts)
