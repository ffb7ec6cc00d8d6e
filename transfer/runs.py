"""What one run of a sweep is and how it is trained: parameterisations, run specs, engines.

`transfer/sweep.py` builds the grid and records one CSV row per run; this module turns a
grid point (`RunSpec`) into a jif.train config (`train_config_for`) and trains it with one
of the `RUNNERS`: "compiled" (`CompiledRuns`: one compiled step per shape, the learning rate
as data) or "train_run" (a full `jif.train.run` per point). `transfer/coord_check.py` trains
with the same CompiledRuns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import eval as jif_eval
from jif import loop, optim, train
from jif.tokenizer import load_tokenizer

if TYPE_CHECKING:  # annotations only: the sweep imports this module
    from transfer.sweep import SweepConfig

# Settings that must match between a resumed sweep and its CSV (the grid may grow).
RUN_SETTINGS = (
    "steps",
    "batch_size",
    "seq_len",
    "head_dim",
    "mup_base_width",
    "data",
    "eval_sequences",
    "eval_times",
    "engine",
    "embed_lr_mult",
    "min_lr_ratio",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parameterisation:
    """How one curve family is trained."""

    arch: str
    """ModelConfig.arch."""
    optimizer: str
    """jif.optim.OPTIMIZERS key."""
    mup: bool
    """Whether ModelConfig.mup_base_width is set."""
    lr_range: tuple[float, float]
    """Default (smallest, largest) learning rate of the log grid."""


# Each range is centred on its parameterisation's optimum in an earlier sweep, so that a grid
# point lands near it and its neighbours, a factor 3.16 away, can show a basin
# (docs/transfer.md): AdamW's drifts across 3e-3; muP's seeds found 5e-3..1.3e-2 and Modula's
# 0.095..0.15 at 1600 steps.
PARAMETERISATIONS: dict[str, Parameterisation] = {
    "adamw": Parameterisation(arch="standard", optimizer="adamw", mup=False, lr_range=(3e-4, 3e-2)),
    "mup_adamw": Parameterisation(
        arch="standard", optimizer="mup_adamw", mup=True, lr_range=(7.5e-4, 7.5e-2)
    ),
    "modula": Parameterisation(arch="modula", optimizer="modula", mup=False, lr_range=(1e-2, 1.0)),
    # Modula with the reference library's 1/3 on attention's output (not in the default grid).
    "modula_ref": Parameterisation(
        arch="modula_ref", optimizer="modula", mup=False, lr_range=(3e-2, 3.0)
    ),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One training run of the grid."""

    optimizer: str
    width: int
    depth: int
    lr: float
    seed: int

    def key(self) -> tuple[str, int, int, str, int]:
        return (self.optimizer, self.width, self.depth, f"{self.lr:.6g}", self.seed)


