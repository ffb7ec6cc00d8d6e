"""Optimizers and learning-rate schedules, chosen by name from small registries.

Parameters are a `dict[label, pz.nx.NamedArray]` (penzai parameter labels such as
"dit/blocks/attn/query"; block parameters carry a leading "blocks" axis). Optax transforms
work leafwise on the arrays inside the NamedArrays; axis-aware optimizers read `.named_shape`.

    OPTIMIZERS[name](cfg: OptimConfig, schedule, model_config, params)
        -> optax.GradientTransformation

`OptimConfig` holds every optimizer setting (its fields are `jif.train`'s optimizer flags);
`schedule` maps the step to the learning rate (`make_schedule(cfg, steps)`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import optax
from penzai import pz

import modula
from jif import mup, well_normed

Params = dict[str, pz.nx.NamedArray]

MODULA_MOMENTUM = 0.95  # the modula optimizer's gradient EMA (docs/training.md: how it was chosen)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer, its learning-rate schedule and gradient clipping."""

    optimizer: str = "adamw"
    """adamw, schedule_free, muon, modula or mup_adamw (jif.optim.OPTIMIZERS)."""
    lr: float | None = None
    """Peak learning rate (None: the optimizer's own default, jif.optim.DEFAULT_LR)."""
    embed_lr_mult: float = 100.0
    """adamw: learning rate of the embedding table as a multiple of lr (its N(0, 1) entries
    move lr per step, far slower relative to their size than the 1/sqrt(d) hidden weights)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine (to min_lr_ratio * lr) or constant."""
    warmup: int = 100
    """Linear warmup steps (at most half the run)."""
    min_lr_ratio: float = 0.3
    """Final learning rate of the cosine schedule, as a fraction of lr (0.3 beat 0.1 and 0 for
    AdamW and Modula at the default budget: docs/experiments.md, 2026-12-03)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.98
    """Adam second-moment decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices."""
    clip: float = 10.0
    """Clip the global gradient norm at this value (0: no clipping)."""
    momentum: float = MODULA_MOMENTUM
    """modula: EMA coefficient of the gradient before it is dualised (0: none)."""
    blocks_mass: float = well_normed.BLOCKS_MASS
    """modula: mass of all blocks together, against 1 each for the embedding and the output
    (their shares of the step's modular norm)."""

    def validate(self) -> OptimConfig:
        """ValueError naming an unknown optimizer or schedule, or a value out of its range."""
        if canonical_name(self.optimizer) not in OPTIMIZERS:
            raise ValueError(
                f"--optimizer {self.optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: choose one of {sorted(SCHEDULES)}")
        ranges = {  # name: (low, high, low included, high included)
            "embed_lr_mult": (0.0, math.inf, False, False),
            "min_lr_ratio": (0.0, 1.0, True, True),
            "b1": (0.0, 1.0, True, False),
            "b2": (0.0, 1.0, True, False),
            "weight_decay": (0.0, math.inf, True, False),
            "clip": (0.0, math.inf, True, False),
            "momentum": (0.0, 1.0, True, False),
            "blocks_mass": (0.0, math.inf, False, False),
        }
        if self.lr is not None:
            ranges["lr"] = (0.0, math.inf, True, False)
        for name, (lo, hi, lo_in, hi_in) in ranges.items():
            v = getattr(self, name)
            ok = (
                math.isfinite(v)
                and (v >= lo if lo_in else v > lo)
                and (v <= hi if hi_in else v < hi)
            )
            if not ok:
                interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
                raise ValueError(f"--{name.replace('_', '-')} must be in {interval}, got {v}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if canonical_name(self.optimizer) != "modula":
            for name, default in modula_only_defaults().items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"--{name.replace('_', '-')} is the modula optimizer's; with "
                        f"--optimizer {self.optimizer} drop it (Adam's momentum is --b1)"
                    )
        return self

    def with_optimizer(self, name: str) -> OptimConfig:
        """This config for optimizer ``name``; leaving modula drops its own settings."""
        out = dataclasses.replace(self, optimizer=name)
        if canonical_name(name) != "modula":
            out = dataclasses.replace(out, **modula_only_defaults())
        return out

    def resolved(self, d_model: int | None = None) -> OptimConfig:
        """This config with the optimizer's default learning rate for a model of width
        d_model (default_lr; None: the reference width LR_WIDTH) where lr is None."""
        if self.lr is not None:
            return self
        return dataclasses.replace(self, lr=default_lr(self.optimizer, d_model or LR_WIDTH))


def modula_only_defaults() -> dict[str, float]:
    """The OptimConfig fields only the modula optimizer reads, at their defaults."""
    return {"momentum": MODULA_MOMENTUM, "blocks_mass": well_normed.BLOCKS_MASS}


Builder = Callable[[OptimConfig, optax.Schedule, Any, Params], optax.GradientTransformation]


# ----------------------------------------------------------------------------- schedules


def warmup_cosine(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr over `warmup` steps, then cosine decay to
    cfg.lr * cfg.min_lr_ratio at `steps` (the original's AdamW schedule)."""
    warmup = effective_warmup(cfg, steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def warmup_constant(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr over `warmup` steps, then constant."""
    warmup = effective_warmup(cfg, steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
        [warmup],
    )


def effective_warmup(cfg: OptimConfig, steps: int) -> int:
    """Warmup steps actually used: cfg.warmup, but at most half the run (short test runs)."""
    return int(min(cfg.warmup, steps // 2))


SCHEDULES: dict[str, Callable[[OptimConfig, int], optax.Schedule]] = {
    "cosine": warmup_cosine,
    "constant": warmup_constant,
}


def make_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """The schedule named by cfg.schedule, for a run of `steps` steps (schedule-free keeps
    --lr after its own warmup: its schedule is the constant one, whatever --schedule says)."""
    cfg = cfg.validate().resolved()
    name = "constant" if canonical_name(cfg.optimizer) == "schedule_free" else cfg.schedule
    return SCHEDULES[name](cfg, steps)


# ----------------------------------------------------------------------------- helpers


def _clip(cfg: OptimConfig) -> list[optax.GradientTransformation]:
    """Global-norm gradient clipping (cfg.clip; 0 turns it off)."""
    return [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []


def _is_named(x: Any) -> bool:
    return isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView)


def decay_mask(params: Params) -> dict[str, bool]:
    """Weight decay only on matrices (two or more non-"blocks" axes), not on norm scales or
    biases. A dict keyed like `params`, a prefix of its pytree (as optax.masked expects)."""
    return {k: len([a for a in v.named_shape if a != "blocks"]) >= 2 for k, v in params.items()}


def scale_labels(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates of the labelled parameters by their factor (others unchanged)."""

    def scale(updates, params=None):
        return {k: (u * factors[k] if k in factors else u) for k, u in updates.items()}

    return optax.stateless(scale)


def _embed_lr(cfg: OptimConfig, params: Params) -> list[optax.GradientTransformation]:
    """Per-label learning-rate multiplier for the embedding table (cfg.embed_lr_mult)."""
    if cfg.embed_lr_mult == 1.0:
        return []
    return [scale_labels({k: cfg.embed_lr_mult for k in params if k.endswith("/embed")})]


# ----------------------------------------------------------------------------- optimizers


def adamw(cfg: OptimConfig, schedule: optax.Schedule, model_config, params: Params):
    """AdamW (b1 0.9, b2 0.98 by default) after clipping the global gradient norm at 10."""
    return optax.chain(
        *_clip(cfg),
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=1e-8,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(params),
        ),
        *_embed_lr(cfg, params),
    )


def schedule_free(cfg: OptimConfig, schedule: optax.Schedule, model_config, params: Params):
    """Schedule-free AdamW (Defazio et al. 2024, optax.contrib): its own warmup, no decay.
    Evaluate with `eval_params` (the averaged iterate), not the raw parameters. `schedule`
    (warmup then constant, from `make_schedule`) is the learning rate it follows."""
    return optax.chain(
        *_clip(cfg),
        optax.contrib.schedule_free_adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
        ),
    )


# Parameters whose "embedding" axis is the output of the matrix (the rest read from it).
_OUTPUT_PROJECTION = re.compile(r"(output|out_proj|o_proj|down|proj_out|attn/out)$")
# Embedding tables, the unembedding and the small adaLN conditioning matrices: updated by
# Adam, as Muon's authors recommend for everything but hidden matrices.
_ADAM_ONLY = re.compile(r"(embed|unembed|logits|lm_head|vocab|cond|shift|scale|gate)")


def muon_dimensions(params: Params) -> dict[str, Any]:
    """Muon's (reduction, output) axes per parameter, from axis names; None means Adam.

    Axis "blocks" is a batch axis (every block orthogonalised separately). A matrix reads
    from "embedding" unless its label marks an output projection (attention output,
    MLP down), in which case it writes to "embedding" and reads from the other axes.
    """
    out = {}
    for label, value in params.items():
        axes = list(value.named_shape)
        matrix_axes = [a for a in axes if a != "blocks"]
        if (
            len(matrix_axes) < 2
            or "embedding" not in axes
            or _ADAM_ONLY.search(label)
            or "cond" in axes
        ):
            out[label] = None
            continue
        emb = axes.index("embedding")
        others = tuple(axes.index(a) for a in matrix_axes if a != "embedding")
        if _OUTPUT_PROJECTION.search(label):
            out[label] = optax.contrib.MuonDimensionNumbers(reduction_axis=others, output_axis=emb)
        else:
            out[label] = optax.contrib.MuonDimensionNumbers(reduction_axis=emb, output_axis=others)
    return out


def on_data_arrays(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` on plain arrays: every NamedArray is replaced by its data array (axis order
    = `named_shape` order, after `.as_namedarrayview()`-free canonical NamedArray layout),
    and results are rewrapped with the original axis names."""

    def unwrap(tree):
        return {k: (v.data_array if _is_named(v) else v) for k, v in tree.items()}

    def rewrap(plain, like):
        return {
            k: (
                dataclasses.replace(like[k], data_array=plain[k])
                if _is_named(like[k])
                else plain[k]
            )
            for k in like
        }

    def init(params):
        return inner.init(unwrap(params))

    def update(updates, state, params=None):
        new, state = inner.update(
            unwrap(updates), state, None if params is None else unwrap(params)
        )
        return rewrap(new, updates), state

    return optax.GradientTransformation(init, update)


def muon(cfg: OptimConfig, schedule: optax.Schedule, model_config, params: Params):
    """Muon (Jordan et al. 2024; optax.contrib.muon): Newton-Schulz-orthogonalised momentum
    for hidden matrices, Adam (b1, b2) for embeddings, the unembedding and vectors."""
    for label, value in params.items():
        if not isinstance(value, pz.nx.NamedArray):
            raise ValueError(f"muon needs NamedArray parameters; {label!r} is {type(value)}")
        if value.positional_shape:
            raise ValueError(f"muon needs fully named parameters; {label!r} has positional axes")
    return optax.chain(
        *_clip(cfg),
        on_data_arrays(
            optax.contrib.muon(
                schedule,
                adam_b1=cfg.b1,
                adam_b2=cfg.b2,
                weight_decay=cfg.weight_decay,
                adam_weight_decay=cfg.weight_decay,
                muon_weight_dimension_numbers=muon_dimensions(params),
            )
        ),
    )


def modula_optimizer(cfg: OptimConfig, schedule: optax.Schedule, model_config, params: Params):
    """The modular-norm optimizer (`modula.optimizer`) on the DiT's modular description
    (`jif.well_normed.dit_module`): dualised, well-normed updates."""
    return optax.chain(
        *_clip(cfg),
        modula.optimizer(
            schedule,
            module=well_normed.dit_module(model_config, params, blocks_mass=cfg.blocks_mass),
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        ),
    )


def mup_adamw(cfg: OptimConfig, schedule: optax.Schedule, model_config, params: Params):
    """AdamW with muP per-layer learning rates (`jif.mup.mup_adamw`)."""
    return optax.chain(
        *_clip(cfg),
        mup.mup_adamw(
            schedule,
            model_config=model_config,
            params=params,
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=cfg.weight_decay,
        ),
    )


OPTIMIZERS: dict[str, Builder] = {
    "adamw": adamw,
    "schedule_free": schedule_free,
    "muon": muon,
    "modula": modula_optimizer,
    "mup_adamw": mup_adamw,
}


# Each optimizer's peak learning rate when --lr is not given: adamw's tuned for the default
# run; muon's as measured in docs/training.md; modula's is the 1600-step transfer sweep's
# optimum (its best grid point at widths 32-128 on every seed), which beat 0.2 and 0.3 on the
# cpu preset's run too (docs/training.md); schedule_free and mup_adamw start from adamw's
# (untuned). With modula the DiT is the well-normed one (PREFERRED_ARCH).
DEFAULT_LR = {"adamw": 3e-3, "schedule_free": 3e-3, "muon": 0.02, "modula": 0.1, "mup_adamw": 3e-3}
PREFERRED_ARCH = {"modula": "modula"}

# DEFAULT_LR holds at LR_WIDTH, the cpu preset's width, where it was tuned. Other widths (the
# accelerator presets, --d-model) carry it over by the transfer sweep's result rather than a
# re-tuning: standard AdamW's optimum drifts as width ** slope (docs/transfer/summary.json,
# every seed's slope -0.83..-0.80; a test keeps the two equal); Modula and muP (base width
# LR_WIDTH) keep it, as their parameterisations claim. The others have no transfer result.
LR_WIDTH = 128
LR_WIDTH_SLOPE = {"adamw": -0.81}


def default_lr(optimizer: str, d_model: int) -> float:
    """The optimizer's default peak learning rate for a model of width d_model."""
    name = canonical_name(optimizer)
    return DEFAULT_LR[name] * (d_model / LR_WIDTH) ** LR_WIDTH_SLOPE.get(name, 0.0)


def canonical_name(name: str) -> str:
    """'schedule-free' and 'schedule_free' name the same optimizer."""
    return name.replace("-", "_").lower()


def make_optimizer(
    cfg: OptimConfig, steps: int, model_config, params: Params
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer named by cfg.optimizer for a run of `steps` steps, and its schedule."""
    cfg = cfg.resolved(getattr(model_config, "d_model", None))
    schedule = make_schedule(cfg, steps)  # validates cfg
    return OPTIMIZERS[canonical_name(cfg.optimizer)](cfg, schedule, model_config, params), schedule


def eval_params(opt_state: Any, params: Params) -> Params:
    """Parameters to evaluate: schedule-free's averaged iterate where that optimizer is used
    (found anywhere in a chain's state), else `params` unchanged."""
    is_sf = lambda s: isinstance(s, optax.contrib.ScheduleFreeState)
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=is_sf):
        if is_sf(leaf):
            return optax.contrib.schedule_free_eval_params(leaf, params)
    return params
