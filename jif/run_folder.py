"""The run folder around the checkpoints: its name, its files, its log, and what a resume
may change.

    runs/<preset>-<data>[-N]/
        config.json      the resolved training config (with the model config)
        tokenizer.json   the tokenizer (jif.tokenizer.Tokenizer.to_json)
        tokenizer/       the same in Hugging Face's format (AutoTokenizer.from_pretrained)
        metrics.jsonl    one JSON object per logged step and per evaluation
        checkpoints/     orbax checkpoints (jif.checkpoint)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import time

import jax

from jif import checkpoint as ckpt
from jif import hf
from jif import model as model_lib

# Settings that may differ between a run and its resumption (the rest must match).
RESUME_FREE = {
    "resume", "steps", "ckpt_every", "keep", "eval_every", "eval_sequences", "eval_times",
    "n_samples", "sample_steps", "sample_method", "sample_temperature", "log_every",
    "show_model", "tensorboard", "wandb", "progress", "mesh", "distributed", "out",
    "attention",  # the kernel computes the same attention: parameters are unchanged
}  # fmt: skip
# Settings a resume may change that alter the training itself (recorded in metrics.jsonl).
RESUME_RETUNE = {"lr", "clip", "on_nonfinite"}


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


def check_resumable(saved: dict, now: dict) -> dict:
    """The settings a resume changes that may change ({name: [saved, now]}, e.g. a lower
    --lr after a divergence); CheckpointError if the checkpoint's config differs from `now`
    in a setting that a resume must keep. Both are config dicts, nested or flat."""
    saved, now = flatten(saved), flatten(now)
    diff = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
    fixed = {k: v for k, v in diff.items() if k not in RESUME_FREE | RESUME_RETUNE}
    if fixed:
        raise ckpt.CheckpointError(
            "cannot resume: settings differ from the checkpoint's (saved, now): "
            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in fixed.items())
            + ". Resume with the run's own settings (its config.json), or start a new --out."
        )
    if saved.get("steps") not in (None, now.get("steps")):
        print(
            f"note: --steps changed from {saved['steps']} to {now['steps']}: the learning-rate "
            "schedule changes with it.",
            file=sys.stderr,
        )
    return {k: list(v) for k, v in diff.items() if k in RESUME_RETUNE}


def check_same_data(saved: dict | None, now: dict, data: str) -> None:
    """CheckpointError when the training data differs from the checkpoint's (its content:
    size and sha256 for a file, wherever it now lies). Older checkpoints stored none."""
    if saved is None:
        return
    strip = lambda d: {k: v for k, v in d.items() if k != "path"}
    if strip(saved) != strip(now):
        raise ckpt.CheckpointError(
            f"cannot resume: the training data {data!r} is not the data of the checkpoint "
            f"(saved {saved}, now {now}). Resume with the same data, or start a new --out."
        )


def write_run_files(run_dir: str, resolved: dict, tokenizer) -> None:
    """config.json, tokenizer.json and tokenizer/ (Hugging Face's format, jif.hf); rewritten
    on every start, also on resume."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    with open(os.path.join(run_dir, "tokenizer.json"), "w") as f:
        f.write(tokenizer.to_json())
    hf.save(tokenizer, os.path.join(run_dir, "tokenizer"), context=resolved.get("seq_len"))


def open_run(cfg, p: dict, state: dict, shardings: dict, say=print) -> tuple:
    """(orbax manager or None, state, first step, settings changed since the checkpoint) of
    `cfg.out` (a jif.train.TrainConfig; `p` its jif.train.build parts).

    With --resume: the newest checkpoint that restores and matches its checksums (older ones
    are tried in turn, saying why), its data position, and the settings that changed; without:
    the fresh state (a folder that holds checkpoints is refused). Writes config.json and
    tokenizer.json."""
    if not cfg.out:
        return None, state, 0, {}
    own = ckpt.list_checkpoints(ckpt.checkpoints_dir(cfg.out))
    inside = [] if own else ckpt.list_checkpoints(cfg.out)  # a folder of runs?
    if inside:
        runs = sorted({os.path.basename(i.run_dir) for i in inside})
        raise ValueError(
            f"{cfg.out} is a folder of runs ({', '.join(runs[:5])}), not a run: pass one of "
            f"them as --out (e.g. --out {os.path.join(cfg.out, runs[0])})."
        )
    if own and not cfg.resume:
        raise ValueError(
            f"{cfg.out} already holds checkpoints (newest: step {own[0].step}). "
            "Pass --resume to continue it, or choose a new --out."
        )
    manager = ckpt.make_manager(cfg.out, keep=cfg.keep)  # also for the save on SIGINT / SIGTERM
    start, changed = 0, {}
    if own:
        changed = check_resumable(own[0].config, dataclasses.asdict(cfg))
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        for k, info in enumerate(own):
            try:
                restored, meta = ckpt.restore_train_state(manager, info.step, abstract)
                break
            except ckpt.CheckpointError as e:
                older = f"trying step {own[k + 1].step}" if k + 1 < len(own) else "none left"
                say(f"warning: step {info.step} cannot be resumed ({e}); {older}", file=sys.stderr)
        else:
            restored = None
        if restored is not None and k > 0:  # newer ones are broken: keep them for inspection,
            if jax.process_index() == 0:  # out of every listing
                for info in own[:k]:
                    os.rename(info.path, info.path + ".corrupt")
                    say(f"renamed the broken checkpoint {info.path} to {info.path}.corrupt")
            manager.close()
            manager = ckpt.make_manager(cfg.out, keep=cfg.keep)
        if restored is None:
            raise ckpt.CheckpointError(
                f"no checkpoint of {cfg.out} can be resumed (steps {[i.step for i in own]}); "
                "start a new run with another --out."
            )
        check_same_data(meta.get("data_identity"), p["resolved"]["data_identity"], cfg.data)
        state = {**restored, "step": jax.device_put(restored["step"], shardings["step"])}
        p["batches"].restore(meta["data_state"])
        start = int(meta["step"])
        say(f"resumed {cfg.out} at step {start}" + (f"; changed: {changed}" if changed else ""))
    elif cfg.resume:
        say(f"--resume: {cfg.out} has no checkpoint yet, starting fresh")
    if jax.process_index() == 0:
        write_run_files(cfg.out, p["resolved"], p["tokenizer"])
    return manager, state, start, changed


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
        data_identity=p["resolved"]["data_identity"],
        time=time.time(),
    )
    ckpt.save(manager, state, meta)


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; lines that do not parse (a torn last line) are skipped."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def diverged_message(e, cfg) -> str:
    """What happened, the last good checkpoint, and a command that continues from it."""
    good = ckpt.list_checkpoints(ckpt.checkpoints_dir(cfg.out)) if cfg.out else []
    lower = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr / 3))
    if good:
        again = command_line(lower, resume=True)
        where = f"The last good checkpoint is step {good[0].step} ({good[0].path}); continue it with a lower learning rate:\n  {again}"
    else:
        again = command_line(lower, resume=False)
        where = f"No checkpoint was written; start again with a lower learning rate:\n  {again}"
    return f"{e}: the run diverged (--lr {cfg.optim.lr:g}). Nothing non-finite was kept. {where}"


