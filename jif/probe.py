"""Train the interference probe of a checkpoint (the model frozen) and store it beside it.

    python -m jif.probe --checkpoint runs/x                 # -> runs/x/probe/
    python -m jif.probe --checkpoint runs/x --dim 16 --windows 1024 --steps 2000

The probe is W [d_model, dim]: position i's final-layer activations h_i (`jif.model.
apply_features`, the network up to its readout) map to e_i = h_i W, and e_i . e_j is
trained to predict how many nats revealing position i lowers the cross-entropy of the true
token at another masked position j. Measurements: training windows masked at a random
rate t ~ U(0.1, 1); a random group of `--groups` sizes among the masked positions is
revealed (set to its true tokens) and the model run again; the drop in cross-entropy at
every other masked position j is the target for e_j . sum over the group of e_i (the
activations are those before the reveal, what the sampler sees). The fit (Adam, squared
error) holds out a fifth of the windows and reports R^2 there, next to a baseline that
predicts the drop from the distances to the group alone (a least-squares table by
distance). `jif.interference` loads the result for the "interference" sampler. This is
not jif.probes (the named probes of evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tqdm import tqdm

from jif import hostmem, interference, objectives, windows
from jif.checkpoint import load_for_inference


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Options of `python -m jif.probe`."""

    checkpoint: str
    """Run folder (its newest checkpoint) or one step folder (a masked diffusion model)."""
    dim: int = 16
    """Dimension of the probe's embedding space."""
    windows: int = 1024
    """Training windows of the checkpoint's data (train split); a fifth is held out."""
    groups: tuple[int, ...] = (1, 2, 4, 8)
    """Sizes of the groups revealed per window, in turn."""
    batch_size: int = 32
    """Windows per network call while measuring."""
    steps: int = 2000
    """Optimiser steps of the fit (64 windows each)."""
    lr: float = 1e-2
    """Adam's learning rate."""
    seed: int = 0
    """Which windows, masks, groups and initial probe."""
    out: str | None = None
    """Where to store it; default <run>/probe, where the sampler looks."""
    ema: bool = True
    """Probe the EMA weights (--no-ema for the raw weights; sample with the same)."""
    progress: bool = True
    """Show progress bars (--no-progress hides them)."""

    def validate(self) -> ProbeConfig:
        for name, lo in (("dim", 1), ("windows", 10), ("batch_size", 1), ("steps", 1)):
            if getattr(self, name) < lo:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}={getattr(self, name)}: must be at least {lo}.")
        if not self.groups or min(self.groups) < 1:
            raise ValueError(f"--groups {self.groups}: give one or more sizes >= 1, e.g. 1 2 4.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr={self.lr}: must be a finite number > 0.")
        return self


@functools.partial(jax.jit, static_argnames=("group", "mask_id"))
def measure(model, tokens, key, *, group: int, mask_id: int):
    """One batch of windows int32 [B, L]: (activations before [B, L, d], group bool [B, L],
    targets bool [B, L], drop in cross-entropy at the targets float32 [B, L] (0 elsewhere))."""
    k_t, k_mask, k_group = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (tokens.shape[0], 1), minval=0.1, maxval=1.0)
    masked = (jax.random.uniform(k_mask, tokens.shape) < t).at[:, 0].set(False)  # BOS stays
    order = jnp.where(masked, jax.random.uniform(k_group, tokens.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(order, axis=1), axis=1)
    size = jnp.minimum(group, jnp.sum(masked, axis=1, keepdims=True) - 1)  # one target left
    revealed = masked & (rank < size)
    xt = jnp.where(masked, mask_id, tokens)
    h, logits = interference.features_and_logits(model, xt, mask_id)
    _, logits_after = interference.features_and_logits(
        model, jnp.where(revealed, tokens, xt), mask_id
    )
    ce = lambda z: -jnp.take_along_axis(jax.nn.log_softmax(z), tokens[..., None], -1)[..., 0]
    targets = masked & ~revealed
    return h, revealed, targets, jnp.where(targets, ce(logits) - ce(logits_after), 0.0)


def predict(w, h, revealed):
    """e_j . sum over the revealed i of e_i, float32 [B, L]."""
    e = h @ w
    return jnp.einsum("blk,bk->bl", e, jnp.einsum("blk,bl->bk", e, revealed.astype(e.dtype)))


def r_squared(pred, drop, targets) -> float:
    t = np.asarray(targets)
    y, p = np.asarray(drop)[t], np.asarray(pred)[t]
    return float(1.0 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))


