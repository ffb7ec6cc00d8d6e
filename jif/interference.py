"""Interference-aware unmasking (the seed write-up's idea): reveal tokens that are confident
and roughly conditionally independent of each other.

Tokens revealed at the same step are drawn independently from their marginals, which is
wrong exactly when they depend on each other. A probe (`python -m jif.probe`, stored in
`<run>/probe/`) embeds each masked position's final-layer activations h [d_model] linearly,
e = h W (W [d_model, k]), trained with the model frozen so that e_i . e_j predicts how many
nats revealing position i lowers the cross-entropy at position j. The "interference"
sampler follows the "confidence" plan (the same number of reveals per step, so the same
network calls) but picks a step's positions greedily: each next pick maximises

    log p(drawn token at i) - sum over positions j picked before of max(0, e_i . e_j),

both in nats (a dependence the probe predicts costs what independent drawing loses).
Without a probe (`denoise_fn` returning logits only) it is exactly "confidence";
`denoise_fn_for` says so.

The probe's loader lives here (`load_probe`); jif/checkpoint.py is not involved.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jif import model as model_lib
from jif.plans import Outcome, Plan, choose_expected
from jif.threshold import expected_loop

PROBE_DIR = "probe"  # beside the run's checkpoints/
WEIGHTS, META = "probe.npz", "probe.json"


class Probe(NamedTuple):
    """weights: float32 [d_model, k]; meta: what jif.probe wrote (step, fit, command)."""

    weights: np.ndarray
    meta: dict


def run_dir_of(step_dir: str) -> str:
    """The run folder of a checkpoint step folder <run>/checkpoints/<step> (else itself)."""
    parent = os.path.dirname(os.path.abspath(step_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else step_dir


def default_probe_dir(step_dir: str) -> str:
    return os.path.join(run_dir_of(step_dir), PROBE_DIR)


def save_probe(folder: str, weights: np.ndarray, meta: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, WEIGHTS), weights=np.asarray(weights, np.float32))
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=2)


def load_probe(folder: str, *, d_model: int | None = None, step: int | None = None) -> Probe:
    """The probe in `folder`. ValueError naming the problem and the fix if it is missing,
    unreadable, for another width (d_model) or, with step, trained at another step."""
    path = os.path.join(folder, WEIGHTS)
    fix = "train one with python -m jif.probe --checkpoint RUN"
    if not os.path.exists(path):
        raise ValueError(f"no interference probe at {path}: {fix}.")
    try:
        weights = np.load(path)["weights"]
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read the probe in {folder} ({e}): {fix} again.") from None
    if weights.ndim != 2 or (d_model is not None and weights.shape[0] != d_model):
        raise ValueError(
            f"the probe in {folder} maps {weights.shape[0]}-wide activations, the model's are "
            f"{d_model}: it belongs to another model; {fix}."
        )
    if step is not None and meta.get("step") != step:
        raise ValueError(
            f"the probe in {folder} was trained on step {meta.get('step')}, the checkpoint is "
            f"step {step}: {fix} (or pass that step's folder)."
        )
    return Probe(weights.astype(np.float32), meta)


def features_and_logits(model, tokens, mask_id: int, prediction=None):
    """(final-layer activations [B, L, d_model], logits [B, L, V]) of one network call,
    the mask rate each row's mask fraction (as `jif.model.make_denoise_fn`)."""
    rate = jnp.mean((tokens == mask_id).astype(jnp.float32), axis=-1)
    h = model_lib.apply_features(model, tokens, rate, prediction=prediction)
    logits = model_lib.apply_readout(model, h.reshape(-1, h.shape[-1]))
    return h, logits.reshape(h.shape[:2] + (-1,))


def probe_denoise_fn(model, weights, mask_id: int):
    """tokens int32 [B, L] -> (logits [B, L, V], embeddings [B, L, k]): one network call."""

    @jax.jit
    def fn(model, w, tokens, prediction):
        h, logits = features_and_logits(model, tokens, mask_id, prediction)
        return logits, h.astype(jnp.float32) @ w

    w = jnp.asarray(weights)
    return lambda tokens, prediction=None: fn(model, w, tokens, prediction)


_denoisers: dict = {}  # (step dir, probe dir) -> the denoiser: one compiled sampler each


def denoise_fn_for(loaded, probe_dir: str | None = None) -> tuple[object, str]:
    """(denoiser, note) for "interference" with a jif.checkpoint.LoadedModel: the probe's
    when `probe_dir` (default `<run>/probe`) holds one for this checkpoint, else
    loaded.denoise_fn (confidence order); the note says which. A probe_dir given but
    unusable raises ValueError."""
    folder = probe_dir or default_probe_dir(loaded.path)
    if probe_dir is None and not os.path.exists(os.path.join(folder, WEIGHTS)):
        return loaded.denoise_fn, (
            f"interference: no probe at {folder}, so positions are chosen by confidence alone "
            "(train one with python -m jif.probe --checkpoint RUN)."
        )
    d_model = loaded.model_config.d_model
    probe = load_probe(folder, d_model=d_model, step=loaded.step)
    key = (os.path.realpath(loaded.path), os.path.realpath(folder))
    if key not in _denoisers:
        _denoisers[key] = probe_denoise_fn(loaded.model, probe.weights, loaded.tokenizer.mask_id)
    return _denoisers[key], f"interference: probe {folder} (dim {probe.weights.shape[1]})"


def choose_interference(plan: Plan, masked, step, block_id, logp, emb) -> jax.Array:
    """The plan's count of positions of the step's block, picked greedily by log-probability
    minus the predicted interference with the ones already picked. bool [B, L]. emb: the
    probe's embeddings [B, L, k], or None: confidence order."""
    if emb is None:
        return choose_expected(plan, masked, step, block_id, jnp.exp(logp))
    n = jnp.take_along_axis(plan.counts, jnp.minimum(step, plan.n_steps - 1)[:, None], axis=1)
    n = jnp.where(step < plan.n_steps, n[:, 0], 0)  # [B]
    eligible = masked & (block_id[None, :] == (step // plan.steps_per_block)[:, None])
    cost = jax.nn.relu(jnp.einsum("bik,bjk->bij", emb, emb))  # [B, L, L]
    rows = jnp.arange(masked.shape[0])

    def pick(carry):
        r, chosen, penalty = carry
        gain = jnp.where(eligible & ~chosen, logp - penalty, -jnp.inf)
        best = jnp.argmax(gain, axis=1)
        take = (r < n) & jnp.isfinite(gain[rows, best])
        chosen = chosen.at[rows, best].set(chosen[rows, best] | take)
        penalty = penalty + jnp.where(take[:, None], cost[rows, best], 0.0)
        return r + 1, chosen, penalty

    init = (jnp.zeros((), jnp.int32), jnp.zeros_like(masked), jnp.zeros(logp.shape, jnp.float32))
    return jax.lax.while_loop(lambda c: c[0] < jnp.max(n), pick, init)[1]


def loop(key, tokens, **settings) -> Outcome:
    """The "interference" sampler (a `jif.sampling.Method.loop`)."""
    return expected_loop(key, tokens, choose_interference, **settings)
