"""Train a masked diffusion language model (MDLM objective, penzai DiT).

    python -m jif.train                                    # cpu preset, embedded stories
    python -m jif.train --preset tiny --steps 2 --batch-size 4 --seq-len 32 --out runs/x
    python -m jif.train --data TinyStories-valid.txt --steps 50
    python -m jif.train --out runs/x --resume              # continue a run
    python -m jif.train --help                             # every flag, from TrainConfig

One jitted `train_step(state, batch) -> (state, metrics)` inside a plain Python loop.
Every step's randomness is derived from (seed, step) and the data position is checkpointed,
so a run killed at any point and resumed reaches bitwise the same weights (on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jif import checkpoint as ckpt
from jif import diffusion, hostmem, optim, sharding
from jif import model as model_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on (stored as config.json and in every checkpoint)."""

    # --- model
    preset: str = "cpu"
    """Model preset: tiny, cpu, small, medium, big (jif.model.PRESETS)."""
    d_model: int | None = None
    """Override the preset's width."""
    n_layers: int | None = None
    """Override the preset's depth."""
    n_heads: int | None = None
    """Override the preset's number of attention heads."""
    arch: str | None = None
    """Override the architecture: standard or modula."""
    adaln: bool | None = None
    """Override adaLN conditioning on the noise level (off by default, as in MDLM)."""
    mup_base_width: int | None = None
    """muP base width (None: no muP)."""
    dtype: str = "float32"
    """Parameter and activation dtype: float32 or bfloat16 (for accelerators)."""
    # --- data
    data: str = "stories"
    """Training text: stories (embedded grammar), tinystories (HF hub) or a file path."""
    n_bpe: int = 2048
    """Tokenizer size: the first n_bpe GPT-2 ids (plus end-of-text and mask tokens)."""
    batch_size: int = 16
    """Sequences per step (global, over all devices)."""
    seq_len: int = 128
    """Tokens per sequence."""
    packing: str = "pack"
    """How documents fill sequences (jif.data): pack (windows of the joined stream), align
    (each sequence starts at a document, the stream packed after it) or pad (one each)."""
    # --- optimisation
    steps: int = 6000
    """Training steps."""
    optimizer: str = "adamw"
    """adamw, schedule_free, muon, modula or mup_adamw (jif.optim.OPTIMIZERS)."""
    lr: float = 3e-3
    """Peak learning rate."""
    embed_lr_mult: float = 100.0
    """adamw: learning rate of the embedding table as a multiple of lr (its N(0, 1) entries
    move lr per step, far slower relative to their size than the 1/sqrt(d) hidden weights)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine (to min_lr_ratio * lr) or constant."""
    warmup: int = 100
    """Linear warmup steps (at most half the run)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.98
    """Adam second-moment decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices."""
    clip: float = 10.0
    """Clip the global gradient norm at this value (0: no clipping)."""
    ema: float = 0.995
    """Decay of the moving average of the weights used for evaluation and samples (warmed
    up as min(ema, (1 + step) / (10 + step)))."""
    seed: int = 0
    """Seed of the initial weights, the data order and every step's noise."""
    # --- output
    out: str | None = None
    """Run folder. "auto": runs/<preset>-<data>[-N]. None: write nothing (Python API)."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint (starts fresh if it has none)."""
    ckpt_every: int = 1000
    """Checkpoint every N steps and at the end (0: never)."""
    keep: int = 3
    """Keep the newest K checkpoints."""
    eval_every: int = 1000
    """Validation NELBO and samples every N steps and at the end (0: never)."""
    eval_sequences: int = 64
    """Number of fixed validation sequences."""
    eval_times: int = 8
    """Number of fixed noise levels of the validation NELBO."""
    n_samples: int = 4
    """Samples decoded at each evaluation."""
    sample_steps: int = 128
    """Denoising steps per sample."""
    sample_method: str = "confidence"
    """Sampler of those samples (jif.sampling.METHODS): confidence-ordered unmasking by default."""
    sample_temperature: float = 1.0
    """Temperature of those samples (0: argmax)."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    # --- machine
    mesh: str | None = None
    """Device mesh DxM over ("data", "model"), e.g. 4x2 (None: one device)."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host; also JIF_DISTRIBUTED=1)."""
    show_model: bool = False
    """Print the model with treescope (and save model.html in the run folder)."""
    tensorboard: bool = False
    """Also log scalars to TensorBoard (needs tensorboardX)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb)."""
    progress: bool = True
    """Show a tqdm progress bar."""


