"""FLOPs and peaks: the one place that says how much work a step does and what 100% is.

MFU = flops_per_token * tokens/s / peak. The training log and `python -m jif.bench` (and
`jif.bench.accel`) all read these functions.

Peak (`peak_flops(dtype)`): on an accelerator its nameplate dense FLOP/s for the dtype used
(times the device count); on CPU the faster of XLA's jitted n x n float32 matmul and the
machine's BLAS (numpy's matmul), both measured in the same process: XLA:CPU's matmul can be
20% slower than the BLAS, and MFU against the slower one would flatter the model.
`processor()` names the chip every figure was measured on.
"""

from __future__ import annotations

import functools
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jif import diffusion
from jif import model as model_lib

# Nameplate dense matmul FLOP/s per device, by device_kind substring (first match wins) and
# dtype. NVIDIA float32: TF32 tensor cores, which XLA uses for float32 matmuls at jax's
# default precision; TPU float32: jax's default precision runs bfloat16 passes on the MXU.
ACCELERATOR_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},  # SXM; same compute as H100 SXM
    "H100": {"bfloat16": 989e12, "float32": 494e12},  # SXM (the PCIe card: 756 / 378)
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 60e12},
    "TPU v2": {"bfloat16": 45e12, "float32": 45e12},
    "TPU v3": {"bfloat16": 123e12, "float32": 123e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p reports itself as "TPU v5"
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
}


def processor() -> str:
    """The chip figures come from: the accelerator's device_kind, or on CPU the OS's model
    name with its family and model numbers (/proc/cpuinfo: a virtual machine may call very
    different chips just "AMD EPYC"), else platform.processor()."""
    if jax.default_backend() != "cpu":
        return jax.devices()[0].device_kind
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():  # the first processor's block ends here
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
        return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")
    return platform.processor() or platform.machine() or "unknown"


def flops_per_token(
    config, seq_len: int, readout_fraction: float = 1.0, self_condition: float = 1.0
) -> float:
    """Forward matmul FLOPs per token (2 per multiply-add) incl. attention scores and logits;
    per-sequence adaLN conditioning work is divided by seq_len. readout_fraction: the share
    of positions whose logits are computed (the training loss needs only masked ones).
    self_condition: the share of calls that take the self-conditioning first pass (all of
    them at inference, half in training), if the model has one (`first_pass_flops`)."""
    d, L = config.d_model, seq_len
    per_block = 2 * (4 * d * d + 2 * config.mlp_ratio * d * d) + 2 * 2 * L * d  # qkvo, mlp, attn
    total = config.n_layers * per_block + readout_fraction * 2 * d * config.vocab_size
    if config.adaln:
        c, n_freq = config.cond_dim, model_lib.N_FREQUENCIES
        per_seq = 2 * (n_freq * c + c * c) + 2 * c * d * (6 * config.n_layers + 2)
        total += per_seq / L
    if self_condition:
        total += self_condition * first_pass_flops(config, seq_len)
    return float(total)


def first_pass_flops(config, seq_len: int) -> float:
    """Forward FLOPs per token of self-conditioning's first pass (logits everywhere) and of
    its input (the predicted distribution through the token table and the projection);
    0 for a model without it."""
    if not getattr(config, "self_condition", False):
        return 0.0
    d = config.d_model
    plain = flops_per_token(config, seq_len, 1.0, self_condition=0.0)
    return plain + 2 * d * config.vocab_size + 2 * d * d


def train_step_flops(config, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step: forward + backward (3x forward), with logits read
    out at the loss's capacity of masked rows (`jif.diffusion.readout_capacity`); with
    self-conditioning, its first pass (forward only: its output is gradient-stopped) on
    half of the steps."""
    tokens = batch_size * seq_len
    read = diffusion.readout_capacity(batch_size, seq_len) / tokens
    second = 3 * flops_per_token(config, seq_len, read, self_condition=0.0)
    return (second + 0.5 * first_pass_flops(config, seq_len)) * tokens


def stated_peak(dtype: str = "bfloat16") -> float | None:
    """Nameplate FLOP/s of all accelerators for `dtype`, or None on CPU or an accelerator
    not in ACCELERATOR_PEAKS (measure it instead)."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return None
    kind = devices[0].device_kind.lower()
    for name, peaks in ACCELERATOR_PEAKS.items():
        if name.lower() in kind:
            return peaks["float32" if dtype == "float32" else "bfloat16"] * len(devices)
    return None


def _best_seconds(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class MatmulPeak:
    """The measured "100%": `measure()` -> FLOP/s of the faster of a jitted n x n matmul
    (XLA, in `dtype`) and, on CPU, numpy's float32 matmul (the machine's BLAS), each the best
    of `repeats` calls; `last` holds both figures of the latest measurement."""

    def __init__(self, n: int = 2048, dtype: str = "float32"):
        self.n = n
        self.x = jax.device_put(jnp.ones((n, n), dtype) / n)
        self.f = jax.jit(lambda x: x @ x)
        self.f(self.x).block_until_ready()
        self.blas = jax.default_backend() == "cpu"
        self.a = np.ones((n, n), np.float32) / n
        self.last: dict[str, float] = {}

    def measure(self, repeats: int = 3) -> float:
        flop = 2 * self.n**3
        self.last = {
            "xla": flop / _best_seconds(lambda: self.f(self.x).block_until_ready(), repeats)
        }
        if self.blas:
            self.last["numpy"] = flop / _best_seconds(lambda: self.a @ self.a, repeats)
        return max(self.last.values())


@functools.cache
def peak_flops(dtype: str | None = None, n: int = 2048) -> float:
    """The machine's "100%" for `dtype` (None: jif.model.default_dtype()): the accelerators'
    stated peak, or the measured matmul peak (`MatmulPeak`)."""
    dtype = dtype or model_lib.default_dtype()
    return stated_peak(dtype) or MatmulPeak(n, dtype).measure()
