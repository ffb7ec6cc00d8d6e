"""Distil a masked diffusion model into one that samples in fewer steps (SDTT, jif.sdtt).

    python -m jif.distill --teacher runs/x --rounds 3 --out runs/x-sdtt
    python -m jif.distill --teacher runs/x --rounds 3 --out runs/x-sdtt --resume
    python -m jif.sample --checkpoint runs/x-sdtt --steps 8        # the last round's student
    python -m jif.eval --checkpoint runs/x-sdtt/round-1 --judge runs/ar --steps 32
    python -m jif.distill --help                                   # every flag

Round k (1..K) trains a student to do in one sampling step what its teacher does in
--distill-steps (2) steps: the teacher samples with --teacher-steps / 2^(k-1) steps, the
student learns --teacher-steps / 2^k-step behaviour. Round 1's teacher is the EMA weights of
--teacher; round k's is round k-1's student (its EMA weights); each student starts from its
teacher's weights with a fresh optimizer.

Each round is an ordinary run folder, <out>/round-<k>/ (config.json, tokenizer, metrics.jsonl,
checkpoints/), that jif.sample, jif.eval, jif.bench.sampling and the app open unchanged. Its
checkpoints are numbered by the steps of all rounds so far (round k ends at k * --steps), so
`--checkpoint <out>` opens the newest, the latest round's student. The student's config is
its teacher's training config (seq_len, data, objective) plus a "distill" entry. <out>/
distill.json records the settings and the teacher's step folder, which --resume keeps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import jax
import tyro
from tqdm import tqdm

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import hostmem, loop, objectives, optim, sdtt
from jif import model as model_lib
from jif import run_folder as runs

# Settings a resume may change (the rest must match <out>/distill.json).
RESUME_FREE = {"resume", "rounds", "ckpt_every", "keep", "log_every", "progress"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Everything a distillation depends on (stored in <out>/distill.json and every student)."""

    teacher: str
    """The teacher: a run folder (its newest checkpoint) or one step folder; its EMA weights."""
    out: str
    """The output folder: <out>/round-<k>/ holds round k's student."""
    rounds: int = 3
    """Distillation rounds; each divides the student's sampling steps by --distill-steps."""
    teacher_steps: int = 64
    """Sampling steps of the first teacher (round k's student: teacher_steps / 2^k steps)."""
    distill_steps: int = 2
    """Teacher steps matched by one student step (SDTT's 2)."""
    steps: int = 300
    """Training steps per round."""
    divergence: str = "kl"
    """kl (reverse KL(student || teacher), the paper's best), kl_forward, tvd or mse."""
    batch_size: int | None = None
    """Sequences per step (default: the teacher's)."""
    data: str | None = None
    """Training text (default: the teacher's)."""
    optimizer: str | None = None
    """The optimizer (jif.optim.OPTIMIZERS; default: the teacher's)."""
    lr: float | None = None
    """Learning rate (default: a tenth of the teacher's peak rate)."""
    schedule: str = "constant"
    """Learning-rate schedule after warmup (jif.optim.SCHEDULES)."""
    warmup: int = 20
    """Linear warmup steps of each round."""
    ema: float = 0.995
    """Decay of the student's weight average (warmed up each round as in jif.train); the
    average is what is saved for sampling and what teaches the next round."""
    seed: int = 0
    """Seed of the data order, the times, masks and the teacher's draws."""
    on_nonfinite: str = "stop"
    """A step with a non-finite loss, gradient or update: stop or skip (as jif.train)."""
    resume: bool = False
    """Continue --out: finished rounds are kept, an unfinished one resumes at its checkpoint."""
    ckpt_every: int = 100
    """Checkpoint every N steps and at the end of each round (0: only at the end)."""
    keep: int = 2
    """Checkpoints kept per round."""
    log_every: int = 10
    """A metrics.jsonl line every N steps."""
    progress: bool = True
    """Show a tqdm progress bar."""


