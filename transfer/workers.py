"""A sweep's groups trained in several processes side by side, the CPU's cores split between them.

At a sweep's widths (32-128) one train step cannot keep two cores busy: the elementwise ops
and the small matmuls between the big ones run on one thread while the other waits. Two
processes of one thread each keep both cores working, and train more runs per hour than one
process using both (ratios measured by `python -m jif.bench`, docs/bench.md). Each worker is
a fresh process (spawned: a process running JAX cannot be forked safely), pinned to its own
cores before JAX starts its backend, and trains whole groups; the sweep's process writes every
row, so runs.csv has one writer.

On an accelerator the sweep trains in its own process (`resolve_workers`): one device, one
program at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from jif import hostmem

# XLA:CPU's flags for a process that owns one core: no thread pool inside its ops.
ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

_run_fn: Any = None  # the worker's own copy of the sweep's run function (set by _start)


def cores() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def resolve_workers(workers: int, n_groups: int, platform: str) -> int:
    """--workers 0 (auto): one worker per core on CPU, at most one per group; 1 elsewhere.
    An explicit count is kept, capped at the number of groups (an idle process helps no one)."""
    if workers == 0:
        workers = len(cores()) if platform == "cpu" else 1
    return max(1, min(workers, n_groups))


def core_sets(n_workers: int, available: Sequence[int] | None = None) -> list[list[int]]:
    """The cores of each worker: n_workers contiguous, disjoint sets of equal size taken from
    `available` (default: this process's cores); cores left over when they do not divide
    evenly stay idle. Equal sizes keep a run's numbers independent of which worker trains it:
    XLA:CPU splits a matmul's sums by its thread count, so one thread and two round
    differently, and at the top of a learning-rate grid that rounding grows to the size of
    the seeds' spread (docs/transfer.md). ValueError if there are fewer cores than workers."""
    available = cores() if available is None else list(available)
    if n_workers > len(available):
        raise ValueError(
            f"--workers {n_workers}: this machine lets the sweep use {len(available)} cores; "
            f"pass --workers {len(available)} or fewer (0 chooses)"
        )
    size = len(available) // n_workers
    return [available[i * size : (i + 1) * size] for i in range(n_workers)]


def _start(sets: list[list[int]], counter, run_fn) -> None:
    """Worker initializer: take the next core set and pin to it (the malloc policy and XLA's
    flags came in the environment, `train_groups`). Runs before the worker's first JAX
    computation, so the backend sizes its thread pool to those cores."""
    global _run_fn
    with counter.get_lock():
        mine = sets[counter.value % len(sets)]
        counter.value += 1
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, mine)
    hostmem.reuse_freed_memory()  # already so from glibc's tunables (child_env); records it
    _run_fn = run_fn


def train_group(run_fn, group: list, config) -> tuple[list[dict], float]:
    """(one result dict per run, seconds): a group through `run_group` if the run function
    trains groups and the group has several runs, else its one run through the function.
    A ValueError other than the data's (a bug: the flags were checked) becomes a RuntimeError
    naming the run."""
    from jif.data import DataError

    start = time.perf_counter()
    try:
        if len(group) > 1:
            results = run_fn.run_group(group, config)
        else:
            results = [run_fn(group[0], config)]
    except DataError:
        raise  # the data, not the run: the sweep exits with its message
    except ValueError as e:  # not a mistake in the flags (the sweep checked those): a bug
        g = group[0]
        what = f"run {g}" if len(group) == 1 else f"the group {g.optimizer} w={g.width} d={g.depth}"
        raise RuntimeError(f"{what} failed: {e}") from e
    return results, time.perf_counter() - start


def _train_in_worker(group: list, config) -> tuple[list[dict], float]:
    return train_group(_run_fn, group, config)


def train_groups(
    groups: Sequence[list],
    config,
    run_fn,
    n_workers: int,
    cost: Callable[[list], float] = len,
) -> Iterator[tuple[list, list[dict], float]]:
    """Yields (group, results, seconds) as each group finishes. With one worker the groups
    train here, in order; with several, in `n_workers` spawned processes, the costliest first
    (so that no big group starts last and trains alone). If a group fails, the groups already
    training still finish and are yielded (their runs are kept), the rest are cancelled, and
    the first error is raised."""
    if n_workers <= 1:
        for group in groups:
            yield group, *train_group(run_fn, group, config)
        return
    context = multiprocessing.get_context("spawn")
    sets = core_sets(n_workers)
    env = {**hostmem.child_env(), "JAX_PLATFORMS": "cpu"}
    if len(sets[0]) == 1:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_FLAGS}".strip()
    saved = {k: os.environ.get(k) for k in env}
    pool = ProcessPoolExecutor(
        n_workers,
        mp_context=context,
        initializer=_start,
        initargs=(sets, context.Value("i", 0), run_fn),
    )
    error: BaseException | None = None
    drained = False  # every future done: shutting down waits for nothing
    try:
        os.environ.update(env)  # the workers start (at the first submits) with it
        pending = {
            pool.submit(_train_in_worker, group, config): group
            for group in sorted(groups, key=cost, reverse=True)
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                group = pending.pop(future)
                if future.cancelled():
                    continue
                try:
                    results, seconds = future.result()
                except BrokenProcessPool:
                    error = error or RuntimeError(
                        "a sweep worker process died (out of memory?); the finished runs are "
                        "in runs.csv: rerun the same command to continue, with fewer --workers"
                    )
                    continue
                except BaseException as e:  # a group's own error: stop starting new groups
                    error = error or e
                    for other in pending:
                        other.cancel()
                    continue
                yield group, results, seconds
        drained = True
    finally:  # on Ctrl-C or an error while writing: do not wait for the running groups
        pool.shutdown(wait=drained, cancel_futures=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if error is not None:
        raise error
