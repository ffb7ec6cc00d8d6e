"""Train a masked diffusion language model (MDLM objective, penzai DiT).

    python -m jif.train                                    # cpu preset, embedded stories
    python -m jif.train --preset tiny --steps 2 --batch-size 4 --seq-len 32 --out runs/x
    python -m jif.train --data TinyStories-valid.txt --steps 50
    python -m jif.train --out runs/x --resume              # continue a run
    python -m jif.train --help                             # every flag, from TrainConfig

One jitted `train_step(state, batch) -> (state, metrics)` (jif.loop) inside a plain Python
loop. Every step's randomness is derived from (seed, step) and the data position is
checkpointed, so a run killed at any point and resumed reaches bitwise the same weights (on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import treescope
import tyro
from tqdm import tqdm

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import eval as jif_eval
from jif import flops, hf, hostmem, loop, objectives, optim, sharding
from jif import model as model_lib
from jif import run_folder as runs


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
    """Override the architecture: standard, modula, or modula_ref (modula with the reference
    library's 1/3 on attention's output)."""
    adaln: bool | None = None
    """Override adaLN conditioning on the noise level (off by default, as in MDLM)."""
    mup_base_width: int | None = None
    """muP base width (None: no muP)."""
    self_condition: bool = False
    """Self-conditioning: a second pass fed the first pass's prediction, trained on half of
    the batches (standard DiT only; docs/training.md)."""
    dtype: str = "auto"
    """Parameter and activation dtype: float32, bfloat16, or auto (bfloat16 on accelerators)."""
    attention: str = "auto"
    """Attention kernel: auto (cuDNN on NVIDIA GPUs, Pallas on TPU, else xla),
    xla, chunked, cudnn, pallas (jif.layers.ATTENTION_KERNELS)."""
    # --- data
    data: str = "stories"
    """Training text: stories (embedded grammar), tinystories (HF hub) or a file path."""
    tokenizer: str = "gpt2"
    """gpt2 (GPT-2's BPE trimmed to --n-bpe ids, offline) or a Hugging Face tokenizer: a local
    folder (save_pretrained) or hub id, loaded with AutoTokenizer (jif.hf.load_tokenizer)."""
    n_bpe: int = 2048
    """Size of --tokenizer gpt2: its first n_bpe ids (plus end-of-text and mask tokens)."""
    batch_size: int = 16
    """Sequences per step (global, over all devices)."""
    seq_len: int = 128
    """Tokens per sequence."""
    packing: str = "pack"
    """How documents fill sequences (jif.data): pack (windows of the joined stream), align
    (each sequence starts at a document, the stream packed after it) or pad (one each)."""
    # --- optimisation
    objective: str = "mdlm"
    """Training objective (jif.objectives.OBJECTIVES): mdlm, the masked diffusion NELBO, or ar,
    the autoregressive reference (the same DiT with a causal mask, next-token loss)."""
    steps: int = 6000
    """Training steps (the default: about ten minutes of the cpu preset on 2 CPU cores with
    AdamW; Modula's 4600 take the same time, docs/training.md)."""
    optim: tyro.conf.OmitArgPrefixes[optim.OptimConfig] = optim.OptimConfig()
    """The optimizer (jif.optim.OptimConfig; its flags have no prefix)."""
    ema: float = 0.995
    """Decay of the moving average of the weights used for evaluation and samples (warmed
    up as min(ema, (1 + step) / (10 + step)))."""
    seed: int = 0
    """Seed of the initial weights, the data order and every step's noise."""
    on_nonfinite: str = "stop"
    """A step whose loss, gradient or update is not finite: stop (its update is never kept or
    saved) or skip (drop that update and go on; stops after 10 such steps in a row)."""
    # --- output
    out: str | None = None
    """Run folder. "auto": runs/<preset>-<data>[-N]. None: write nothing (Python API)."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint (starts fresh if it has none)."""
    ckpt_every: int = 1000
    """Checkpoint every N steps and at the end (0: never)."""
    keep: int = 3
    """Keep the newest K checkpoints."""
    eval: tyro.conf.OmitArgPrefixes[jif_eval.EvalConfig] = jif_eval.EvalConfig()
    """Evaluation (jif.eval.EvalConfig; its flags have no prefix)."""
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


def configure(**flags) -> TrainConfig:
    """TrainConfig from flat keyword arguments named like the CLI flags (lr=..., n_samples=...),
    each routed to its nested config: `configure(preset="tiny", lr=1e-2, eval_every=0)`."""
    nested = {"optim": optim.OptimConfig, "eval": jif_eval.EvalConfig}
    parts = {name: {} for name in nested}
    for key in list(flags):
        for name, cls in nested.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                parts[name][key] = flags.pop(key)
    return TrainConfig(**flags, **{name: cls(**parts[name]) for name, cls in nested.items()})


# ----------------------------------------------------------------------------- setup


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> model_lib.ModelConfig:
    """The preset with the config's overrides (None fields keep the preset's value) and the
    objective's (jif.objectives)."""
    return model_lib.make_config(
        cfg.preset,
        **objectives.OBJECTIVES[cfg.objective].model_overrides,
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        arch=cfg.arch,
        adaln=cfg.adaln,
        mup_base_width=cfg.mup_base_width,
        dtype=cfg.dtype,
        attention=cfg.attention,
        self_condition=cfg.self_condition or None,
    )


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config as it runs (validated): the run folder named, the optimizer's default
    learning rate for this width filled in (jif.optim.default_lr), its preferred architecture
    where --arch is not given, and for mup_adamw without --mup-base-width the width its
    default learning rate holds at (jif.optim.LR_WIDTH) as the base."""
    validate(cfg)
    optimizer = optim.canonical_name(cfg.optim.optimizer)
    arch = cfg.arch or optim.PREFERRED_ARCH.get(optimizer)
    base = cfg.mup_base_width
    if optimizer == "mup_adamw" and base is None:
        base = optim.LR_WIDTH
    out = runs.resolve_out(cfg.out, preset=cfg.preset, data=cfg.data, resume=cfg.resume)
    dtype = model_lib.default_dtype() if cfg.dtype == "auto" else cfg.dtype  # stored resolved
    width = cfg.d_model or model_lib.PRESETS[cfg.preset].d_model
    return dataclasses.replace(
        cfg, out=out, optim=cfg.optim.resolved(width), arch=arch, mup_base_width=base, dtype=dtype
    )


def validate(cfg: TrainConfig) -> None:
    """ValueError naming any out-of-range setting."""
    if cfg.preset not in model_lib.PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: choose one of {list(model_lib.PRESETS)}")
    for name in ("batch_size", "seq_len", "n_bpe", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("steps", "ckpt_every", "keep"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype {cfg.dtype!r}: choose auto, float32 or bfloat16")
    if cfg.on_nonfinite not in loop.NONFINITE:
        raise ValueError(f"--on-nonfinite {cfg.on_nonfinite!r}: choose one of {loop.NONFINITE}")
    if cfg.objective not in objectives.OBJECTIVES:
        raise ValueError(
            f"--objective {cfg.objective!r}: choose one of {sorted(objectives.OBJECTIVES)}"
        )
    if cfg.mesh:
        sharding.parse_mesh(cfg.mesh)
    cfg.optim.validate()
    cfg.eval.validate()


def evaluate(cfg: TrainConfig, p: dict, state: dict, step: int, say) -> dict:
    """The evaluator's row for the EMA weights at `step`, summarised on the terminal."""
    row = {
        "step": step,
        **p["evaluator"](p["unbound"], state["ema"], jax.random.key(cfg.seed + step)),
    }
    say(jif_eval.summary_line(row))
    for text in row.get("samples", [])[:2]:
        say("  sample: " + text[:300].replace("\n", " "))
    return row


def build(cfg: TrainConfig) -> dict:
    """The run's parts: tokenizer, model config, (unbound model, initial params), optimizer
    and schedule, training batches, evaluator and the resolved config."""
    tokenizer = hf.load_tokenizer(cfg.tokenizer, n_bpe=cfg.n_bpe)
    model_config = resolve_model_config(cfg, tokenizer.vocab_size)
    tokenizer.check_fits(model_config.vocab_size)
    unbound, params = ckpt.init_model(model_config, cfg.seed)
    tx, schedule = optim.make_optimizer(cfg.optim, cfg.steps, model_config, params)
    data_args = dict(seq_len=cfg.seq_len, seed=cfg.seed, packing=cfg.packing)
    return dict(
        tokenizer=tokenizer,
        model_config=model_config,
        unbound=unbound,
        params=params,
        tx=tx,
        schedule=schedule,
        batches=data_lib.TokenBatches(
            cfg.data, tokenizer, split="train", batch_size=cfg.batch_size, **data_args
        ),
        evaluator=jif_eval.Evaluator(
            cfg.eval,
            tokenizer,
            data=cfg.data,
            batch_size=cfg.batch_size,
            objective=cfg.objective,
            **data_args,
        ),
        resolved={
            **dataclasses.asdict(cfg),
            "model_config": dataclasses.asdict(model_config),
            "data_identity": data_lib.data_identity(cfg.data),  # checked on resume
        },
    )


def compile_step(cfg: TrainConfig, p: dict, shardings: dict, batch_sharding):
    """The jitted train step (state donated) with the state's and the batch's shardings."""
    step_fn = loop.make_train_step(
        p["unbound"],
        p["tx"],
        seed=cfg.seed,
        ema=cfg.ema,
        mask_id=p["tokenizer"].mask_id,
        objective=cfg.objective,
    )
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding or shardings["step"]),  # one device: the same
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def phase(bar, name: str) -> None:
    """Names what the run is doing between steps (evaluating, saving) on the progress bar."""
    if bar is not None and bar.desc != name:
        bar.set_description_str(name, refresh=True)


def show_model(cfg: TrainConfig, p: dict, say) -> None:
    """--show-model: the model as text, and as model.html in the run folder."""
    model = model_lib.build_model(p["model_config"], jax.random.key(cfg.seed))
    say(treescope.render_to_text(model))
    if cfg.out and jax.process_index() == 0:
        model_lib.show_model(model, os.path.join(cfg.out, "model.html"))


# ----------------------------------------------------------------------------- the run


def run(config: TrainConfig, *, progress: bool = True) -> dict:
    """Trains as configured. Returns {"val_nelbo", "train_loss_smoothed", "diverged",
    "interrupted", "steps", "run_dir", "losses", "final_params"...}. With out=None nothing
    is written. One process writes a run folder at a time (jif.run_folder.RunLock); SIGINT
    and SIGTERM stop after the current step with a checkpoint (jif.loop.Interrupts)."""
    if config.distributed or os.environ.get("JIF_DISTRIBUTED") == "1":
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()
    cfg = resolve(config)
    with runs.RunLock(cfg.out), loop.Interrupts() as interrupts:
        return _run(cfg, interrupts, progress)


def _run(cfg: TrainConfig, interrupts: loop.Interrupts, progress: bool) -> dict:
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    # --- setup: the parts, the state (fresh or resumed), the compiled step
    started = time.perf_counter()
    p = build(cfg)
    say(runs.config_summary(cfg, p["model_config"]))
    n_params = sum(int(v.data_array.size) for v in p["params"].values())
    kind = jax.devices()[0].device_kind
    say(f"model: {n_params:,} parameters; devices: {jax.device_count()} x {kind}")
    state = loop.init_state(p["params"], p["tx"])
    state, shardings, batch_sharding = sharding.place_state(state, cfg.mesh, say)
    manager, state, start_step, changed = runs.open_run(cfg, p, state, shardings, say)
    if cfg.show_model:
        show_model(cfg, p, say)
    train_step = compile_step(cfg, p, shardings, batch_sharding)
    logger = runs.Logger(
        cfg.out if is_main else None,
        start=start_step,
        tensorboard=cfg.tensorboard,
        wandb=cfg.wandb,
        config=dataclasses.asdict(cfg),
    )
    flops_per_step = flops.train_step_flops(p["model_config"], cfg.batch_size, cfg.seq_len)
    meter = loop.Throughput(
        cfg.batch_size * cfg.seq_len, flops_per_step, flops.peak_flops(cfg.dtype)
    )
    say(f"peak {meter.peak / 1e9:.0f} GFLOP/s; {flops_per_step / 1e9:.2f} GFLOP per step")

    if changed:
        logger.log({"step": start_step, "event": "resumed", "changed": changed})

    # --- the loop
    losses, smoothed, diverged, last_eval = [], None, False, {}
    bar = None
    if progress and cfg.progress and is_main:
        bar = tqdm(total=cfg.steps, initial=start_step, dynamic_ncols=True)
        say = bar.write  # lines above the bar, not through it
    if start_step < cfg.steps:
        say("compiling the train step (the first step waits for it)")
    put = (lambda b: sharding.put_batch(b, batch_sharding)) if batch_sharding else None
    try:
        steps = loop.steps(
            train_step, state, p["batches"], start=start_step, stop=cfg.steps, put=put,
            on_nonfinite=cfg.on_nonfinite,
        )  # fmt: skip
        for s in steps:
            state, done, smoothed, at_end = s.state, s.done, s.smoothed, s.done == cfg.steps
            losses.append(s.loss)
            meter.step()
            if not math.isfinite(s.loss):  # --on-nonfinite skip: the update was dropped
                logger.log(
                    {"step": done, "event": "skipped", "grad_norm": float(s.metrics["grad_norm"])}
                )
            # log
            if done % cfg.log_every == 0 or at_end:
                tok_s, mfu = meter.read()
                metrics = {k: float(v) for k, v in s.metrics.items() if k not in ("loss", "finite")}
                lr = float(p["schedule"](done - 1))
                row = dict(step=done, loss=s.loss, loss_smoothed=smoothed, lr=lr)
                logger.log(row | dict(tokens_per_s=tok_s, mfu=mfu, **metrics))
                if bar is not None:
                    bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{mfu:.1%}")
            if bar is not None:
                bar.update(1)
            # evaluate
            if cfg.eval.eval_every and (done % cfg.eval.eval_every == 0 or at_end):
                phase(bar, "evaluating")
                last_eval = evaluate(cfg, p, state, done, say)
                logger.log(last_eval)
                meter.pause()
            # checkpoint
            due = cfg.ckpt_every and (done % cfg.ckpt_every == 0 or at_end)
            if manager is not None and (due or interrupts.signal):
                phase(bar, "saving")
                runs.save(manager, state, cfg, p, done, last_eval)
                meter.pause()
            phase(bar, "")
            if interrupts.signal:  # SIGINT / SIGTERM: saved above, stop here
                break
    except loop.Diverged as e:
        diverged, msg = True, runs.diverged_message(e, cfg)
        logger.log({"step": e.step, "event": "diverged", "loss": str(e.loss), "message": msg})
        say(msg, file=sys.stderr)
    if bar is not None:
        bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return {
        "val_nelbo": last_eval.get("val_nelbo"),
        "grammar_score": last_eval.get("grammar_score"),
        "grammatical": last_eval.get("grammatical"),
        "story_level": last_eval.get("story_level"),
        "val_floor": last_eval.get("val_floor"),
        "train_loss_smoothed": smoothed,
        "diverged": diverged,
        "interrupted": interrupts.signal,
        "steps": start_step + len(losses),
        "run_dir": cfg.out,
        "losses": losses,
        "n_params": n_params,
        "seconds": time.perf_counter() - started,
        "final_params": None if diverged else state["params"],
    }


def main(argv: list[str] | None = None) -> dict:
    """The CLI: flags from TrainConfig (see --help). Exit status: 0 done, 1 diverged, 2 a
    mistake in the flags or the run folder, 130 / 143 stopped by SIGINT / SIGTERM (saved)."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    cfg = tyro.cli(TrainConfig, args=argv, default=TrainConfig(out="auto"), description=__doc__)
    try:
        result = run(cfg)
    except ValueError as e:  # a user mistake: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["diverged"]:
        raise SystemExit(1)
    print(runs.closing_lines(result, cfg))
    if result["interrupted"]:
        saved = (
            f"saved step {result['steps']} in {result['run_dir']}; " if result["run_dir"] else ""
        )
        again = runs.command_line(dataclasses.replace(cfg, out=result["run_dir"]), resume=True)
        print(
            f"stopped by {result['interrupted']}: {saved}continue with\n  {again}", file=sys.stderr
        )
        raise SystemExit(130 if result["interrupted"] == "SIGINT" else 143)
    return result


if __name__ == "__main__":
    main()
