"""Atoms: modules with weights. Each weight is a NamedArray; axes an atom does not name
(e.g. ``"blocks"``) are batch axes: a stack of independent copies of the atom."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import _muon
from penzai import pz

from modula.core import STACK_AXIS, Module, reduce_max

# Muon's quintic Newton-Schulz step (Jordan et al. 2024, as shipped in optax.contrib.muon):
# 5 steps map every singular value s of X / ||X||_F with s >= 3e-3 into about [0.68, 1.20].
# Three cubic Newton-Schulz steps (1.5, -0.5, 0) (Higham 2008, "Functions of Matrices",
# eq. 8.20; fixed point 1 with zero slope) then tighten that band to about [0.999, 1.0],
# so dualised updates have the target norm to within 0.1%.
NS_COEFFS = np.array([_muon._DEFAULT_NS_COEFFS] * 5 + [(1.5, -0.5, 0.0)] * 3, np.float32)


def orthogonalize(x: jax.Array, ns_coeffs: np.ndarray = NS_COEFFS) -> jax.Array:
    """[m, n] -> approximately U V^T where X = U S V^T (optax's Newton-Schulz)."""
    return _muon.orthogonalize_via_newton_schulz(x, jnp.asarray(ns_coeffs))


def _like(x: pz.nx.NamedArray, ref: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """x with ref's axis order and dtype, so optax sees the same pytree structure."""
    return pz.nx.order_like(x, ref).astype(ref.dtype)


def _rms(x: jax.Array, axis=None, keepdims=False) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=keepdims))


class Atom(Module):
    """An atom owns one parameter ``name``; default mass 1 (Modula's convention)."""

    def __init__(self, name: str, mass: float = 1.0):
        self.name, self.mass_value = name, float(mass)

    @property
    def mass(self) -> float:
        return self.mass_value

    @property
    def labels(self):
        return (self.name,)

    def atoms(self):
        return [self]

    def norm(self, weights):
        """Per-copy norm, maximised over batch axes except ``STACK_AXIS``."""
        return reduce_max(self.slice_norm(weights[self.name]), keep=(STACK_AXIS,))

    def dualize(self, grads, target_norm=1.0):
        g = grads[self.name]
        return {self.name: _like(self.unit_dual(g) * target_norm, g)}

    def project(self, weights):
        w = weights[self.name]
        return {self.name: _like(self.unit_project(w), w)}


class Linear(Atom):
    """y = x W, contracting ``in_axes`` and producing ``out_axes`` (penzai's pz.nn.Linear).

    Norm: the RMS -> RMS operator norm sqrt(fan_in / fan_out) * ||W||_2, so that
    RMS(x dW) <= ||dW|| * RMS(x). Sensitivity 1: weights are kept at RMS->RMS norm 1
    (orthogonal init / projection). Dual of the norm: U V^T * sqrt(fan_out / fan_in).
    """

    sensitivity = 1.0

    def __init__(self, name, in_axes: dict[str, int], out_axes: dict[str, int], mass=1.0):
        super().__init__(name, mass)
        self.in_axes, self.out_axes = dict(in_axes), dict(out_axes)
        self.fan_in = math.prod(self.in_axes.values())
        self.fan_out = math.prod(self.out_axes.values())

    def _on_matrix(self, fn, w):
        """Apply fn to the [fan_in, fan_out] matrix of every copy; fn returns [..] or scalar."""
        axes = (*self.in_axes, *self.out_axes)

        def per_copy(m):
            out = fn(m.reshape(self.fan_in, self.fan_out).astype(jnp.float32))
            return out.reshape(m.shape) if out.ndim == 2 else out

        out = pz.nx.nmap(per_copy)(w.untag(*axes))
        return out.tag(*axes) if out.positional_shape else out

    def forward(self, weights, x):
        w = weights[self.name]
        contract = lambda a, b: jnp.tensordot(a, b, a.ndim)
        return pz.nx.nmap(contract)(x.untag(*self.in_axes), w.untag(*self.in_axes))

    def initialize(self, key):
        shape = (*self.in_axes.values(), *self.out_axes.values())
        w = pz.nx.wrap(jax.random.normal(key, shape)).tag(*self.in_axes, *self.out_axes)
        return self.project({self.name: w})

    def slice_norm(self, w):
        scale = math.sqrt(self.fan_in / self.fan_out)
        return self._on_matrix(lambda m: scale * jnp.linalg.norm(m, ord=2), w)

    def unit_dual(self, g):
        scale = math.sqrt(self.fan_out / self.fan_in)
        return self._on_matrix(lambda m: scale * orthogonalize(m), g)

    unit_project = unit_dual  # the constraint set: RMS->RMS norm 1, all singular values equal


