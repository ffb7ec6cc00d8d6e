"""Run folders and orbax checkpoints: save, list, restore for training or inference.

A run folder (default `runs/<name>/`) holds
    config.json          the resolved training config
    metrics.jsonl        one JSON object per logged step / evaluation
    tokenizer.json       the tokenizer (Tokenizer.to_json)
    checkpoints/<step>/  orbax checkpoints, items:
        params, ema, opt_state   (orbax StandardSave of dict[label, NamedArray] / optax state)
        meta                     (JsonSave: step, data, data position, config, model config,
                                  tokenizer json, val_nelbo)

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
run killed mid-save leaves only a `<step>.orbax-checkpoint-tmp-*` folder that is never
listed or restored (orbax removes it when the run is resumed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from penzai import pz

from jif import model as model_lib
from jif.tokenizer import Tokenizer

FORMAT = "jif-checkpoint-1"
MAKE_ONE = "python -m jif.train --preset tiny --steps 200 --out runs/tiny"
"""The command named in error messages: it makes a small checkpoint in about a minute."""

Params = dict[str, pz.nx.NamedArray]


class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint (the message says which and why)."""


def _brief(e: Exception, limit: int = 300) -> str:
    """An exception as one short line (orbax and TensorStore errors carry whole specs)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# ----------------------------------------------------------------------------- params


def split_params(model: pz.nn.Layer) -> tuple[pz.nn.Layer, Params]:
    """model with bound parameters -> (model with parameter slots, {label: value})."""
    unbound, values = pz.unbind_params(model, freeze=True)
    return unbound, {p.label: p.value for p in values}


@functools.lru_cache(maxsize=4)
def init_model(model_config, seed: int) -> tuple[pz.nn.Layer, Params]:
    """(model with parameter slots, initial {label: value}) for a config and seed; cached,
    as building a model op by op takes seconds (callers must not donate these arrays)."""
    return split_params(model_lib.build_model(model_config, jax.random.key(seed)))


def bind_params(unbound: pz.nn.Layer, params: Params) -> pz.nn.Layer:
    """Inverse of split_params: a model whose parameters are the (frozen) values given."""
    return pz.bind_variables(
        unbound, [pz.ParameterValue(label=k, value=v) for k, v in params.items()]
    )


# ----------------------------------------------------------------------------- saving


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def make_manager(run_dir: str, *, keep: int = 3) -> ocp.CheckpointManager:
    """Synchronous orbax manager over run_dir/checkpoints keeping the last `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        enable_async_checkpointing=False,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(checkpoints_dir(run_dir)), options=options)


ITEMS = ("params", "ema", "opt_state")


def fingerprint(tree) -> tuple[dict[str, str] | None, list[str]]:
    """(checksums, non-finite paths) of a pytree of arrays, from one host copy of each leaf.

    checksums: {leaf path: sha256 of dtype, shape and bytes}, or None when some array is not
    fully addressable here (multi-host: each process holds only its shards). Non-finite
    paths: the floating-point leaves holding a NaN or an infinity (leaves held by other
    processes are checked by the train step, metrics["finite"], on every process)."""
    sums: dict[str, str] | None = {}
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            sums = None
            continue
        a, key = np.asarray(jax.device_get(leaf)), jax.tree_util.keystr(path)
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            bad.append(key)
        if sums is not None:
            h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
            sums[key] = h.hexdigest()
    return sums, bad


def verify(tree, expected: dict[str, str] | None, where: str) -> None:
    """CheckpointError naming the first leaf whose checksum differs from the stored one
    (a checkpoint written without checksums is accepted as it is)."""
    if not expected:
        return
    got, _ = fingerprint(tree)
    if got is None:
        return
    for path, digest in expected.items():
        if got.get(path) != digest:
            raise CheckpointError(
                f"{where} is corrupt: the stored values of {path} do not match their checksum "
                "(the files were changed after they were written)."
            )


def save(manager: ocp.CheckpointManager, state: dict, meta: dict) -> None:
    """Writes state {"params", "ema", "opt_state", "step"} and JSON `meta` at state's step,
    with a checksum of every array; refuses a state that holds a non-finite value."""
    step = int(meta["step"])
    prints = {item: fingerprint(state[item]) for item in ITEMS}
    bad = [f"{item}{p}" for item, (_, paths) in prints.items() for p in paths]
    if bad:
        raise FloatingPointError(f"refusing to save step {step}: non-finite values in {bad[:5]}")
    sums = {item: digests for item, (digests, _) in prints.items()}
    meta = {"format": FORMAT, **meta, "checksums": sums}
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            ema=ocp.args.StandardSave(state["ema"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()


def restore_train_state(
    manager: ocp.CheckpointManager, step: int, abstract_state: dict
) -> tuple[dict, dict]:
    """(state, meta) at `step`; abstract_state = jax.eval_shape of the initial state (its
    shardings, where given as jax.ShapeDtypeStruct.sharding, are the restored shardings)."""
    try:
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                ema=ocp.args.StandardRestore(abstract_state["ema"]),
                opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:  # orbax raises many types; say what it means for the user
        raise CheckpointError(
            f"cannot resume from {manager.directory}/{step}: {_brief(e)}\n"
            "The checkpoint does not match this config (model size, optimizer or dtype "
            "changed?) or is corrupt. Resume with the run's own config.json settings, or "
            "start a new run with a different --out."
        ) from e
    meta = dict(out["meta"])
    for item in ITEMS:
        verify(out[item], (meta.get("checksums") or {}).get(item), f"{manager.directory}/{step}")
    state = {
        "params": out["params"],
        "ema": out["ema"],
        "opt_state": out["opt_state"],
        "step": jax.numpy.asarray(meta["step"], jax.numpy.int32),
    }
    return state, meta


# ----------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """One checkpoint on disk, described by its meta item."""

    path: str
    """The step folder (.../checkpoints/<step>)."""
    run_dir: str
    """The run folder that holds it."""
    step: int
    """Training steps taken when it was written."""
    data: str
    """Training data: "stories", "tinystories" or a file path."""
    val_nelbo: float | None
    """Validation NELBO (nats/token, EMA weights) at that step, if evaluated."""
    config: dict
    """The resolved training config (TrainConfig as a dict)."""


def _read_meta(step_dir: str) -> dict:
    """The JSON meta item of a step folder; CheckpointError if missing or unreadable."""
    path = os.path.join(step_dir, "meta", "metadata")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{step_dir} is not a complete jif checkpoint (no meta/metadata). "
            f"Make one with `{MAKE_ONE}`."
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir} is corrupt: cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{step_dir} is not a {FORMAT} checkpoint (meta format: "
            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__}). "
            f"Make one with `{MAKE_ONE}`."
        )
    return meta


def weights_present(step_dir: str, item: str) -> bool:
    """Whether the orbax item `item` ("ema" or "params") of a step folder holds saved arrays:
    its _METADATA and at least one data file (under a `d/` folder). A step folder whose
    weights were deleted, or never finished, has its meta but not these."""
    folder = os.path.join(step_dir, item)
    if not os.path.isfile(os.path.join(folder, "_METADATA")):
        return False
    return any(os.path.basename(d) == "d" and files for d, _, files in os.walk(folder))


def _is_step_dir(path: str) -> bool:
    """A complete step folder: digits, with the meta item and the weights orbax wrote."""
    return (
        os.path.basename(os.path.normpath(path)).isdigit()
        and os.path.isdir(os.path.join(path, "meta"))
        and all(weights_present(path, item) for item in ("params", "ema"))
    )


def _step_dirs(root: str) -> list[str]:
    """Complete step folders under root: root itself, root/<step>, root/checkpoints/<step>,
    root/<run>/checkpoints/<step> (unfinished orbax temp folders are not digits: skipped)."""
    root = os.path.normpath(root)
    if _is_step_dir(root):
        return [root]
    found = []
    candidates = [root, checkpoints_dir(root)]
    if os.path.isdir(root):
        candidates += [checkpoints_dir(os.path.join(root, d)) for d in sorted(os.listdir(root))]
    for folder in candidates:
        if not os.path.isdir(folder):
            continue
        found += [
            os.path.join(folder, d)
            for d in os.listdir(folder)
            if d.isdigit() and _is_step_dir(os.path.join(folder, d))
        ]
    return sorted(set(found))


def _info(step_dir: str) -> CheckpointInfo:
    meta = _read_meta(step_dir)
    ckpts = os.path.dirname(step_dir)
    run_dir = os.path.dirname(ckpts) if os.path.basename(ckpts) == "checkpoints" else ckpts
    return CheckpointInfo(
        path=step_dir,
        run_dir=run_dir,
        step=int(meta["step"]),
        data=str(meta.get("data", "")),
        val_nelbo=meta.get("val_nelbo"),
        config=dict(meta.get("config", {})),
    )


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every readable checkpoint under root (a run folder, a folder of runs, a checkpoints
    folder or one step folder), newest first: the highest step first (file times are not
    used: a copy changes them), then by path. Unreadable ones are skipped; a missing root
    gives an empty list."""
    infos = []
    for d in _step_dirs(root):
        try:
            infos.append(_info(d))
        except CheckpointError:
            continue
    infos.sort(key=lambda i: (-i.step, i.path))
    return infos


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A trained model ready for sampling."""

    model: Any
    """The penzai DiT with its (EMA or raw) weights bound as frozen values."""
    model_config: Any
    """Its jif.model.ModelConfig."""
    tokenizer: Any
    """The jif.tokenizer.Tokenizer it was trained with."""
    step: int
    """Training steps taken."""
    data: str
    """Training data name or path."""
    config: dict
    """The resolved training config."""
    denoise_fn: Callable
    """tokens int32 [B, L] (, prediction) -> logits float32 [B, L, V] (jitted; see
    jif.model.make_denoise_fn)."""
    params: dict = dataclasses.field(default_factory=dict)
    """The loaded weights {label: NamedArray} (EMA or raw, as bound in `model`)."""
    path: str = ""
    """The step folder loaded."""
    val_nelbo: float | None = None
    """Validation NELBO at that step, if evaluated."""


def resolve_step_dir(path: str) -> str:
    """A step folder for `path` (a step folder, or the newest checkpoint of a run folder or
    folder of runs); CheckpointError naming the path and how to make one otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"no checkpoint at {path!r}: it does not exist. Make one with `{MAKE_ONE}`."
        )
    if _is_step_dir(path):
        return os.path.normpath(path)
    dirs = _step_dirs(path)
    if not dirs:
        raise CheckpointError(
            f"no checkpoint found in {path!r} (expected <run>/checkpoints/<step>/). "
            f"Make one with `{MAKE_ONE}`."
        )
    infos = list_checkpoints(path)
    if not infos:  # every candidate is unreadable: report the newest one's problem
        _read_meta(dirs[-1])
    return infos[0].path


def model_config_from_dict(d: dict):
    """jif.model.ModelConfig from its asdict() form; CheckpointError if fields do not fit."""
    names = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(
            f"checkpoint model config has fields {unknown} that this version of jif.model "
            "does not know: it was written by a newer or different jif."
        )
    try:
        return model_lib.ModelConfig(**d).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint model config {d} is invalid here: {e}") from e


def load_for_inference(path: str, *, ema: bool = True) -> LoadedModel:
    """Model, tokenizer and config from a run folder (its newest step) or one step folder.

    ema=True loads the exponential moving average of the weights (what evaluation and
    samples use during training); ema=False the raw weights.
    """
    step_dir = resolve_step_dir(path)
    meta = _read_meta(step_dir)
    for key in ("model_config", "tokenizer", "step"):
        if key not in meta:
            raise CheckpointError(f"{step_dir} is corrupt: its meta has no {key!r}.")
    # The attention kernel is the platform's own here (a run may have forced one elsewhere).
    model_config = dataclasses.replace(
        model_config_from_dict(meta["model_config"]), attention="auto"
    )
    try:
        tokenizer = Tokenizer.from_json(meta["tokenizer"])
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot rebuild its tokenizer: {e}") from e
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"{step_dir}: tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size "
            f"{model_config.vocab_size}."
        )

    unbound, init_params = init_model(model_config, 0)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), init_params
    )
    item = "ema" if ema else "params"
    try:
        with ocp.CheckpointManager(os.path.abspath(os.path.dirname(step_dir))) as manager:
            restored = manager.restore(
                int(os.path.basename(step_dir)),
                args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}),
            )[item]
    except Exception as e:
        raise CheckpointError(
            f"{step_dir}: cannot restore {item!r} for model config {model_config}: "
            f"{_brief(e)}. The checkpoint is corrupt or was written for a "
            "different model."
        ) from e
    verify(restored, (meta.get("checksums") or {}).get(item), step_dir)
    model = bind_params(unbound, dict(restored))
    jitted = jax.jit(
        lambda m, tokens, prediction=None: model_lib.make_denoise_fn(m, mask_id=tokenizer.mask_id)(
            tokens, prediction
        )
    )
    denoise = functools.partial(jitted, model)
    return LoadedModel(
        model=model,
        model_config=model_config,
        tokenizer=tokenizer,
        step=int(meta["step"]),
        data=str(meta.get("data", "")),
        config=dict(meta.get("config", {})),
        denoise_fn=denoise,
        params=dict(restored),
        path=step_dir,
        val_nelbo=meta.get("val_nelbo"),
    )
