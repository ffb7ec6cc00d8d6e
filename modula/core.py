"""The module contract and the composition rules of the modular norm.

Every module has a mass (its share of feature learning), a sensitivity (a bound on
RMS(output change) / RMS(input change)) and a norm on its weights such that, at unit-RMS
inputs, RMS(output change) <= ||weight change|| (Large et al. 2024, "Scalable optimization in
the modular norm"). It can initialise weights, dualise a gradient to an update of a given
norm (Bernstein & Newhouse 2024, "Modular duality in deep learning") and project weights
back to its constraint set.

Weights are ``dict[str, pz.nx.NamedArray]`` keyed by parameter label, so the same dict
serves a penzai model and its modular description. Norms are NamedArrays: 0-d, or carrying
the ``STACK_AXIS`` while inside a `Repeat` (stacked blocks are a batch of modules).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

Weights = dict[str, pz.nx.NamedArray]
STACK_AXIS = "blocks"


def nmax(a, b):
    """Elementwise max of two norms (NamedArrays broadcast by axis name)."""
    return pz.nx.nmap(jnp.maximum)(pz.nx.wrap(a) if not pz.nx.is_namedarray(a) else a, b)


def reduce_max(x: pz.nx.NamedArray, keep: tuple[str, ...] = ()) -> pz.nx.NamedArray:
    """Max over every named axis of ``x`` except ``keep``."""
    axes = [a for a in x.named_shape if a not in keep]
    return pz.nx.nmap(jnp.max)(x.untag(*axes)) if axes else x


class Module:
    """Base class. Subclasses set ``children`` and override what they need."""

    children: tuple[Module, ...] = ()

    # --- structure ------------------------------------------------------------------
    @property
    def mass(self) -> float:
        return sum(c.mass for c in self.children)

    @property
    def sensitivity(self) -> float:
        raise NotImplementedError

    @property
    def labels(self) -> tuple[str, ...]:
        """Parameter labels of all atoms in this module, in forward order."""
        return tuple(lab for c in self.children for lab in c.labels)

    def atoms(self) -> list[Module]:
        return [a for c in self.children for a in c.atoms()]

    def tare(self, absolute: float) -> Module:
        """Rescale the masses of all atoms so that this module's mass is ``absolute``."""
        factor = absolute / self.mass
        for atom in self.atoms():
            atom.mass_value *= factor
        return self

    # --- the contract ---------------------------------------------------------------
    def forward(self, weights: Weights, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def initialize(self, key: jax.Array) -> Weights:
        keys = jax.random.split(key, max(len(self.children), 1))
        out: Weights = {}
        for c, k in zip(self.children, keys, strict=False):
            out.update(c.initialize(k))
        return out

    def norm(self, weights: Weights) -> pz.nx.NamedArray:
        raise NotImplementedError

    def dualize(self, grads: Weights, target_norm=1.0) -> Weights:
        raise NotImplementedError

    def project(self, weights: Weights) -> Weights:
        out: Weights = {}
        for c in self.children:
            out.update(c.project(_pick(weights, c)))
        return out

    # --- algebra (Modula's notation) ------------------------------------------------
    def __matmul__(self, other: Module | tuple) -> Module:
        """``a @ b``: apply b, then a."""
        return Sequential(other if isinstance(other, Module) else Tuple(*other), self)

    def __add__(self, other: Module) -> Module:
        return Add() @ Tuple(self, other)

    def __rmul__(self, scale: float) -> Module:
        return Mul(scale) @ self

    def __call__(self, weights: Weights, x):
        return self.forward(weights, x)


def _pick(weights: Weights, module: Module) -> Weights:
    return {k: weights[k] for k in module.labels}


class Bond(Module):
    """A module without weights: mass 0, nothing to initialise, dualise or project."""

    sensitivity_value = 1.0

    @property
    def mass(self) -> float:
        return 0.0

    @property
    def sensitivity(self) -> float:
        return self.sensitivity_value

    def norm(self, weights: Weights) -> pz.nx.NamedArray:
        return pz.nx.wrap(jnp.zeros(()))

    def dualize(self, grads: Weights, target_norm=1.0) -> Weights:
        return {}


class Identity(Bond):
    def forward(self, weights, x):
        return x


class Mul(Bond):
    """x -> scale * x; sensitivity |scale|."""

    def __init__(self, scale: float):
        self.scale = float(scale)
        self.sensitivity_value = abs(self.scale)

    def forward(self, weights, x):
        return x * self.scale


class Add(Bond):
    """(x1, ..., xn) -> sum; RMS(sum of changes) <= sum of RMS changes: sensitivity 1."""

    def forward(self, weights, xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Sequential(Module):
    """``second(first(x))``: masses add, sensitivities multiply.

    Norm: max(nu2 * mu / mu1 * ||w1||, mu / mu2 * ||w2||); then a unit modular-norm
    change moves the output by at most nu2 * mu1/mu + mu2/mu = 1. Dualising to target eta
    gives the first eta * mu1 / mu / nu2 and the second eta * mu2 / mu, which attains
    the max in both terms.
    """

    def __init__(self, first: Module, second: Module):
        self.children = (first, second)

    @property
    def sensitivity(self) -> float:
        return self.children[0].sensitivity * self.children[1].sensitivity

    def forward(self, weights, x):
        first, second = self.children
        return second.forward(_pick(weights, second), first.forward(_pick(weights, first), x))

    def _scales(self) -> tuple[float, float]:
        """Factors turning each child's norm into its term of this module's norm."""
        (first, second), mu = self.children, self.mass
        return (
            second.sensitivity * mu / first.mass if first.mass > 0 else 0.0,
            mu / second.mass if second.mass > 0 else 0.0,
        )

    def norm(self, weights):
        terms = [
            s * c.norm(_pick(weights, c))
            for s, c in zip(self._scales(), self.children, strict=True)
        ]
        return nmax(terms[0], terms[1])

    def dualize(self, grads, target_norm=1.0):
        out: Weights = {}
        for s, c in zip(self._scales(), self.children, strict=True):
            g = _pick(grads, c)
            out.update(c.dualize(g, target_norm / s) if s > 0 else _zeros(g))
        return out


class Tuple(Module):
    """x -> (m1(x), ..., mn(x)) with output norm sum of RMS: sensitivities add.

    Norm: max_i mu / mu_i * ||w_i||; a unit change moves the outputs by sum_i mu_i/mu = 1.
    """

    def __init__(self, *modules: Module):
        self.children = tuple(modules)

    @property
    def sensitivity(self) -> float:
        return sum(c.sensitivity for c in self.children)

    def forward(self, weights, x):
        return tuple(c.forward(_pick(weights, c), x) for c in self.children)

    def norm(self, weights):
        out = pz.nx.wrap(jnp.zeros(()))
        for c in self.children:
            if c.mass > 0:
                out = nmax(out, self.mass / c.mass * c.norm(_pick(weights, c)))
        return out

    def dualize(self, grads, target_norm=1.0):
        out: Weights = {}
        for c in self.children:
            g = _pick(grads, c)
            out.update(c.dualize(g, target_norm * c.mass / self.mass) if c.mass > 0 else _zeros(g))
        return out


class Repeat(Module):
    """``block`` applied ``n`` times; the weights of copy k are slice k of ``STACK_AXIS``.

    This is the sequential rule unrolled: mass n * mu, sensitivity nu ** n, and copy k
    (0 first) has downstream sensitivity nu ** (n - 1 - k), so
    norm = max_k n * nu ** (n - 1 - k) * ||w_k|| and copy k gets target eta / (n nu^(n-1-k)).
    """

    def __init__(self, block: Module, n: int):
        if n < 1:
            raise ValueError(f"Repeat needs n >= 1 copies, got n={n}")
        self.children, self.n = (block,), n

    @property
    def mass(self) -> float:
        return self.n * self.children[0].mass

    @property
    def sensitivity(self) -> float:
        return self.children[0].sensitivity ** self.n

    def _scale(self) -> pz.nx.NamedArray:
        nu = self.children[0].sensitivity
        k = jnp.arange(self.n, dtype=jnp.float32)
        return pz.nx.wrap(self.n * nu ** (self.n - 1 - k)).tag(STACK_AXIS)

    def forward(self, weights, x):
        (block,) = self.children
        for k in range(self.n):
            x = block.forward({n: w[{STACK_AXIS: k}] for n, w in weights.items()}, x)
        return x

    def initialize(self, key):
        per_copy = [self.children[0].initialize(k) for k in jax.random.split(key, self.n)]
        return {lab: pz.nx.stack([w[lab] for w in per_copy], STACK_AXIS) for lab in self.labels}

    def norm(self, weights):
        return reduce_max(self._scale() * self.children[0].norm(weights))

    def dualize(self, grads, target_norm=1.0):
        if self.mass == 0:
            return _zeros(grads)
        return self.children[0].dualize(grads, target_norm / self._scale())


class Parallel(Repeat):
    """``n`` copies of ``block`` side by side, each reading the same input; the weights of
    copy k are slice k of ``STACK_AXIS`` (per-block modulations that all read one condition).

    The tuple rule with n equal masses: mass n * mu, sensitivity n * nu (outputs add),
    norm = max_k n * ||w_k||, and every copy gets the same target eta / n.
    """

    @property
    def sensitivity(self) -> float:
        return self.n * self.children[0].sensitivity

    def _scale(self) -> pz.nx.NamedArray:
        return pz.nx.wrap(jnp.full((self.n,), float(self.n), jnp.float32)).tag(STACK_AXIS)

    def forward(self, weights, x):
        (block,) = self.children
        return tuple(
            block.forward({n: w[{STACK_AXIS: k}] for n, w in weights.items()}, x)
            for k in range(self.n)
        )


def residual(branch: Module, depth: float) -> Module:
    """x -> (1 - 1/depth) x + (1/depth) branch(x): sensitivity (1 - 1/depth) + nu / depth.

    The 1/depth weighting keeps the sensitivity of a depth-``depth`` stack of unit-sensitivity
    branches at 1, and the mass ratio of the sequential rule cancels the 1/depth in the norm.
    """
    return (1 - 1 / depth) * Identity() + (1 / depth) * branch


def _zeros(grads: Weights) -> Weights:
    return jax.tree.map(jnp.zeros_like, grads)