def distance_features(revealed: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[n_targets, L]: for each target j, how many revealed positions lie at each |i - j|."""
    length = revealed.shape[1]
    rows, cols = np.nonzero(targets)
    out = np.zeros((len(rows), length), np.float32)
    for n, (b, j) in enumerate(zip(rows, cols, strict=True)):
        np.add.at(out[n], np.abs(np.flatnonzero(revealed[b]) - j), 1.0)
    return out


def fit(cfg: ProbeConfig, h, revealed, targets, drop) -> tuple[np.ndarray, dict]:
    """Adam on the squared error over the first 4/5 of the windows; R^2 on the rest."""
    n_train = len(h) * 4 // 5
    w = (
        0.1
        * jax.random.normal(jax.random.key(cfg.seed), (h.shape[-1], cfg.dim))
        / math.sqrt(h.shape[-1])
    )
    opt = optax.adam(cfg.lr)

    @jax.jit
    def update(w, state, idx):
        def loss(w):
            err = predict(w, h[idx], revealed[idx]) - drop[idx]
            return jnp.sum(jnp.where(targets[idx], err**2, 0.0)) / jnp.sum(targets[idx])

        value, grad = jax.value_and_grad(loss)(w)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(w, updates), state, value

    state, rng = opt.init(w), np.random.default_rng(cfg.seed)
    for _ in tqdm(range(cfg.steps), desc="fit", disable=not cfg.progress, dynamic_ncols=True):
        w, state, value = update(w, state, rng.integers(0, n_train, min(64, n_train)))
    test = slice(n_train, None)
    r2 = r_squared(predict(w, h[test], revealed[test]), drop[test], targets[test])
    rev, tgt = np.asarray(revealed), np.asarray(targets)
    x_train, x_test = (
        distance_features(rev[:n_train], tgt[:n_train]),
        distance_features(rev[test], tgt[test]),
    )
    y = np.asarray(drop)
    table = np.linalg.lstsq(x_train, y[:n_train][tgt[:n_train]], rcond=None)[0]
    y_test = y[test][tgt[test]]
    base = 1.0 - np.sum((y_test - x_test @ table) ** 2) / np.sum((y_test - y_test.mean()) ** 2)
    return np.asarray(w), {
        "held_out_r2": r2,
        "distance_baseline_r2": float(base),
        "train_loss": float(value),
        "mean_drop_nats": float(y_test.mean()),
        "n_train_windows": n_train,
        "n_held_out_windows": len(h) - n_train,
        "n_held_out_targets": int(tgt[test].sum()),
    }


def run(cfg: ProbeConfig, command: str = "") -> dict:
    """Measure, fit and store the probe; returns its meta (also written to probe.json)."""
    cfg.validate()
    start = time.perf_counter()
    loaded = load_for_inference(cfg.checkpoint, ema=cfg.ema)
    if objectives.objective_of(loaded.config) != "mdlm":
        raise ValueError(
            f"{loaded.path} is an autoregressive checkpoint; the interference probe is for "
            "masked diffusion models (python -m jif.train, the default objective)."
        )
    tok, length = loaded.tokenizer, int(loaded.config.get("seq_len", 128))
    rows, data = windows.eval_windows(
        loaded.data,
        tok,
        split="train",
        seq_len=length,
        n_sequences=cfg.windows,
        seed=cfg.seed,
        packing=loaded.config.get("packing", "pack"),
    )
    parts = []
    batches = range(0, len(rows), cfg.batch_size)
    for n, i in enumerate(tqdm(batches, desc="measure", disable=not cfg.progress)):
        key = jax.random.fold_in(jax.random.key(cfg.seed), n)
        group = cfg.groups[n % len(cfg.groups)]
        batch = jnp.asarray(rows[i : i + cfg.batch_size])
        parts.append(measure(loaded.model, batch, key, group=group, mask_id=tok.mask_id))
    h, revealed, targets, drop = (jnp.concatenate(p) for p in zip(*parts, strict=True))
    weights, stats = fit(cfg, h, revealed, targets, drop)
    folder = cfg.out or interference.default_probe_dir(loaded.path)
    meta = {
        "checkpoint": loaded.path,
        "step": loaded.step,
        "ema": cfg.ema,
        "d_model": int(h.shape[-1]),
        "dim": cfg.dim,
        "data": data,
        "groups": list(cfg.groups),
        "windows": len(rows),
        "fit_steps": cfg.steps,
        "lr": cfg.lr,
        **stats,
        "seconds": time.perf_counter() - start,
        "command": command,
    }
    interference.save_probe(folder, weights, meta)
    meta["folder"] = folder
    return meta


def main(argv: list[str] | None = None) -> dict:
    """The CLI (see --help). Exits with status 2 and `error: ...` on a user mistake."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    cfg = tyro.cli(ProbeConfig, args=argv, description=__doc__)
    try:
        meta = run(cfg, "python -m jif.probe " + " ".join(sys.argv[1:] if argv is None else argv))
    except ValueError as e:  # bad options or checkpoint (CheckpointError), no data
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"probe (dim {meta['dim']}) of {meta['checkpoint']} (step {meta['step']}) -> "
        f"{meta['folder']}: held-out R^2 {meta['held_out_r2']:.3f} (distance alone "
        f"{meta['distance_baseline_r2']:.3f}), mean drop {meta['mean_drop_nats']:.4f} nats, "
        f"{meta['seconds']:.0f} s"
    )
    print(json.dumps({k: meta[k] for k in ("held_out_r2", "distance_baseline_r2")}))
    return meta


if __name__ == "__main__":
    main()
