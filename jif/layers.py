"""penzai-compatible layers that compile to faster code on XLA:CPU.

Each one computes what a penzai layer computes (same parameters, same values, same
gradients; tests/test_layers.py checks every one against the layer it replaces), in a form
that avoids a slow pattern of penzai's generic implementation. The comment on each says
which pattern.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz


def flat_contract(x: pz.nx.NamedArray, w: pz.nx.NamedArray, ins, outs) -> pz.nx.NamedArray:
    """x {rest, ins} . w {ins, outs} -> {rest, outs} as ONE [rest, ins] @ [ins, outs] matmul
    (penzai's contract vmaps over "batch"/"seq"; XLA:CPU then transposes weight gradients)."""
    rest = tuple(n for n in x.named_shape if n not in ins)
    k = math.prod(w.named_shape[n] for n in ins)
    y = x.unwrap(*rest, *ins).reshape(-1, k) @ w.unwrap(*ins, *outs).reshape(k, -1)
    shape = [x.named_shape[n] for n in rest] + [w.named_shape[n] for n in outs]
    return pz.nx.wrap(y.reshape(shape)).tag(*rest, *outs)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class FlatLinear(pz.nn.Linear):
    """pz.nn.Linear computed by `flat_contract` (same parameters, same result, faster)."""

    def __call__(self, x: pz.nx.NamedArray, **side) -> pz.nx.NamedArray:
        w, ins, outs = self.weights.value, tuple(self.in_axis_names), tuple(self.out_axis_names)
        par = tuple(n for n in w.named_shape if n not in ins + outs)  # parallel axes (gains)
        if x.positional_shape or (par and (ins or outs)):
            return super().__call__(x, **side)
        if par:  # elementwise gain, in x's own axis order
            rest = tuple(n for n in x.named_shape if n not in par)
            return pz.nx.wrap(x.unwrap(*rest, *par) * w.unwrap(*par)).tag(*rest, *par)
        return flat_contract(x, w, ins, outs)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class FlatRMSStandardize(pz.nn.RMSStandardize):
    """pz.nn.RMSStandardize in x's own axis order (penzai's nmap transposes `across` first)."""

    def __call__(self, x: pz.nx.NamedArray, **_side) -> pz.nx.NamedArray:
        across = (self.across,) if isinstance(self.across, str) else tuple(self.across)
        rest = tuple(n for n in x.named_shape if n not in across)
        a = x.unwrap(*rest, *across)
        ms = jnp.mean(jnp.square(a), axis=tuple(range(len(rest), a.ndim)), keepdims=True)
        return pz.nx.wrap(a * jax.lax.rsqrt(ms + self.epsilon)).tag(*rest, *across)


@pz.pytree_dataclass
class Embed(pz.nn.Layer):
    """Token embedding by ONE indexing op (table[ids]); penzai's EmbeddingLookup vmaps per
    token."""

    table: pz.nn.ParameterLike[pz.nx.NamedArray]  # {"vocabulary", "embedding"}

    def __call__(self, tokens: pz.nx.NamedArray, **_side) -> pz.nx.NamedArray:
        names = tuple(tokens.named_shape)
        table = self.table.value.unwrap("vocabulary", "embedding")
        return pz.nx.wrap(table[tokens.unwrap(*names)]).tag(*names, "embedding")


@pz.pytree_dataclass
class SoftmaxF32(pz.nn.Layer):
    """pz.nn.Softmax over `axis` computed in float32 (exponentials and their sum keep their
    precision under bfloat16), returned in the input dtype."""

    axis: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **_side) -> pz.nx.NamedArray:
        y = pz.nx.nmap(jax.nn.softmax)(x.astype(jnp.float32).untag(self.axis))
        return y.tag(self.axis).astype(x.dtype)


@pz.pytree_dataclass
class Unembed(pz.nn.Layer):
    """pz.nn.Linear {"embedding"} -> {"vocabulary"} on the first `size` columns of a padded
    table: drops the padding columns before the matmul (by `flat_contract`), so the logits
    have exactly `size` entries and no work is spent on padding."""

    weights: pz.nn.ParameterLike[pz.nx.NamedArray]  # {"embedding", "vocabulary"} (padded)
    size: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **_side) -> pz.nx.NamedArray:
        w = self.weights.value
        if w.named_shape["vocabulary"] != self.size:
            w = w[{"vocabulary": pz.slice[: self.size]}]
        return flat_contract(x, w, ("embedding",), ("vocabulary",))


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class TableRoPE(pz.nn.ApplyRoPE):
    """pz.nn.ApplyRoPE (the same rotation, rotate-half convention) from cos/sin tables of
    {positions} x frequencies. When the positions are a numpy array (`static_positions`) the
    tables are numpy constants; traced, XLA:CPU fuses sin/cos into the rotation and computes
    them again for every query/key entry."""

    def __call__(self, inputs: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        pos, axis = side_inputs[self.positions_input_name], self.embedding_axis
        names = tuple(n for n in inputs.named_shape if n != axis)
        if (
            axis in pos.named_shape
            or pos.positional_shape
            or not set(pos.named_shape) <= set(names)
        ):
            return super().__call__(inputs, **side_inputs)  # penzai's checks and messages
        pos_names = tuple(n for n in names if n in pos.named_shape)  # in the input's order
        xp = np if isinstance(pos.data_array, np.ndarray) else jnp
        half = inputs.named_shape[axis] // 2
        fraction = 2 * xp.arange(half, dtype=np.float32) / np.float32(2 * half)
        timescale = np.float32(self.max_wavelength) ** fraction
        angle = pos.unwrap(*pos_names)[..., None].astype(np.float32) / timescale
        shape = [inputs.named_shape[n] if n in pos_names else 1 for n in names] + [half]
        cos, sin = xp.cos(angle).reshape(shape), xp.sin(angle).reshape(shape)
        x = inputs.unwrap(*names, axis)
        x1, x2 = x[..., :half], x[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return pz.nx.wrap(out.astype(inputs.dtype)).tag(*names, axis)


def static_positions(n: int, name: str = "seq") -> pz.nx.NamedArray:
    """Positions 0..n-1 along `name`, held as a numpy array (constant under jit), so that
    `TableRoPE` builds its tables once at trace time (pz.nx.arange would trace them)."""
    axes = collections.OrderedDict({name: n})
    return pz.nx.NamedArray(named_axes=axes, data_array=np.arange(n, dtype=np.int32))


@pz.pytree_dataclass
class ScaledResidual(pz.nn.Layer):
    """x <- (1 - alpha) x + alpha delta(x): a convex mix of the stream and the branch
    (pz.nn.Residual is x + delta(x)); modula's depth-scaled residual."""

    delta: pz.nn.Layer
    alpha: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, **side):
        return (1 - self.alpha) * x + self.alpha * self.delta(x, **side)


def causal_mask(dtype) -> pz.nn.ApplyCausalAttentionMask:
    """penzai's causal mask on attention scores {"seq", "kv_seq", ...}: key positions after
    the query's ("token_positions" side input) get the dtype's most negative finite value
    (as penzai's llamalike models), so their softmax weight is exactly 0."""
    return pz.nn.ApplyCausalAttentionMask(masked_out_value=jnp.asarray(jnp.finfo(dtype).min, dtype))
