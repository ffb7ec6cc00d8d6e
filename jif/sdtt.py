"""Self-distillation through time (SDTT, Deschenaux & Gulcehre 2024): the targets and the loss.

A masked diffusion sampler that takes N steps moves t -> t - dt with dt = 1 / N. SDTT trains a
student to do in one step of size m * dt what the teacher does in m steps of size dt (m = 2):

    x_t --teacher, dt--> x_{t-dt} --teacher, dt--> x_{t-2dt}        (ancestral MDLM steps)
    x_t --student, 2 dt--> one prediction of x_0

The target is built at every position that is masked in x_t. A position the teacher reveals at
its step i gets the teacher's prediction p(x_0 | x_{t - i dt}) of that step (the distribution
its token was drawn from); a position still masked after the m steps gets the teacher's last
prediction, p(x_0 | x_{t - (m-1) dt}). The student's one-step prediction q(x_0 | x_t) is
trained toward this composed target; positions already clean in x_t carry their token (SUBS)
and are left out.

    target = teacher_target(teacher_logits, xt, t, dt, key, mask_id=m, n_steps=2)
    loss, aux = distill_loss(student_logits, target, xt, mask_id=m, divergence="kl")

`teacher_logits(xt, mask_rate) -> logits` is a plain function (the teacher's EMA weights bound).
Divergences (`DIVERGENCES`), per masked position over the vocabulary, then averaged:

  * "kl": the reverse KL, KL(student || teacher) = sum_v q (log q - log p), the one the
    paper found best (its released `kl-bwd`, the only divergence that kept or improved
    sample quality as steps went down);
  * "kl_forward": KL(teacher || student);
  * "tvd": total variation, 1/2 sum_v |q - p| on probabilities;
  * "mse": the mean squared difference of the log-probabilities (the paper's MSE baseline).

Every one is 0 exactly where q = p. Times: the mask rate is (1 - eps) t (jif.diffusion), so an
ancestral step t -> s reveals a masked token with probability (t - s) / t; s is clipped at 0
(a step that reaches 0 reveals everything).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jif import diffusion

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (xt [B, L], mask_rate [B]) -> [B, L, V]


class Target(NamedTuple):
    """logp: float32 [B, L, V], the target log-probabilities (0 at positions clean in x_t,
    the mask column 0: both are left out of the loss). revealed_at: int32 [B, L], the
    teacher step that revealed each position; n_steps for one still masked at the end, -1
    for one clean in x_t. x_end: int32 [B, L], the teacher's tokens after its n_steps."""

    logp: jax.Array
    revealed_at: jax.Array
    x_end: jax.Array


def log_probs(logits: jax.Array, mask_id: int) -> jax.Array:
    """Predicted log p(x_0) [B, L, V] over real tokens (SUBS: never the mask); the mask
    column holds 0 instead of -inf so that differences of two of them stay finite."""
    logp = jax.nn.log_softmax(diffusion.without_mask_logit(logits, mask_id))
    return jnp.where(jnp.arange(logits.shape[-1]) == mask_id, 0.0, logp)


