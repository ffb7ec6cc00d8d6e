"""FLOPs and peaks: the one place that says how much work a step does and what 100% is.

MFU = flops_per_token * tokens/s / peak. The training log and `python -m jif.bench` both
read these functions.

Peak: on an accelerator its nameplate dense bf16 FLOP/s (times the device count); on CPU the
best FLOP/s of a jitted n x n float32 matmul measured in the same process.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from jif import diffusion
from jif import model as model_lib

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


def flops_per_token(config, seq_len: int, readout_fraction: float = 1.0) -> float:
    """Forward matmul FLOPs per token (2 per multiply-add) incl. attention scores and logits;
    per-sequence adaLN conditioning work is divided by seq_len. readout_fraction: the share
    of positions whose logits are computed (the training loss needs only masked ones)."""
    d, L = config.d_model, seq_len
    per_block = 2 * (4 * d * d + 2 * config.mlp_ratio * d * d) + 2 * 2 * L * d  # qkvo, mlp, attn
    total = config.n_layers * per_block + readout_fraction * 2 * d * config.vocab_size
    if config.adaln:
        c, n_freq = config.cond_dim, model_lib.N_FREQUENCIES
        per_seq = 2 * (n_freq * c + c * c) + 2 * c * d * (6 * config.n_layers + 2)
        total += per_seq / L
    return float(total)


def train_step_flops(config, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step: forward + backward (3x forward), with logits read
    out at the loss's capacity of masked rows (`jif.diffusion.readout_capacity`)."""
    tokens = batch_size * seq_len
    read = diffusion.readout_capacity(batch_size, seq_len) / tokens
    return 3 * flops_per_token(config, seq_len, read) * tokens


def stated_peak() -> float | None:
    """Nameplate FLOP/s of all accelerators, or None on CPU (measure it instead)."""
    devices = jax.devices()
    kind = devices[0].device_kind.lower()
    for name, peak in ACCELERATOR_PEAKS.items():
        if name.lower() in kind:
            return peak * len(devices)
    return None


class MatmulPeak:
    """A jitted n x n float32 matmul; `measure()` -> FLOP/s of the best of `repeats` calls."""

    def __init__(self, n: int = 2048):
        self.n = n
        self.x = jax.device_put(jnp.ones((n, n), jnp.float32) / n)
        self.f = jax.jit(lambda x: x @ x)
        self.f(self.x).block_until_ready()

    def measure(self, repeats: int = 3) -> float:
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.f(self.x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return 2 * self.n**3 / best


@functools.cache
def peak_flops(n: int = 2048) -> float:
    """The machine's "100%": the accelerators' stated peak, or a measured CPU matmul."""
    return stated_peak() or MatmulPeak(n).measure()
