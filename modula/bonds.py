"""Bonds: weightless modules with a declared sensitivity, acting on named axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from modula.core import Bond

# The largest slope of GELU, rounded up. Exact GELU x * Phi(x): its second derivative
# (2 - x^2) phi(x) vanishes at x = sqrt 2, so max slope = Phi(sqrt 2) + sqrt(2) phi(sqrt 2)
# = 1.128904; the tanh approximation (jax.nn.gelu's default) peaks at 1.128993 near x = 1.4185.
# 1.1290 is above both, so dividing by it makes either form 1-Lipschitz, hence sensitivity 1 in
# any elementwise RMS norm (checked in tests/test_modula.py).
GELU_MAX_SLOPE = 1.1290


class GELU(Bond):
    """Exact GELU / GELU_MAX_SLOPE: elementwise, slope in [-0.13, 1], sensitivity 1."""

    def forward(self, weights, x):
        return pz.nx.nmap(lambda v: jax.nn.gelu(v, approximate=False) / GELU_MAX_SLOPE)(x)


class RMSNorm(Bond):
    """x -> x / RMS(x) over ``axis``.

    Its Jacobian has norm 1 / RMS(x): sensitivity 1 holds for inputs with RMS >= 1, the
    operating point of a well-normed network (unit-RMS embeddings, convex residual mixing).
    """

    def __init__(self, axis: str = "embedding", eps: float = 1e-6):
        self.axis, self.eps = axis, eps

    def forward(self, weights, x):
        norm = lambda v: v * jax.lax.rsqrt(jnp.mean(jnp.square(v)) + self.eps)
        return pz.nx.nmap(norm)(x.untag(self.axis)).tag(self.axis)


class Attention(Bond):
    """(q, k, v) -> softmax_kv(q . k / d_head) v, bidirectional, per head.

    q, k, v: NamedArrays with axes {seq, head_dim, ...}; the output has q's axes.
    The 1 / d_head scaling (not 1 / sqrt(d_head)) keeps scores O(1) when q and k align, so
    the bond has sensitivity 1 on unit-RMS inputs (Large et al. 2024, sec. on attention),
    measured against the tuple norm RMS(dq) + RMS(dk) + RMS(dv).
    """

    def __init__(self, seq_axis: str = "seq", head_dim_axis: str = "projection"):
        self.seq_axis, self.head_dim_axis = seq_axis, head_dim_axis

    def forward(self, weights, qkv):
        q, k, v = qkv

        def attend(qa, ka, va):  # [L, d], [L, d], [L, dv] -> [L, dv]
            scores = qa @ ka.T / qa.shape[-1]
            return jax.nn.softmax(scores, axis=-1) @ va

        axes = (self.seq_axis, self.head_dim_axis)
        return pz.nx.nmap(attend)(q.untag(*axes), k.untag(*axes), v.untag(*axes)).tag(*axes)


class RoPE(Bond):
    """Rotary position embedding on (q, k): rotates pairs (x_i, x_{i + d/2}) of
    ``head_dim_axis`` by position-dependent angles. Rotations are orthogonal: sensitivity 1.
    """

    def __init__(self, seq_axis="seq", head_dim_axis="projection", max_wavelength=10_000.0):
        self.seq_axis, self.head_dim_axis, self.max_wavelength = (
            seq_axis,
            head_dim_axis,
            max_wavelength,
        )

    def rotate(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        def rot(a):  # [L, d] -> [L, d]
            half = a.shape[-1] // 2
            freq = self.max_wavelength ** (-jnp.arange(half) / half)
            angle = jnp.arange(a.shape[0])[:, None] * freq[None, :]
            c, s = jnp.cos(angle), jnp.sin(angle)
            a1, a2 = a[:, :half], a[:, half:]
            return jnp.concatenate([a1 * c - a2 * s, a1 * s + a2 * c], axis=-1)

        axes = (self.seq_axis, self.head_dim_axis)
        return pz.nx.nmap(rot)(x.untag(*axes)).tag(*axes)

    def forward(self, weights, qk):
        return tuple(self.rotate(x) for x in qk)