# ----------------------------------------------------------------------------- setup


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> model_lib.ModelConfig:
    """The preset with the config's overrides (None fields keep the preset's value)."""
    return model_lib.make_config(
        cfg.preset,
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        arch=cfg.arch,
        adaln=cfg.adaln,
        mup_base_width=cfg.mup_base_width,
        dtype=cfg.dtype,
    )


def validate(cfg: TrainConfig) -> None:
    """ValueError naming any out-of-range setting."""
    positive = ("batch_size", "seq_len", "n_bpe", "eval_sequences", "eval_times", "log_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("steps", "ckpt_every", "eval_every", "keep", "warmup", "n_samples"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"--ema must be in [0, 1), got {cfg.ema}")
    if optim.canonical_name(cfg.optimizer) not in optim.OPTIMIZERS:
        raise ValueError(
            f"--optimizer {cfg.optimizer!r} is unknown; choose one of {sorted(optim.OPTIMIZERS)}"
        )
    if cfg.schedule not in optim.SCHEDULES:
        raise ValueError(f"--schedule {cfg.schedule!r}: choose one of {sorted(optim.SCHEDULES)}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {cfg.dtype!r}: choose float32 or bfloat16")
    if cfg.mesh:
        sharding.parse_mesh(cfg.mesh)
    if cfg.sample_temperature < 0:
        raise ValueError(f"--sample-temperature must be >= 0, got {cfg.sample_temperature}")
    if cfg.n_samples:
        from jif import sampling

        if cfg.sample_method not in sampling.METHODS:
            raise ValueError(
                f"--sample-method {cfg.sample_method!r} is unknown; choose one of "
                f"{sorted(sampling.METHODS)}"
            )


def _data_name(data: str) -> str:
    base = os.path.basename(os.path.normpath(data))
    return os.path.splitext(base)[0] or "data"


def resolve_out(cfg: TrainConfig) -> str | None:
    """The run folder: "auto" -> runs/<preset>-<data>, suffixed -2, -3... to stay new (or,
    with --resume, the newest existing one)."""
    if cfg.out != "auto":
        return cfg.out
    base = os.path.join("runs", f"{cfg.preset}-{_data_name(cfg.data)}")
    taken = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    existing = [p for p in taken if os.path.exists(p)]
    if cfg.resume and existing:
        return existing[-1]
    return next(p for p in taken if not os.path.exists(p))


# Nameplate peaks (dense bf16 FLOP/s per device) for MFU on accelerators.
ACCELERATOR_PEAKS = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


@functools.cache
def measure_peak_flops(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the machine: the accelerator's known peak (times the device count), or on
    CPU the best time of a jitted n x n float32 matmul (the "100%" of MFU here)."""
    devices = jax.devices()
    kind = devices[0].device_kind
    for name, peak in ACCELERATOR_PEAKS.items():
        if name.lower() in kind.lower():
            return peak * len(devices)
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- the step


def make_train_step(unbound, tx: optax.GradientTransformation, cfg: TrainConfig, mask_id: int):
    """train_step(state, batch int32 [B, L]) -> (state, metrics); state = {"params", "ema",
    "opt_state", "step"}. The step's key is fold_in(key(seed), step)."""
    base_key = jax.random.key(cfg.seed)

    def loss_fn(params, batch, key):
        model = ckpt.bind_params(unbound, params)
        k_t, k_mask = jax.random.split(key)
        t = diffusion.sample_t(k_t, batch.shape[0])
        features_fn = lambda xt, mask_rate: model_lib.apply_features(model, xt, mask_rate)
        readout_fn = lambda h: model_lib.apply_readout(model, h)  # at masked positions only
        return diffusion.mdlm_loss(
            features_fn, batch, t, k_mask, mask_id=mask_id, readout_fn=readout_fn
        )

    def train_step(state, batch):
        key = jax.random.fold_in(base_key, state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # The EMA averages the weights that are evaluated (schedule-free: its averaged iterate).
        # Decay warms up as min(ema, (1 + step) / (10 + step)) so that short runs do not
        # evaluate mostly the initial weights (0.995 ** 100 = 0.6).
        target = optim.eval_params(opt_state, params)
        decay = jnp.minimum(cfg.ema, (1.0 + state["step"]) / (10.0 + state["step"]))
        ema = jax.tree_util.tree_map(
            lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state["ema"], target
        )
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
        new_state = {
            "params": params,
            "ema": ema,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------- evaluation


def evaluate(cfg, unbound, params, val_batches, tokenizer, key, probes=None, friends=None) -> dict:
    """Validation NELBO of `params` on the fixed validation set, plus decoded samples and
    (for the embedded stories) the grammar checker's scores, how well the model copies
    names (`probes`: jif.stories.NameProbes) and how often it names the friend after the
    hero (`friends`: jif.stories.FriendProbes)."""
    model = ckpt.bind_params(unbound, params)
    jitted = jax.jit(lambda m, xt, r: model_lib.apply_logits(m, xt, r))
    logits = lambda xt, r: jitted(model, xt, r)
    result = diffusion.eval_nelbo(
        logits,
        val_batches,
        mask_id=tokenizer.mask_id,
        n_times=cfg.eval_times,
        seed=0,
    )
    out = {
        "val_" + k: float(v)
        for k, v in result.items()
        if np.ndim(v) == 0 and isinstance(v, int | float | np.floating | jax.Array)
    }
    if probes is not None and len(probes.tokens):
        nats, exact = diffusion.span_scores(
            logits,
            probes.tokens,
            probes.mask,
            mask_id=tokenizer.mask_id,
        )
        out["val_name_nats"] = float(nats.mean())
        out["val_name_exact"] = float(exact.mean())
    if friends is not None and len(friends.tokens):
        logp = diffusion.span_logprob(
            logits,
            friends.tokens,
            friends.mask,
            friends.span,
            mask_id=tokenizer.mask_id,
        )
        out["val_hero_as_friend"] = float(np.exp(logp).mean())
    if cfg.n_samples > 0:
        out.update(draw_samples(cfg, model, tokenizer, key))
    return out


def draw_samples(cfg, model, tokenizer, key) -> dict:
    """A few unconditional samples (BOS + masks) decoded to text; {} without jif.sampling."""
    try:
        from jif import sampling
    except ImportError:
        return {}
    tokens = np.full((cfg.n_samples, cfg.seq_len), tokenizer.mask_id, np.int32)
    tokens[:, 0] = tokenizer.eot_id
    denoise = jax.jit(model_lib.make_denoise_fn(model, mask_id=tokenizer.mask_id))
    result = sampling.sample(
        denoise,
        key,
        jnp.asarray(tokens),
        mask_id=tokenizer.mask_id,
        steps=cfg.sample_steps,
        method=cfg.sample_method,
        temperature=cfg.sample_temperature,
    )
    texts = [tokenizer.decode(np.asarray(row)[1:].tolist()) for row in result.tokens]
    out: dict[str, Any] = {"samples": texts}
    if cfg.data == "stories":
        from jif import stories

        checks = [stories.check_text(text, window=True) for text in texts]
        n_sentences = sum(c.n_sentences for c in checks)
        out["grammar_score"] = sum(c.n_valid for c in checks) / max(n_sentences, 1)
        out["grammatical"] = sum(c.n_grammatical for c in checks) / max(n_sentences, 1)
    return out


# ----------------------------------------------------------------------------- logging


class Logger:
    """metrics.jsonl (+ optional TensorBoard / wandb); silent without a run folder."""

    def __init__(self, cfg: TrainConfig, run_dir: str | None):
        self.path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        self.tb = self.wb = None
        if run_dir and cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional extra
            except ImportError:
                raise ValueError(
                    "--tensorboard needs tensorboardX: pip install tensorboardX"
                ) from None

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        if run_dir and cfg.wandb:
            try:
                import wandb  # optional extra
            except ImportError:
                raise ValueError("--wandb needs wandb: pip install wandb") from None

            self.wb = wandb.init(project="jif", config=dataclasses.asdict(cfg), dir=run_dir)

    def log(self, row: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wb:
            self.wb.log(scalars, step=row["step"])


# ----------------------------------------------------------------------------- the run


def run(config: TrainConfig, *, progress: bool = True) -> dict:
    """Trains as configured. Returns {"val_nelbo", "train_loss_smoothed", "diverged",
    "steps", "run_dir", "losses", "final_params"...}. With out=None nothing is written."""
    if config.distributed or os.environ.get("JIF_DISTRIBUTED") == "1":
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()
    validate(config)
    cfg = dataclasses.replace(config, out=resolve_out(config))
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    # --- tokenizer, data, model
    from jif import data as data_lib
    from jif.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.n_bpe)
    model_config = resolve_model_config(cfg, tokenizer.vocab_size)
    unbound, params = ckpt.init_model(model_config, cfg.seed)
    tx, schedule = optim.make_optimizer(cfg, model_config, params)
    batches = data_lib.TokenBatches(
        cfg.data,
        tokenizer,
        split="train",
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        packing=cfg.packing,
    )
    val = data_lib.validation_tokens(
        cfg.data,
        tokenizer,
        seq_len=cfg.seq_len,
        n_sequences=cfg.eval_sequences,
        seed=cfg.seed,
        packing=cfg.packing,
    )
    val_batches = [val[i : i + cfg.batch_size] for i in range(0, len(val), cfg.batch_size)]
    probes = friends = None
    if cfg.data == "stories":
        from jif import stories

        probes = stories.name_probes(tokenizer, seq_len=cfg.seq_len, seed=cfg.seed)
        friends = stories.friend_probes(tokenizer, seq_len=cfg.seq_len, seed=cfg.seed)

    resolved = {**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_config)}
    say(json.dumps(resolved, indent=2))
    n_params = sum(int(v.data_array.size) for v in params.values())
    say(
        f"model: {n_params:,} parameters; devices: {jax.device_count()} x {jax.devices()[0].device_kind}"
    )

    # --- state (fresh, or restored from the run folder's newest checkpoint)
    state = {
        "params": jax.tree_util.tree_map(jnp.copy, params),  # donated by train_step
        "ema": jax.tree_util.tree_map(jnp.copy, params),
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    mesh = sharding.make_mesh(cfg.mesh)
    if jax.process_count() > 1 and (mesh is None or mesh.size != jax.device_count()):
        raise ValueError(
            f"{jax.process_count()} processes need a mesh over all devices: pass --mesh DxM "
            f"with D * M = {jax.device_count()} (got {cfg.mesh or 'no --mesh'})."
        )
    if mesh is not None:
        state_shardings = sharding.tree_shardings(state, mesh)
        state = jax.device_put(state, state_shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        say("sharding: " + json.dumps(sharding.describe(params, mesh), indent=1))
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        state_shardings = jax.tree_util.tree_map(lambda _: device, state)
        state = jax.device_put(state, device)
        batch_sharding = device

    run_dir = cfg.out
    manager = None
    start_step = 0
    if run_dir:
        manager = ckpt.make_manager(run_dir, keep=cfg.keep) if cfg.ckpt_every > 0 else None
        existing = ckpt.list_checkpoints(run_dir)
        if existing and not cfg.resume:
            raise ValueError(
                f"{run_dir} already holds checkpoints (newest: step {existing[0].step}). "
                "Pass --resume to continue it, or choose a new --out."
            )
        if cfg.resume and existing:
            if manager is None:
                manager = ckpt.make_manager(run_dir, keep=cfg.keep)
            step = manager.latest_step()
            abstract = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                state,
                state_shardings,
            )
            state, meta = ckpt.restore_train_state(manager, step, abstract)
            state["step"] = jax.device_put(state["step"], state_shardings["step"])
            _check_resumable(meta.get("config", {}), cfg)
            batches.restore(meta["data_state"])
            start_step = int(meta["step"])
            say(f"resumed {run_dir} at step {start_step}")
        elif cfg.resume:
            say(f"--resume: {run_dir} has no checkpoint yet, starting fresh")
        if is_main:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(resolved, f, indent=2)
            with open(os.path.join(run_dir, "tokenizer.json"), "w") as f:
                f.write(tokenizer.to_json())
    if cfg.show_model:
        model = model_lib.build_model(model_config, jax.random.key(cfg.seed))
        import treescope

        say(treescope.render_to_text(model))
        if run_dir and is_main:
            model_lib.show_model(model, os.path.join(run_dir, "model.html"))

    train_step = jax.jit(
        make_train_step(unbound, tx, cfg, tokenizer.mask_id),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    logger = Logger(cfg, run_dir if is_main else None)
    peak = measure_peak_flops()
    tokens_per_step = cfg.batch_size * cfg.seq_len  # logits at masked positions only:
    read = diffusion.readout_capacity(cfg.batch_size, cfg.seq_len) / tokens_per_step
    flops_per_step = (
        3 * model_lib.flops_per_token(model_config, cfg.seq_len, read) * tokens_per_step
    )
    say(f"peak {peak / 1e9:.0f} GFLOP/s; {flops_per_step / 1e9:.2f} GFLOP per step")

    def save(step: int, extra: dict) -> None:
        meta = {
            "step": step,
            "data": cfg.data,
            "data_state": batches.state(),
            "config": dataclasses.asdict(cfg),
            "model_config": dataclasses.asdict(model_config),
            "tokenizer": tokenizer.to_json(),
            "val_nelbo": extra.get("val_nelbo"),
            "time": time.time(),
        }
        ckpt.save(manager, state, meta)

    def do_eval(step: int) -> dict:
        row = evaluate(
            cfg,
            unbound,
            state["ema"],
            val_batches,
            tokenizer,
            jax.random.key(cfg.seed + step),
            probes,
            friends,
        )
        row = {"step": step, **row}
        logger.log(row)
        say(
            f"step {step}: val NELBO {row.get('val_nelbo', float('nan')):.4f} nats/token"
            + (
                f", grammar {row['grammar_score']:.2f} in context"
                f" ({row['grammatical']:.2f} sentence by sentence)"
                if "grammar_score" in row
                else ""
            )
            + (
                f", repeated names {row['val_name_nats']:.2f} nats"
                f" ({row['val_name_exact']:.0%} exact)"
                if "val_name_nats" in row
                else ""
            )
            + (
                f", friend named after the hero {row['val_hero_as_friend']:.0%}"
                if "val_hero_as_friend" in row
                else ""
            )
        )
        for text in row.get("samples", [])[:2]:
            say("  sample: " + text[:300].replace("\n", " "))
        return row

    # --- the loop
    losses: list[float] = []
    smoothed = None
    diverged = False
    last_eval: dict = {}
    bar = None
    if progress and cfg.progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start_step, cfg.steps):
        # data
        batch = sharding.put_batch(next(batches), batch_sharding) if mesh else next(batches)
        # step
        state, metrics = train_step(state, batch)
        loss = float(metrics["loss"])
        # check
        if not math.isfinite(loss):
            good = ckpt.list_checkpoints(run_dir) if run_dir else []
            msg = (
                f"non-finite loss ({loss}) at step {step + 1}: the run diverged (lower --lr, "
                f"currently {cfg.lr}). "
                + (
                    f"Last good checkpoint kept: {good[0].path}"
                    if good
                    else "No checkpoint was written."
                )
            )
            logger.log({"step": step + 1, "event": "diverged", "loss": str(loss), "message": msg})
            say(msg, file=sys.stderr)
            diverged = True
            break
        losses.append(loss)
        if step == start_step:  # leave compilation out of the throughput
            t_last, tokens_since = time.perf_counter(), -cfg.batch_size * cfg.seq_len
        smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
        tokens_since += cfg.batch_size * cfg.seq_len
        done = step + 1
        # log
        if done % cfg.log_every == 0 or done == cfg.steps:
            dt = time.perf_counter() - t_last
            tok_s = tokens_since / max(dt, 1e-9)
            mfu = flops_per_step * tok_s / (cfg.batch_size * cfg.seq_len) / peak
            row = {
                "step": done,
                "loss": loss,
                "loss_smoothed": smoothed,
                "lr": float(schedule(step)),
                "tokens_per_s": tok_s,
                "mfu": mfu,
                **{k: float(v) for k, v in metrics.items() if k != "loss"},
            }
            logger.log(row)
            if bar is not None:
                bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{mfu:.1%}")
            t_last, tokens_since = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        # evaluate
        at_end = done == cfg.steps
        if cfg.eval_every and (done % cfg.eval_every == 0 or at_end):
            last_eval = do_eval(done)
            t_last = time.perf_counter()
        # checkpoint
        if manager is not None and (done % cfg.ckpt_every == 0 or at_end):
            save(done, last_eval if last_eval.get("step") == done else {})
            t_last = time.perf_counter()
    if bar is not None:
        bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()

    result = {
        "val_nelbo": last_eval.get("val_nelbo"),
        "grammar_score": last_eval.get("grammar_score"),
        "grammatical": last_eval.get("grammatical"),
        "train_loss_smoothed": smoothed,
        "diverged": diverged,
        "steps": start_step + len(losses),
        "run_dir": run_dir,
        "losses": losses,
        "n_params": n_params,
        "final_params": None if diverged else state["params"],
    }
    return result


# Fields that may differ between a run and its resumption.
_RESUME_FREE = {
    "resume", "steps", "ckpt_every", "keep", "eval_every", "eval_sequences", "eval_times",
    "n_samples", "sample_steps", "sample_method", "sample_temperature", "log_every",
    "show_model", "tensorboard", "wandb", "progress", "mesh", "distributed", "out",
}  # fmt: skip


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """ValueError if the checkpoint was written with different training settings."""
    now = dataclasses.asdict(cfg)
    diff = {
        k: (saved[k], now[k])
        for k in saved
        if k in now and k not in _RESUME_FREE and saved[k] != now[k]
    }
    if diff:
        raise ckpt.CheckpointError(
            "cannot resume: settings differ from the checkpoint's (saved, now): "
            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        )
    if saved.get("steps") not in (None, cfg.steps):
        print(
            f"note: --steps changed from {saved['steps']} to {cfg.steps}: the learning-rate "
            "schedule changes with it.",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> dict:
    """The CLI: flags from TrainConfig (see --help). Exits with status 1 on divergence."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU threads
    import tyro

    cfg = tyro.cli(
        TrainConfig,
        args=argv,
        default=TrainConfig(out="auto"),
        description=__doc__,
    )
    try:
        result = run(cfg)
    except ValueError as e:  # a user mistake: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["diverged"]:
        raise SystemExit(1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "final_params")}))
    return result


if __name__ == "__main__":
    main()