class Logger:
    """metrics.jsonl (+ optional TensorBoard / wandb); silent without a run folder.

    Every line is valid JSON (non-finite numbers are written as null). Opening it for a run
    that starts at step `start` keeps only the rows up to that step, so a resumed run logs
    each step once, and drops a torn last line."""

    def __init__(
        self, run_dir: str | None, *, start: int = 0, tensorboard=False, wandb=False, config=None
    ):
        self.path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
        if self.path and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
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
        row = json_safe(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        scalars = {
            k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        scalars.pop("step", None)
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wb:
            self.wb.log(scalars, step=row["step"])


class RunLock:
    """One writer per run folder: `<run>/.lock` holds the owner's host and process id. A lock
    whose process is gone (on this host) is stale and taken over; a live one is an error."""

    def __init__(self, run_dir: str | None):
        self.path = os.path.join(run_dir, ".lock") if run_dir else None
        self.held = False

    def __enter__(self) -> RunLock:
        if self.path is None or jax.process_index() != 0:
            return self
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._create()
        except FileExistsError:
            owner = self._owner()
            if owner and owner.get("host") == socket.gethostname() and _alive(owner.get("pid")):
                raise ValueError(
                    f"{os.path.dirname(self.path)} is being written by another jif.train "
                    f"(process {owner['pid']}, started {owner.get('started', '?')}): wait for "
                    "it to finish, or choose another --out."
                ) from None
            if owner and owner.get("host") != socket.gethostname():
                raise ValueError(
                    f"{self.path} says host {owner.get('host')!r} (process {owner.get('pid')}) "
                    "writes this run; if no run is alive there, delete the file and retry."
                ) from None
            print(f"note: removed the stale lock of process {owner and owner.get('pid')}")
            os.remove(self.path)
            self._create()
        except OSError as e:
            raise ValueError(
                f"cannot write the run folder {os.path.dirname(self.path)}: {e}; choose another --out."
            ) from None
        self.held = True
        return self

    def _create(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            owner = {"host": socket.gethostname(), "pid": os.getpid()}
            json.dump(owner | {"started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else None
        except (OSError, json.JSONDecodeError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def command_line(cfg, *, resume: bool) -> str:
    """`python -m jif.train ...` with every flag whose value differs from its default (the
    flags that reproduce `cfg`, a jif.train.TrainConfig), plus --resume."""
    now = flatten(dataclasses.asdict(cfg))
    default = flatten(dataclasses.asdict(type(cfg)()))
    parts = ["python -m jif.train"]
    for k, v in now.items():
        if k in ("resume", "out") or v == default.get(k):
            continue
        if k == "dtype" and default[k] == "auto" and v == model_lib.default_dtype():
            continue  # what "auto" resolves to here
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + flag[2:])
        elif v is not None:
            parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    if cfg.out:
        parts.append(f"--out {cfg.out}")
    return " ".join(parts + (["--resume"] if resume else []))


# ----------------------------------------------------------------------------- terminal


def config_summary(cfg, model_config) -> str:
    """Two lines on what this run trains (the whole config is in <run>/config.json)."""
    m, o = model_config, cfg.optim
    kind = f"{m.arch} DiT" + (", self-conditioned" if getattr(m, "self_condition", False) else "")
    where = f"{cfg.out}/config.json" if cfg.out else "not saved: no --out"
    return (
        f"{cfg.objective} on {cfg.data}: {cfg.preset} preset ({kind}, d_model {m.d_model}, "
        f"{m.n_layers} layers, {m.n_heads} heads), {o.optimizer} at lr {o.lr:g} ({o.schedule}), "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, seed {cfg.seed}\n"
        f"full config: {where}"
    )


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def closing_lines(result: dict, cfg) -> str:
    """What the run reached, where its checkpoint is and what to run next."""
    lines = [f"done: {result['steps']} steps in {_duration(result['seconds'])}"]
    value, floor_ = result.get("val_nelbo"), result.get("val_floor")
    if value is not None:
        line = f"validation NELBO {value:.3f} nats/token"
        if floor_:
            line += f" (floor of these windows {floor_:.3f}: +{value / floor_ - 1:.0%})"
        if result.get("story_level") is not None:
            e = cfg.eval
            line += (
                f"; whole stories in {e.n_samples} samples ({e.sample_method}, "
                f"{e.sample_steps} steps): {result['story_level']:.2f}"
            )
        lines.append(line)
    if result.get("run_dir") and cfg.ckpt_every:
        lines += [
            f"checkpoint: {result['run_dir']}/checkpoints/{result['steps']}",
            f"next: python -m jif.sample --checkpoint {result['run_dir']}",
            f"      python app.py --checkpoint {result['run_dir']}",
        ]
    return "\n".join(lines)
