"""The run folder around the checkpoints: its name, its files, its log, and what a resume
may change.

    runs/<preset>-<data>[-N]/
        config.json      the resolved training config (with the model config)
        tokenizer.json   the tokenizer (jif.tokenizer.Tokenizer.to_json)
        metrics.jsonl    one JSON object per logged step and per evaluation
        checkpoints/     orbax checkpoints (jif.checkpoint)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax

from jif import checkpoint as ckpt

# Settings that may differ between a run and its resumption (the rest must match).
RESUME_FREE = {
    "resume", "steps", "ckpt_every", "keep", "eval_every", "eval_sequences", "eval_times",
    "n_samples", "sample_steps", "sample_method", "sample_temperature", "log_every",
    "show_model", "tensorboard", "wandb", "progress", "mesh", "distributed", "out",
}  # fmt: skip


def _data_name(data: str) -> str:
    base = os.path.basename(os.path.normpath(data))
    return os.path.splitext(base)[0] or "data"


def resolve_out(out: str | None, *, preset: str, data: str, resume: bool) -> str | None:
    """The run folder: "auto" -> runs/<preset>-<data>, suffixed -2, -3... to stay new (or,
    with resume, the newest existing one); any other value as given."""
    if out != "auto":
        return out
    base = os.path.join("runs", f"{preset}-{_data_name(data)}")
    taken = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    existing = [p for p in taken if os.path.exists(p)]
    if resume and existing:
        return existing[-1]
    return next(p for p in taken if not os.path.exists(p))


def flatten(config: dict) -> dict:
    """A nested config dict as one level (nested dataclasses' fields have unique names)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and k != "model_config":
            out.update(flatten(v))
        else:
            out[k] = v
    return out


def check_resumable(saved: dict, now: dict) -> None:
    """CheckpointError if the checkpoint's config differs from `now` in a setting that a
    resume must keep. Both are config dicts, nested or flat (older checkpoints)."""
    saved, now = flatten(saved), flatten(now)
    diff = {
        k: (saved[k], now[k])
        for k in saved
        if k in now and k not in RESUME_FREE and saved[k] != now[k]
    }
    if diff:
        raise ckpt.CheckpointError(
            "cannot resume: settings differ from the checkpoint's (saved, now): "
            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        )
    if saved.get("steps") not in (None, now.get("steps")):
        print(
            f"note: --steps changed from {saved['steps']} to {now['steps']}: the learning-rate "
            "schedule changes with it.",
            file=sys.stderr,
        )


def write_run_files(run_dir: str, resolved: dict, tokenizer_json: str) -> None:
    """config.json and tokenizer.json (rewritten on every start, also on resume)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    with open(os.path.join(run_dir, "tokenizer.json"), "w") as f:
        f.write(tokenizer_json)


def open_run(cfg, p: dict, state: dict, shardings: dict, say=print) -> tuple:
    """(orbax manager or None, state, first step) of `cfg.out` (a jif.train.TrainConfig;
    `p` its jif.train.build parts): the newest checkpoint's
    state and data position with --resume, else the fresh state; a folder that holds
    checkpoints is refused without --resume. Writes config.json and tokenizer.json."""
    if not cfg.out:
        return None, state, 0
    manager = ckpt.make_manager(cfg.out, keep=cfg.keep) if cfg.ckpt_every or cfg.resume else None
    existing, start = ckpt.list_checkpoints(cfg.out), 0
    if existing and not cfg.resume:
        raise ValueError(
            f"{cfg.out} already holds checkpoints (newest: step {existing[0].step}). "
            "Pass --resume to continue it, or choose a new --out."
        )
    if existing:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        state, meta = ckpt.restore_train_state(manager, manager.latest_step(), abstract)
        state["step"] = jax.device_put(state["step"], shardings["step"])
        check_resumable(meta.get("config", {}), dataclasses.asdict(cfg))
        p["batches"].restore(meta["data_state"])
        start = int(meta["step"])
        say(f"resumed {cfg.out} at step {start}")
    elif cfg.resume:
        say(f"--resume: {cfg.out} has no checkpoint yet, starting fresh")
    if jax.process_index() == 0:
        write_run_files(cfg.out, p["resolved"], p["tokenizer"].to_json())
    return manager, state, start


def save(manager, state: dict, cfg, p: dict, step: int, last_eval: dict) -> None:
    """A checkpoint of `state` at `step`, with the meta that resume and inference read."""
    meta = dict(
        step=step,
        data=cfg.data,
        data_state=p["batches"].state(),
        config=dataclasses.asdict(cfg),
        model_config=dataclasses.asdict(p["model_config"]),
        tokenizer=p["tokenizer"].to_json(),
        val_nelbo=last_eval.get("val_nelbo") if last_eval.get("step") == step else None,
        time=time.time(),
    )
    ckpt.save(manager, state, meta)


class Logger:
    """metrics.jsonl (+ optional TensorBoard / wandb); silent without a run folder."""

    def __init__(self, run_dir: str | None, *, tensorboard=False, wandb=False, config=None):
        self.path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        self.tb = self.wb = None
        if run_dir and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional extra
            except ImportError:
                raise ValueError(
                    "--tensorboard needs tensorboardX: pip install tensorboardX"
                ) from None

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        if run_dir and wandb:
            try:
                import wandb as wandb_lib  # optional extra
            except ImportError:
                raise ValueError("--wandb needs wandb: pip install wandb") from None

            self.wb = wandb_lib.init(project="jif", config=config, dir=run_dir)

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