class Embedding(Atom):
    """One vector along ``embed_axes`` per entry of ``vocab_axis``; y = W[token].

    Norm: max over vectors of their RMS (a token's output changes by exactly the RMS of its
    vector's change). Dual: every vector's gradient normalised to RMS 1, times the target.
    Sensitivity 1 by Modula's convention (the input is discrete).
    """

    sensitivity = 1.0

    def __init__(self, name, vocab_axis: tuple[str, int], embed_axes: dict[str, int], mass=1.0):
        super().__init__(name, mass)
        self.vocab_axis, self.embed_axes = vocab_axis, dict(embed_axes)

    def forward(self, weights, tokens):
        return weights[self.name][{self.vocab_axis[0]: tokens}]

    def initialize(self, key):
        shape = (self.vocab_axis[1], *self.embed_axes.values())
        w = pz.nx.wrap(jax.random.normal(key, shape)).tag(self.vocab_axis[0], *self.embed_axes)
        return self.project({self.name: w})

    def _per_vector(self, fn, w):
        axes = tuple(self.embed_axes)
        out = pz.nx.nmap(fn)(w.untag(*axes))
        return out.tag(*axes) if out.positional_shape else out

    def slice_norm(self, w):
        return reduce_max(self._per_vector(_rms, w), keep=(STACK_AXIS,))

    def unit_dual(self, g):
        def normalise(v):
            r = _rms(v)
            return jnp.where(r > 0, v / jnp.where(r > 0, r, 1.0), 0.0)

        return self._per_vector(normalise, g)

    unit_project = unit_dual  # the constraint set: every vector at RMS 1


class Gain(Atom):
    """y = g * x elementwise over ``axes`` (the scale of RMS norm / adaLN).

    Norm: max |g| (RMS(dg * x) <= max|dg| * RMS(x)). Dual of the max-norm: sign(grad).
    Sensitivity max|g| = 1 at init (ones) and after projection (clip to [-1, 1]).
    """

    sensitivity = 1.0

    def __init__(self, name, axes: dict[str, int], mass=1.0):
        super().__init__(name, mass)
        self.axes = dict(axes)

    def forward(self, weights, x):
        return x * weights[self.name]

    def initialize(self, key):
        return {self.name: pz.nx.ones(self.axes)}

    def slice_norm(self, w):
        return pz.nx.nmap(lambda v: jnp.max(jnp.abs(v)))(w.untag(*self.axes))

    def unit_dual(self, g):
        return pz.nx.nmap(jnp.sign)(g)

    def unit_project(self, w):
        return pz.nx.nmap(lambda v: jnp.clip(v, -1.0, 1.0))(w)


class Bias(Atom):
    """y = x + b over ``axes``. Norm: RMS(b) (the output moves by exactly RMS(db)).

    Dual: grad / RMS(grad). Sensitivity 1 (a shift). Projection: into the unit RMS ball.
    """

    sensitivity = 1.0

    def __init__(self, name, axes: dict[str, int], mass=1.0):
        super().__init__(name, mass)
        self.axes = dict(axes)

    def forward(self, weights, x):
        return x + weights[self.name]

    def initialize(self, key):
        return {self.name: pz.nx.zeros(self.axes)}

    def slice_norm(self, w):
        return pz.nx.nmap(_rms)(w.untag(*self.axes))

    def unit_dual(self, g):
        def normalise(v):
            r = _rms(v)
            return jnp.where(r > 0, v / jnp.where(r > 0, r, 1.0), 0.0)

        return pz.nx.nmap(normalise)(g.untag(*self.axes)).tag(*self.axes)

    def unit_project(self, w):
        shrink = lambda v: v / jnp.maximum(_rms(v), 1.0)
        return pz.nx.nmap(shrink)(w.untag(*self.axes)).tag(*self.axes)