def validate(cfg: DistillConfig) -> None:
    """ValueError naming any out-of-range setting."""
    for name in ("rounds", "teacher_steps", "steps", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("ckpt_every", "keep", "warmup"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.distill_steps < 2:
        raise ValueError(f"--distill-steps must be >= 2, got {cfg.distill_steps}")
    if cfg.teacher_steps % cfg.distill_steps**cfg.rounds:
        raise ValueError(
            f"--teacher-steps {cfg.teacher_steps} cannot be divided by {cfg.distill_steps} "
            f"{cfg.rounds} times (--rounds): use a multiple of "
            f"{cfg.distill_steps**cfg.rounds} or fewer rounds."
        )
    if cfg.divergence not in sdtt.DIVERGENCES:
        raise ValueError(f"--divergence {cfg.divergence!r}: choose one of {sdtt.DIVERGENCES}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.on_nonfinite not in loop.NONFINITE:
        raise ValueError(f"--on-nonfinite {cfg.on_nonfinite!r}: choose one of {loop.NONFINITE}")
    if os.path.exists(cfg.teacher) and os.path.realpath(cfg.out).startswith(
        os.path.realpath(cfg.teacher) + os.sep
    ):
        raise ValueError(f"--out {cfg.out} lies inside the teacher {cfg.teacher}: choose another")


def student_steps(cfg: DistillConfig, k: int) -> int:
    """Sampling steps round k's student is trained for (round 0: the first teacher)."""
    return cfg.teacher_steps // cfg.distill_steps**k


def round_dir(cfg: DistillConfig, k: int) -> str:
    return os.path.join(cfg.out, f"round-{k}")


# ----------------------------------------------------------------------------- setup


def open_out(cfg: DistillConfig, say) -> str:
    """The teacher's step folder: resolved now, or on --resume read from <out>/distill.json
    (whose settings must match, except RESUME_FREE). Writes distill.json."""
    path = os.path.join(cfg.out, "distill.json")
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    names = os.listdir(cfg.out) if os.path.isdir(cfg.out) else []
    started = sorted(
        int(n[6:])
        for n in names
        if n.startswith("round-")
        and n[6:].isdigit()
        and ckpt.list_checkpoints(os.path.join(cfg.out, n))
    )
    if started and not cfg.resume:
        raise ValueError(
            f"{cfg.out} already holds distilled checkpoints (rounds {started}). Pass --resume "
            "to continue it, or choose a new --out."
        )
    if saved and started:
        now = dataclasses.asdict(cfg)
        diff = {
            k: (v, now.get(k))
            for k, v in saved["config"].items()
            if k not in RESUME_FREE and now.get(k) != v
        }
        if diff:
            raise ValueError(
                "cannot resume: settings differ from "
                f"{path} (saved, now): "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                + ". Resume with the same settings, or start a new --out."
            )
        teacher_dir = saved["teacher_step_dir"]
        say(f"resuming {cfg.out}: teacher {teacher_dir}")
    else:
        teacher_dir = ckpt.resolve_step_dir(cfg.teacher)
    os.makedirs(cfg.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "teacher_step_dir": teacher_dir}, f, indent=2)
    return teacher_dir


def optim_config(cfg: DistillConfig, teacher_config: dict, d_model: int) -> optim.OptimConfig:
    """The teacher's optimizer settings with the distillation's optimizer, rate and schedule
    (d_model: the teacher's width)."""
    fields = {f.name for f in dataclasses.fields(optim.OptimConfig)}
    base = optim.OptimConfig(
        **{k: v for k, v in (teacher_config.get("optim") or {}).items() if k in fields}
    ).resolved(d_model)
    name = cfg.optimizer or base.optimizer
    if cfg.lr is not None:
        lr = cfg.lr
    elif name == base.optimizer:
        lr = base.lr / 10
    else:
        lr = optim.default_lr(name, d_model) / 10
    out = dataclasses.replace(base.with_optimizer(name), lr=lr, schedule=cfg.schedule)
    return dataclasses.replace(out, warmup=cfg.warmup).validate()


def load_teacher(step_dir: str) -> ckpt.LoadedModel:
    """The first teacher's EMA weights; a diffusion (mdlm) checkpoint only."""
    teacher = ckpt.load_for_inference(step_dir, ema=True)
    if objectives.objective_of(teacher.config) != "mdlm":
        raise ValueError(
            f"--teacher {step_dir} was trained with objective "
            f"{teacher.config.get('objective')!r}: only masked diffusion (mdlm) models "
            "are distilled."
        )
    return teacher


def student_config(cfg: DistillConfig, k: int, teacher: ckpt.LoadedModel, teacher_of: str):
    """Round k's stored config: the teacher's training config with this round's "distill"."""
    base = {key: v for key, v in teacher.config.items() if key != "distill"}
    return {
        **base,
        "out": round_dir(cfg, k),
        "distill": {
            **dataclasses.asdict(cfg),
            "round": k,
            "teacher_of_round": teacher_of,
            "teacher_sampling_steps": student_steps(cfg, k - 1),
            "student_sampling_steps": student_steps(cfg, k),
        },
    }


# ----------------------------------------------------------------------------- one round


class Round:
    """Round k's parts: the data, optimizer, state (fresh or resumed), step and run folder."""

    def __init__(self, cfg, k, teacher, teacher_params, teacher_of, say):
        self.cfg, self.k, self.dir = cfg, k, round_dir(cfg, k)
        self.offset = (k - 1) * cfg.steps  # checkpoints count the steps of every round
        self.config = student_config(cfg, k, teacher, teacher_of)
        self.model_config, self.tokenizer = teacher.model_config, teacher.tokenizer
        base = teacher.config
        data = cfg.data or base.get("data", "stories")
        self.batches = data_lib.TokenBatches(
            data,
            self.tokenizer,
            split="train",
            batch_size=cfg.batch_size or int(base.get("batch_size", 16)),
            seq_len=int(base.get("seq_len", 128)),
            seed=cfg.seed * 1000 + k,
            packing=base.get("packing", "pack"),
        )
        self.data, self.data_identity = data, data_lib.data_identity(data)
        ocfg = optim_config(cfg, base, self.model_config.d_model)
        self.tx, self.schedule = optim.make_optimizer(
            ocfg, cfg.steps, self.model_config, teacher_params
        )
        self.state = loop.init_state(teacher_params, self.tx)
        self.start = 0
        own = ckpt.list_checkpoints(ckpt.checkpoints_dir(self.dir))
        self.manager = ckpt.make_manager(self.dir, keep=cfg.keep)
        if own:
            self._restore(own, say)
        if jax.process_index() == 0:
            runs.write_run_files(self.dir, self.config, self.tokenizer)

    def _restore(self, own: list, say) -> None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        for info in own:
            try:
                state, meta = ckpt.restore_train_state(self.manager, info.step, abstract)
                break
            except ckpt.CheckpointError as e:
                say(f"warning: {info.path} cannot be resumed ({e})", file=sys.stderr)
        else:
            raise ckpt.CheckpointError(
                f"no checkpoint of {self.dir} can be resumed: delete the folder to redo "
                "this round, or choose a new --out."
            )
        runs.check_same_data(meta.get("data_identity"), self.data_identity, self.data)
        self.start = int(meta["step"]) - self.offset
        self.state = {**state, "step": jax.numpy.asarray(self.start, jax.numpy.int32)}
        self.batches.restore(meta["data_state"])
        say(f"round {self.k}: resumed {self.dir} at step {self.start} of {self.cfg.steps}")

    def save(self, done: int) -> None:
        meta = dict(
            step=self.offset + done,
            data=self.data,
            data_state=self.batches.state(),
            config=self.config,
            model_config=dataclasses.asdict(self.model_config),
            tokenizer=self.tokenizer.to_json(),
            val_nelbo=None,
            data_identity=self.data_identity,
        )
        ckpt.save(self.manager, self.state, meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def compile_step(cfg: DistillConfig, r: Round, unbound):
    """Round r's jitted step: the student's update toward its teacher's composed steps."""
    loss = sdtt.make_loss(
        lambda weights: ckpt.bind_params(unbound, weights),
        model_lib.apply_logits,
        dt=1.0 / student_steps(cfg, r.k - 1),
        n_steps=cfg.distill_steps,
        divergence=cfg.divergence,
    )
    step = loop.make_train_step(
        unbound,
        r.tx,
        seed=cfg.seed * 1000 + r.k,
        ema=cfg.ema,
        mask_id=r.tokenizer.mask_id,
        custom_loss=loss,
    )
    return jax.jit(step, donate_argnums=0)


def train_round(cfg, r: Round, unbound, teacher_params, bar, interrupts, say) -> dict:
    """Runs round r to its end (or a signal); returns its summary."""
    logger = runs.Logger(r.dir, start=r.offset + r.start)
    summary = {"round": r.k, "run_dir": r.dir, "sampling_steps": student_steps(cfg, r.k)}
    if r.start >= cfg.steps:
        return summary | {"steps": cfg.steps, "loss_smoothed": None}
    say(
        f"round {r.k}: {student_steps(cfg, r.k - 1)}-step teacher -> "
        f"{student_steps(cfg, r.k)}-step student, {cfg.steps} steps, {cfg.divergence}"
    )
    step_fn = compile_step(cfg, r, unbound)
    feed = ({"tokens": b, "teacher": teacher_params} for b in r.batches)
    smoothed = None
    # Committed to the device, as the step's outputs are: else the second step compiles again.
    state = jax.device_put(r.state, jax.local_devices()[0])
    for s in loop.steps(
        step_fn, state, feed, start=r.start, stop=cfg.steps, on_nonfinite=cfg.on_nonfinite
    ):
        r.state, smoothed, at_end = s.state, s.smoothed, s.done == cfg.steps
        if not math.isfinite(s.loss):
            logger.log({"step": r.offset + s.done, "event": "skipped"})
        if s.done % cfg.log_every == 0 or at_end:
            metrics = {k: float(v) for k, v in s.metrics.items() if k not in ("loss", "finite")}
            lr = float(r.schedule(s.done - 1))
            row = dict(step=r.offset + s.done, round=r.k, loss=s.loss, loss_smoothed=smoothed)
            logger.log(row | dict(lr=lr, **metrics))
            if bar is not None:
                bar.set_postfix(round=r.k, loss=f"{smoothed:.4f}")
        if bar is not None:
            bar.update(1)
        due = cfg.ckpt_every and s.done % cfg.ckpt_every == 0
        if due or at_end or interrupts.signal:
            r.save(s.done)
        if interrupts.signal:
            return summary | {"steps": s.done, "loss_smoothed": smoothed, "stopped": True}
    return summary | {"steps": cfg.steps, "loss_smoothed": smoothed}


# ----------------------------------------------------------------------------- the run


def run(cfg: DistillConfig) -> dict:
    """Distils as configured. Returns {"rounds": [per-round summaries], "out", "diverged",
    "interrupted"}. SIGINT / SIGTERM save a checkpoint and stop (continue with --resume)."""
    validate(cfg)
    with runs.RunLock(cfg.out), loop.Interrupts() as interrupts:
        return _run(cfg, interrupts)


def _run(cfg: DistillConfig, interrupts: loop.Interrupts) -> dict:
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    teacher_dir = open_out(cfg, say)
    teacher = load_teacher(teacher_dir)
    unbound, _ = ckpt.init_model(teacher.model_config, 0)
    teacher_params, teacher_of = teacher.params, teacher.path
    say(f"teacher {teacher.path} (step {teacher.step}), {cfg.rounds} rounds of {cfg.steps} steps")
    bar = None
    if cfg.progress and jax.process_index() == 0:
        bar = tqdm(total=cfg.rounds * cfg.steps, dynamic_ncols=True)
    out = {"out": cfg.out, "rounds": [], "diverged": False, "interrupted": None}
    try:
        for k in range(1, cfg.rounds + 1):
            r = Round(cfg, k, teacher, teacher_params, teacher_of, say)
            if bar is not None:
                bar.update(min(r.start, cfg.steps))
            try:
                summary = train_round(cfg, r, unbound, teacher_params, bar, interrupts, say)
            finally:
                r.close()
            out["rounds"].append(summary)
            if summary.get("stopped"):
                out["interrupted"] = interrupts.signal
                break
            # the student's EMA teaches the next round
            teacher_params, teacher_of = r.state["ema"], r.dir
    except loop.Diverged as e:
        out["diverged"] = True
        say(
            f"{e}: round {k} diverged; nothing non-finite was kept. Continue from its last "
            f"checkpoint with a lower --lr and --resume, or start a new --out.",
            file=sys.stderr,
        )
    if bar is not None:
        bar.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    """The CLI (see --help). Exit status: 0 done, 1 diverged, 2 a mistake in the flags, the
    teacher or --out, 130 / 143 stopped by SIGINT / SIGTERM (saved; continue with --resume)."""
    hostmem.reuse_freed_memory()  # first: before JAX starts its CPU backend
    cfg = tyro.cli(DistillConfig, args=argv, description=__doc__)
    try:
        out = run(cfg)
    except ValueError as e:  # a user mistake (CheckpointError and DataError included)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(out))
    if out["diverged"]:
        raise SystemExit(1)
    if out["interrupted"]:
        print(f"stopped by {out['interrupted']}: continue with --resume", file=sys.stderr)
        raise SystemExit(130 if out["interrupted"] == "SIGINT" else 143)
    last = out["rounds"][-1]
    say = f"sample with: python -m jif.sample --checkpoint {cfg.out} --steps "
    print(say + str(last["sampling_steps"]), file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