def teacher_target(
    teacher_logits: LogitsFn,
    xt: jax.Array,
    t: jax.Array,
    dt: float,
    key: jax.Array,
    *,
    mask_id: int,
    n_steps: int = 2,
) -> Target:
    """The teacher's composed prediction after n_steps ancestral steps of size dt from x_t
    (xt int32 [B, L] at times t float32 [B]); no gradient flows through it."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps}: the teacher takes at least one step")
    masked0 = xt == mask_id
    x, target = xt, jnp.zeros((), jnp.float32)
    revealed_at = jnp.where(masked0, n_steps, -1).astype(jnp.int32)
    for i in range(n_steps):
        t_i = jnp.maximum(t - i * dt, 0.0)
        s_i = jnp.maximum(t - (i + 1) * dt, 0.0)
        logp = jax.lax.stop_gradient(
            log_probs(teacher_logits(x, diffusion.mask_rate(t_i)), mask_id)
        )
        k_reveal, k_token, key = jax.random.split(key, 3)
        p_reveal = jnp.where(t_i > 0, (t_i - s_i) / jnp.maximum(t_i, 1e-30), 1.0)
        reveal = (x == mask_id) & (jax.random.uniform(k_reveal, x.shape) < p_reveal[:, None])
        not_mask = jnp.where(jnp.arange(logp.shape[-1]) == mask_id, -jnp.inf, logp)
        token = jax.random.categorical(k_token, not_mask).astype(x.dtype)
        x = jnp.where(reveal, token, x)
        target = jnp.where(reveal[..., None], logp, target)
        revealed_at = jnp.where(reveal, i, revealed_at)
    still = revealed_at == n_steps  # masked in x_t, never revealed: the last prediction
    target = jnp.where(still[..., None], logp, target)
    return Target(target, revealed_at, x)


def divergence_terms(logq: jax.Array, logp: jax.Array, divergence: str) -> jax.Array:
    """d(q, p) per position [...] from log-probabilities [..., V] (see the module doc)."""
    q, p = jnp.exp(logq), jnp.exp(logp)
    if divergence == "kl":
        return jnp.sum(q * (logq - logp), axis=-1)
    if divergence == "kl_forward":
        return jnp.sum(p * (logp - logq), axis=-1)
    if divergence == "tvd":
        return 0.5 * jnp.sum(jnp.abs(q - p), axis=-1)
    if divergence == "mse":
        return jnp.mean(jnp.square(logq - logp), axis=-1)
    raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES}")


DIVERGENCES = ("kl", "kl_forward", "tvd", "mse")


def distill_loss(
    student_logits: jax.Array,
    target: Target,
    xt: jax.Array,
    *,
    mask_id: int,
    divergence: str = "kl",
) -> tuple[jax.Array, dict]:
    """The mean of d(student, target) over the positions masked in xt, and metrics
    (loss, mask_frac). The mask column and clean positions hold log-probability 0 in both,
    so they add nothing to any divergence."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES}")
    masked = xt == mask_id
    vocab = jnp.arange(student_logits.shape[-1])
    logq = log_probs(student_logits, mask_id)
    logp = jnp.where(masked[..., None] & (vocab != mask_id), target.logp, 0.0)
    logq = jnp.where(masked[..., None], logq, 0.0)  # clean positions: q = p, no term
    terms = jnp.where(masked, divergence_terms(logq, logp, divergence), 0.0)
    n = jnp.maximum(jnp.sum(masked), 1)
    loss = jnp.sum(terms) / n
    return loss, {"loss": loss, "mask_frac": jnp.mean(masked)}


def make_loss(
    unbind: Callable, apply_logits: Callable, *, dt: float, n_steps: int, divergence: str
) -> Callable:
    """loss(model, batch, key, *, mask_id) -> (loss, aux) for jif.loop.make_train_step, with
    batch {"tokens": int32 [B, L], "teacher": the teacher's weights}: a time t drawn as in
    MDLM training (jif.diffusion.sample_t), x_t from the forward process, the teacher's
    target from x_t and the student's prediction at x_t. `unbind(weights)` binds the
    teacher's weights to the model; `apply_logits(model, xt, mask_rate)` runs a model."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES}")

    def loss(model, batch, key, *, mask_id):
        x0 = batch["tokens"]
        k_t, k_mask, k_teacher = jax.random.split(key, 3)
        t = diffusion.sample_t(k_t, x0.shape[0])
        xt, _ = diffusion.q_xt(k_mask, x0, diffusion.mask_rate(t), mask_id)
        teacher = unbind(batch["teacher"])
        target = teacher_target(
            lambda x, r: apply_logits(teacher, x, r),
            xt,
            t,
            dt,
            k_teacher,
            mask_id=mask_id,
            n_steps=n_steps,
        )
        student = apply_logits(model, xt, diffusion.mask_rate(t))
        loss, aux = distill_loss(student, target, xt, mask_id=mask_id, divergence=divergence)
        n_masked = jnp.maximum(jnp.sum(xt == mask_id), 1)
        aux["revealed"] = jnp.sum((target.revealed_at >= 0) & (target.revealed_at < n_steps))
        aux["revealed"] = aux["revealed"] / n_masked  # by the teacher's steps
        return loss, aux

    return loss