def train_config_for(spec: RunSpec, config: SweepConfig) -> train.TrainConfig:
    """The jif.train.TrainConfig of one run (nothing written to disk)."""
    p = PARAMETERISATIONS[spec.optimizer]
    return train.TrainConfig(
        d_model=spec.width,
        n_layers=spec.depth,
        n_heads=spec.width // config.head_dim,
        arch=p.arch,
        mup_base_width=config.mup_base_width if p.mup else None,
        data=config.data,
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        optim=optim.OptimConfig(
            optimizer=p.optimizer,
            lr=spec.lr,
            # AdamW only (jif.optim.adamw); muP's is applied by `embed_scale` (CompiledRuns).
            embed_lr_mult=config.embed_lr_mult if p.optimizer == "adamw" else 1.0,
            warmup=max(1, config.steps // 10),
            min_lr_ratio=config.min_lr_ratio,
        ),
        seed=spec.seed,
        out=None,
        ckpt_every=0,
        eval=jif_eval.EvalConfig(
            eval_every=config.steps,  # evaluate once, at the end
            eval_sequences=config.eval_sequences,
            eval_times=config.eval_times,
            n_samples=0,
        ),
        progress=False,
    )


def train_run(spec: RunSpec, config: SweepConfig) -> dict:
    """Trains one grid point with jif.train.run; a non-finite loss counts as diverged."""
    with contextlib.redirect_stdout(io.StringIO()):  # keep the grid's progress bar readable
        result = train.run(train_config_for(spec, config), progress=False)
    nan_if_none = lambda v: math.nan if v is None else float(v)
    return {
        "val_nelbo": nan_if_none(result.get("val_nelbo")),
        "train_loss_smoothed": nan_if_none(result.get("train_loss_smoothed")),
        "diverged": bool(result.get("diverged", False)),
    }


def embed_scale(spec: RunSpec, config: SweepConfig, params) -> list[optax.GradientTransformation]:
    """muP AdamW's fixed embedding multiplier (`SweepConfig.embed_lr_mult`), applied after the
    optimizer (exact: every step is linear in its learning rate); [] for the others (AdamW's
    is in its OptimConfig, Modula normalises each layer's step itself)."""
    if spec.optimizer != "mup_adamw" or config.embed_lr_mult == 1.0:
        return []
    return [optim.scale_labels({k: config.embed_lr_mult for k in params if k.endswith("/embed")})]


RunFn = Callable[[RunSpec, Any], dict]  # (spec, SweepConfig) -> outcome


class _LrState(NamedTuple):
    lr: Any  # float32 scalar, part of the optimizer state so it is data, not a constant


def scale_by_state_lr() -> optax.GradientTransformation:
    """Multiplies updates by the learning rate held in the state (set per run, traced)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: u * state.lr.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: _LrState(jnp.ones((), jnp.float32)), update)


class CompiledRuns:
    """The default run function: trains like jif.train.run (same model, optimizer registry,
    schedule, clipping, data order and train step, `jif.loop`), but compiles the step once
    per (optimizer, width, depth, seed) and passes the learning rate as data.

    This is exact because every optimizer swept is linear in its learning rate (AdamW, muP
    AdamW and Modula all end in scale_by_learning_rate, weight decay included): the optimizer
    is built with lr = 1 and its updates are multiplied by the run's lr. The final *raw*
    parameters are evaluated (an EMA lags far behind in runs this short).
    """

    def __init__(self):
        self._groups: dict[tuple, dict] = {}
        self._shared: dict[tuple, Any] = {}

    def _data(self, config: SweepConfig, seed: int):
        key = ("data", seed, *(getattr(config, n) for n in RUN_SETTINGS))
        if key not in self._shared:
            tokenizer = load_tokenizer()
            batches = data_lib.TokenBatches(
                config.data,
                tokenizer,
                split="train",
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                seed=seed,
            )
            train_batches = [next(batches) for _ in range(config.steps)]
            val = data_lib.validation_tokens(
                config.data,
                tokenizer,
                seq_len=config.seq_len,
                n_sequences=config.eval_sequences,
                seed=seed,
            )
            self._shared[key] = (tokenizer, train_batches, jif_eval.batched(val, config.batch_size))
        return self._shared[key]

    def _group(self, spec: RunSpec, config: SweepConfig) -> dict:
        key = (spec.optimizer, spec.width, spec.depth, spec.seed, id(config))
        if key not in self._groups:
            tokenizer, _, _ = self._data(config, spec.seed)
            cfg = train_config_for(dataclasses.replace(spec, lr=1.0), config)
            model_config = train.resolve_model_config(cfg, tokenizer.vocab_size)
            unbound, params = ckpt.init_model(model_config, cfg.seed)
            tx, _ = optim.make_optimizer(cfg.optim, cfg.steps, model_config, params)
            tx = optax.chain(tx, *embed_scale(spec, config, params), scale_by_state_lr())
            step = loop.make_train_step(  # raw weights evaluated; a non-finite step ends the run
                unbound, tx, seed=cfg.seed, ema=None, mask_id=tokenizer.mask_id, guard=False
            )
            self._groups = {key: dict(unbound=unbound, params=params, tx=tx, step=jax.jit(step))}
        return self._groups[key]

    def train(
        self,
        spec: RunSpec,
        config: SweepConfig,
        snapshots: Callable[[int, Any], None] | None = None,
    ) -> tuple[Any, dict]:
        """Trains one run: (final parameters or None if diverged, outcome without val_nelbo).
        snapshots(done, params), if given, is called after every step (done = steps taken).
        The outcome's steps_s is the time of every step after the first (which may compile),
        the sweep benchmark's steady-state measure (NaN with one step)."""
        _, batches, _ = self._data(config, spec.seed)
        g = self._group(spec, config)
        state = loop.init_state(g["params"], g["tx"], ema=False)
        opt_state = state["opt_state"]
        state["opt_state"] = (*opt_state[:-1], _LrState(jnp.asarray(spec.lr, jnp.float32)))
        last = started = None
        try:
            for s in loop.steps(g["step"], state, iter(batches), start=0, stop=len(batches)):
                last = s
                if started is None:
                    started = time.perf_counter()
                if snapshots is not None:
                    snapshots(s.done, s.state["params"])
        except loop.Diverged:
            steps_s = time.perf_counter() - started if started is not None else math.nan
            return None, {"train_loss_smoothed": math.nan, "diverged": True, "steps_s": steps_s}
        steps_s = time.perf_counter() - started if len(batches) > 1 else math.nan
        outcome = {"train_loss_smoothed": last.smoothed, "diverged": False, "steps_s": steps_s}
        return last.state["params"], outcome

    def init_params(self, spec: RunSpec, config: SweepConfig) -> tuple[Any, dict]:
        """(unbound model, initial parameters) of the run's shape and seed."""
        g = self._group(spec, config)
        return g["unbound"], g["params"]

    def __call__(self, spec: RunSpec, config: SweepConfig) -> dict:
        params, outcome = self.train(spec, config)
        if params is None:
            return {"val_nelbo": math.nan, **outcome}
        tokenizer, _, val = self._data(config, spec.seed)
        model = ckpt.bind_params(self._group(spec, config)["unbound"], params)
        result = jif_eval.val_nelbo(
            model, val, mask_id=tokenizer.mask_id, n_times=config.eval_times
        )
        return {"val_nelbo": result["nelbo"], **outcome}


RUNNERS: dict[str, Callable[[], RunFn]] = {
    "compiled": CompiledRuns,
    "train_run": lambda: train_run,
}


def unigram_log_probs(config: SweepConfig, n_tokens: int = 1 << 18) -> np.ndarray:
    """log q [vocab]: the unigram distribution of `n_tokens` training tokens (seed 0), with
    add-one smoothing over the vocabulary; the mask token gets probability 0 (log 1e-300)."""
    tokenizer = load_tokenizer()
    batches = data_lib.TokenBatches(
        config.data, tokenizer, split="train", batch_size=64, seq_len=config.seq_len, seed=0
    )
    counts = np.zeros(tokenizer.vocab_size, np.float64)
    for _ in range(max(1, n_tokens // (64 * config.seq_len))):
        counts += np.bincount(np.asarray(next(batches)).ravel(), minlength=tokenizer.vocab_size)
    counts += 1.0
    counts[tokenizer.mask_id] = 0.0
    return np.log(np.maximum(counts, 1e-300) / counts.sum())


def unigram_plateau(config: SweepConfig) -> float:
    """The loss of a model that ignores its input: the cross-entropy (nats/token) of the
    sweep's validation tokens (seed 0) under the training unigram (`unigram_log_probs`).

    For a predictor that outputs one distribution q at every masked position, the MDLM NELBO
    per token is the mean of -log q(x) (the weight 1/t cancels the masked share t), so this
    is the plateau a sweep's runs must leave (tests/test_transfer.py checks it)."""
    val = data_lib.validation_tokens(
        config.data,
        load_tokenizer(),
        seq_len=config.seq_len,
        n_sequences=config.eval_sequences,
        seed=0,
    )
    return float(-np.mean(unigram_log_probs(config)[np.asarray(val)]))
