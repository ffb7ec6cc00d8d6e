"""Training objectives, chosen by name (`python -m jif.train --objective NAME`).

    OBJECTIVES[name].loss(model, batch, key, mask_id=m) -> (loss, aux)

model is the bound DiT, batch int32 [B, L], key the step's key; aux holds scalar metrics.
`model_overrides` are the ModelConfig fields the objective needs (set on top of the preset).
Each objective also says how its models are evaluated and sampled (jif.eval reads these):

    OBJECTIVES[name].evaluate(model, batches, mask_id=m, n_times=8, seed=0) -> {"nelbo", ...}
    OBJECTIVES[name].span_scores(model, tokens, mask, mask_id=m) -> (nats [N], exact [N])
    OBJECTIVES[name].span_logprob(model, tokens, mask, span, mask_id=m) -> log p [N]
    OBJECTIVES[name].generate(denoise_fn, key, tokens, mask_id=m, steps=.., method=.., ...)

"mdlm": masked diffusion (jif.diffusion, jif.sampling); "ar": the same DiT with a causal
mask and a next-token loss (jif.ar), the autoregressive reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jif import ar, diffusion, sampling
from jif import model as model_lib

SELF_CONDITION_STREAM = 0x5C  # fold_in of the step key: the other draws keep their keys


def mdlm(model, batch: jax.Array, key: jax.Array, *, mask_id: int):
    """The MDLM objective (Sahoo et al. 2024): the continuous-time NELBO at a sampled time,
    with logits read out only at masked positions."""
    k_t, k_mask = jax.random.split(key)
    t = diffusion.sample_t(k_t, batch.shape[0])
    use = True  # self-conditioning, if the model has it: half of the batches (Bit Diffusion)
    if model.config.self_condition:
        use = jax.random.bernoulli(jax.random.fold_in(key, SELF_CONDITION_STREAM), 0.5)
    features_fn = lambda xt, mask_rate: model_lib.apply_features(model, xt, mask_rate, use)
    readout_fn = lambda h: model_lib.apply_readout(model, h)  # at masked positions only
    return diffusion.mdlm_loss(
        features_fn, batch, t, k_mask, mask_id=mask_id, readout_fn=readout_fn
    )


def mdlm_evaluate(model, batches, *, mask_id: int, n_times: int = 8, seed: int = 0) -> dict:
    """The validation NELBO (jif.diffusion.eval_nelbo; one compile for every model of a
    shape): fixed midpoint time grid, masks fixed by seed."""
    return diffusion.eval_nelbo(
        model_lib.apply_logits, batches, mask_id=mask_id, n_times=n_times, seed=seed, model=model
    )


_apply_logits = jax.jit(model_lib.apply_logits)


def _logits_fn(model):
    return lambda xt, rate: _apply_logits(model, xt, rate)


def mdlm_generate(denoise_fn, key, tokens, *, mask_id: int, **options):
    """jif.sampling.sample: options steps, method, temperature, top_p, top_k, block_length."""
    return sampling.sample(denoise_fn, key, tokens, mask_id=mask_id, **options)


def ar_generate(denoise_fn, key, tokens, *, mask_id: int, steps=None, method=None, **options):
    """jif.ar.sample, left to right: one step per position (steps, method and block_length
    are diffusion settings, ignored); options temperature, top_p, top_k, return_trajectory."""
    del steps, method
    options.pop("block_length", None)
    return ar.sample(denoise_fn, key, tokens, mask_id=mask_id, **options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    loss: Callable
    """(model, batch, key, *, mask_id) -> (loss, aux)."""
    evaluate: Callable
    """(model, batches, *, mask_id, n_times, seed) -> {"nelbo": nats per window token,
    "bits_per_token", "ppl_bound", "n_sequences", ...}: the validation measure."""
    span_scores: Callable
    """(model, tokens, mask, *, mask_id) -> (nats [N], exact [N]) of each row's masked tokens."""
    span_logprob: Callable
    """(model, tokens, mask, span, *, mask_id) -> log p(span's tokens) [N], mask hidden."""
    generate: Callable
    """(denoise_fn, key, tokens, *, mask_id, **options) -> jif.sampling.SampleResult."""
    model_overrides: dict = dataclasses.field(default_factory=dict)
    """ModelConfig fields the objective needs."""


OBJECTIVES: dict[str, Objective] = {
    "mdlm": Objective(
        loss=mdlm,
        evaluate=mdlm_evaluate,
        span_scores=lambda model, tokens, mask, *, mask_id: diffusion.span_scores(
            _logits_fn(model), tokens, mask, mask_id=mask_id
        ),
        span_logprob=lambda model, tokens, mask, span, *, mask_id: diffusion.span_logprob(
            _logits_fn(model), tokens, mask, span, mask_id=mask_id
        ),
        generate=mdlm_generate,
    ),
    "ar": Objective(
        loss=ar.loss,
        evaluate=ar.eval_nll,
        span_scores=ar.span_scores,
        span_logprob=ar.span_logprob,
        generate=ar_generate,
        model_overrides={"causal": True},
    ),
}


def objective_of(config: dict) -> str:
    """The objective of a resolved training config (a checkpoint's "config"); checkpoints
    written before objectives existed trained MDLM."""
    name = config.get("objective", "mdlm")
    if name not in OBJECTIVES:
        raise ValueError(
            f"the checkpoint was trained with objective {name!r}, which this jif does not "
            f"know (known: {sorted(OBJECTIVES)})."
        )
    return name
