"""Batched sweep runs: every learning rate and seed of one (parameterisation, width, depth)
trained as one compiled program.

The runs of a group share the model shape, so their train states stack along a leading run
axis and `jax.vmap` turns the sweep's train step (`jif.loop.make_train_step`, the learning
rate held in the optimizer state as data, as in `transfer.runs.CompiledRuns`) into one step
of all of them. Each run keeps its own initial weights, data order and noise (its seed), and
its own learning rate; every step sees each run's own batch. At the small widths of a sweep
one big program keeps the CPU's matmul units far busier than many small ones.

Results equal training each run alone up to float rounding (tests/test_batched.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jif import checkpoint as ckpt
from jif import eval as jif_eval
from jif import loop, optim, train
from transfer import runs

if TYPE_CHECKING:  # annotations only: the sweep imports this module
    from transfer.sweep import SweepConfig


def _stack(trees: list):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n: int) -> list:
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(n)]


class BatchedRuns(runs.CompiledRuns):
    """A run function for `transfer.runs.run_sweep` that trains a whole group at once
    (`run_group`); calling it on one spec trains a group of one."""

    def _batched_step(self, spec: runs.RunSpec, config: SweepConfig):
        key = ("batched", spec.optimizer, spec.width, spec.depth, id(config))
        if key not in self._shared:
            tokenizer, _, _ = self._data(config, spec.seed)
            cfg = runs.train_config_for(dataclasses.replace(spec, lr=1.0), config)
            model_config = train.resolve_model_config(cfg, tokenizer.vocab_size)
            unbound, params = ckpt.init_model(model_config, cfg.seed)
            tx, _ = optim.make_optimizer(cfg.optim, cfg.steps, model_config, params)
            tx = optax.chain(tx, *runs.embed_scale(spec, config, params), runs.scale_by_state_lr())
            step = loop.make_train_step(  # as CompiledRuns: no EMA, no guard
                unbound, tx, seed=None, ema=None, mask_id=tokenizer.mask_id, guard=False
            )
            self._shared[key] = dict(
                model_config=model_config, unbound=unbound, tx=tx, step=jax.jit(jax.vmap(step))
            )
        return self._shared[key]

    def run_group(self, specs: list[runs.RunSpec], config: SweepConfig) -> list[dict]:
        """Trains `specs` (one optimizer, width and depth; any learning rates and seeds)
        together; one result dict per spec, as `CompiledRuns.__call__` returns, with the
        group's steps_s (the runs train together) in each."""
        shapes = {(s.optimizer, s.width, s.depth) for s in specs}
        if len(shapes) != 1:
            raise ValueError(f"a batched group needs one optimizer, width and depth, got {shapes}")
        g = self._batched_step(specs[0], config)
        states, batches = [], []
        for spec in specs:
            _, train_batches, _ = self._data(config, spec.seed)
            _, params = ckpt.init_model(g["model_config"], spec.seed)
            state = loop.init_state(params, g["tx"], ema=False)
            lr = runs._LrState(jnp.asarray(spec.lr, jnp.float32))
            state["opt_state"] = (*state["opt_state"][:-1], lr)
            states.append({**state, "key": jax.random.key(spec.seed)})
            batches.append(np.stack(train_batches))
        state, data = _stack(states), np.stack(batches, axis=1)  # data [steps, runs, B, L]
        n = len(specs)
        finite = np.ones(n, bool)
        smoothed = np.full(n, np.nan)
        started = None
        for t in range(data.shape[0]):
            state, metrics = g["step"](state, data[t])
            ok, loss = np.asarray(metrics["finite"]), np.asarray(metrics["loss"], np.float64)
            finite &= ok
            smoothed = np.where(np.isnan(smoothed), loss, 0.95 * smoothed + 0.05 * loss)
            if started is None:
                started = time.perf_counter()  # the first step compiles: not in steps_s
        steps_s = time.perf_counter() - started if data.shape[0] > 1 else math.nan
        results = []
        for k, (spec, params) in enumerate(zip(specs, _unstack(state["params"], n), strict=True)):
            if not finite[k]:
                results.append(
                    {
                        "val_nelbo": math.nan,
                        "train_loss_smoothed": math.nan,
                        "diverged": True,
                        "steps_s": steps_s,
                    }
                )
                continue
            tokenizer, _, val = self._data(config, spec.seed)
            model = ckpt.bind_params(g["unbound"], params)
            nelbo = jif_eval.val_nelbo(
                model, val, mask_id=tokenizer.mask_id, n_times=config.eval_times
            )
            results.append(
                {
                    "val_nelbo": nelbo["nelbo"],
                    "train_loss_smoothed": float(smoothed[k]),
                    "diverged": False,
                    "steps_s": steps_s,
                }
            )
        return results

    def __call__(self, spec: runs.RunSpec, config: SweepConfig) -> dict:
        return self.run_group([spec], config)[0]
