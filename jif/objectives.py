"""Training objectives, chosen by name (`python -m jif.train --objective NAME`).

    OBJECTIVES[name].loss(model, batch, key, mask_id=m) -> (loss, aux)

model is the bound DiT, batch int32 [B, L], key the step's key; aux holds scalar metrics.
`model_overrides` are the ModelConfig fields the objective needs (set on top of the preset).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jif import diffusion
from jif import model as model_lib


def mdlm(model, batch: jax.Array, key: jax.Array, *, mask_id: int):
    """The MDLM objective (Sahoo et al. 2024): the continuous-time NELBO at a sampled time,
    with logits read out only at masked positions."""
    k_t, k_mask = jax.random.split(key)
    t = diffusion.sample_t(k_t, batch.shape[0])
    features_fn = lambda xt, mask_rate: model_lib.apply_features(model, xt, mask_rate)
    readout_fn = lambda h: model_lib.apply_readout(model, h)  # at masked positions only
    return diffusion.mdlm_loss(
        features_fn, batch, t, k_mask, mask_id=mask_id, readout_fn=readout_fn
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    loss: Callable
    """(model, batch, key, *, mask_id) -> (loss, aux)."""
    model_overrides: dict = dataclasses.field(default_factory=dict)
    """ModelConfig fields the objective needs."""


OBJECTIVES: dict[str, Objective] = {"mdlm": Objective(loss=mdlm)}
