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
from collections.abc import Callable

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


# ----------------------------------------------------------------------------- attention


def _head_major(q, k, v, *, scale: float, causal: bool) -> jax.Array:
    """Attention on [..., heads, seq, head] arrays: scores and softmax in float32, masked
    scores at float32's most negative value (their weight is exactly 0)."""
    s = jnp.einsum("...th,...sh->...ts", q * jnp.asarray(scale, q.dtype), k)
    s = s.astype(jnp.float32)
    if causal:
        t = q.shape[-2]
        s = jnp.where(np.tri(t, dtype=bool), s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("...ts,...sh->...th", p, v)


def _xla_attention(q, k, v, *, scale: float, causal: bool) -> jax.Array:
    """Attention as XLA ops in the head-major layout [batch, heads, seq, head]. Not
    jax.nn.dot_product_attention's XLA path: on XLA:CPU its [batch, seq, heads] einsums (and
    its vmap over head groups) made attention's forward and backward 1.6x slower (32 x 128,
    4 heads of 64; docs/bench.md)."""
    bnth = lambda a: jnp.swapaxes(a, 1, 2)
    return bnth(_head_major(bnth(q), bnth(k), bnth(v), scale=scale, causal=causal))


def _chunked_attention(q, k, v, *, scale: float, causal: bool) -> jax.Array:
    """`_xla_attention` one (batch, head) pair at a time (lax.map), its scores recomputed in
    the backward pass (jax.checkpoint) instead of stored: on CPU each pair's score matrix
    stays in cache, as in flash attention. At 4 x 1024 tokens (4 heads of 64) forward and
    backward alone took 0.66x the CPU time of `_xla_attention`, but in the whole train step
    it was slower (docs/bench.md), so `auto` does not pick it. Sequential: for CPUs."""
    b, t, n, h = q.shape
    pairs = lambda a: jnp.swapaxes(a, 1, 2).reshape(b * n, t, h)
    core = jax.checkpoint(lambda x: _head_major(*x, scale=scale, causal=causal))
    out = jax.lax.map(core, (pairs(q), pairs(k), pairs(v)))
    return jnp.swapaxes(out.reshape(b, n, t, h), 1, 2)


def _cudnn_attention(q, k, v, *, scale: float, causal: bool) -> jax.Array:
    """cuDNN's fused flash attention (NVIDIA GPUs; bfloat16 or float16 inputs)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}: "
            "use dtype='bfloat16' or attention='xla'."
        )
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
    )


PALLAS_BLOCK = 128  # the TPU kernel's default block size: seq_len must be a multiple of it


def _pallas_attention(q, k, v, *, scale: float, causal: bool) -> jax.Array:
    """The Pallas flash-attention kernel for TPU (jax.experimental.pallas.ops.tpu); it takes
    [batch, heads, seq, head] and keeps scores and softmax in float32 inside its blocks.
    Imported here, not at module load: it is a TPU-only kernel."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    if q.shape[1] % PALLAS_BLOCK:
        raise ValueError(
            f"attention='pallas' needs seq_len to be a multiple of {PALLAS_BLOCK}, got "
            f"{q.shape[1]}: change --seq-len or use attention='xla'."
        )
    bnth = lambda a: jnp.swapaxes(a, 1, 2)
    out = tpu_flash.flash_attention(bnth(q), bnth(k), bnth(v), causal=causal, sm_scale=scale)
    return bnth(out)


# name -> (kernel on [batch, seq, heads, head] arrays, the jax platforms it runs on)
ATTENTION_KERNELS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "xla": (_xla_attention, ("cpu", "gpu", "tpu")),
    "chunked": (_chunked_attention, ("cpu", "gpu", "tpu")),
    "cudnn": (_cudnn_attention, ("gpu",)),  # jax reports NVIDIA GPUs as platform "gpu"/"cuda"
    "pallas": (_pallas_attention, ("tpu",)),
}
ATTENTION_NAMES = ("auto", *ATTENTION_KERNELS)


def pick_attention(name: str, *, platform: str, dtype, seq_len: int) -> str:
    """The attention kernel to run: `name` itself when forced (ValueError when its platform
    is not this one), or for "auto" cuDNN on NVIDIA GPUs in (b)float16, the Pallas kernel on
    TPU when seq_len fits its blocks, XLA otherwise (on CPU too: in the whole train step
    `xla` took 0.84-0.96x the CPU time of `chunked` at 128-1024 tokens; docs/bench.md)."""
    platform = "gpu" if platform in ("cuda", "rocm", "gpu") else platform
    if name == "auto":
        if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        if platform == "tpu" and seq_len % PALLAS_BLOCK == 0:
            return "pallas"
        return "xla"
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention={name!r} is not one of {list(ATTENTION_NAMES)}.")
    if platform not in ATTENTION_KERNELS[name][1]:
        raise ValueError(
            f"attention={name!r} runs on {ATTENTION_KERNELS[name][1]}, but jax's backend "
            f"here is {platform!r}: use attention='auto' (or 'xla')."
        )
    return name


@pz.pytree_dataclass
class DotProductAttention(pz.nn.Layer):
    """Multi-head attention as one fused kernel (`ATTENTION_KERNELS`, chosen by
    `pick_attention` when first traced): what pz.nn.Attention computes with `as_penzai()`'s
    layers (query . key scaled by `scale`, optionally causal, softmax over keys in float32,
    times values, output projection), without penzai's nmapped einsums and their layout
    changes. query/key/value map {..., "seq", "embedding"} -> {..., "seq", "heads",
    "projection"} (RoPE included); output maps {..., "heads", "projection"} back."""

    query: pz.nn.Layer
    key: pz.nn.Layer
    value: pz.nn.Layer
    output: pz.nn.Layer
    scale: float = dataclasses.field(metadata={"pytree_node": False})
    causal: bool = dataclasses.field(metadata={"pytree_node": False})
    implementation: str = dataclasses.field(default="auto", metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side) -> pz.nx.NamedArray:
        q, k, v = (f(x, **side) for f in (self.query, self.key, self.value))
        head = ("seq", "heads", "projection")
        rest = tuple(n for n in q.named_shape if n not in head)
        shape = [q.named_shape[n] for n in rest + head]
        flat = lambda a: a.unwrap(*rest, *head).reshape(-1, *shape[len(rest) :])
        name = pick_attention(
            self.implementation,
            platform=jax.default_backend(),
            dtype=q.dtype,
            seq_len=q.named_shape["seq"],
        )
        kernel = ATTENTION_KERNELS[name][0]
        out = kernel(flat(q), flat(k), flat(v), scale=self.scale, causal=self.causal)
        return self.output(pz.nx.wrap(out.reshape(shape)).tag(*rest, *head), **side)

    def as_penzai(self, dtype=jnp.float32) -> pz.nn.Attention:
        """The same attention from penzai's generic layers (the reference the tests compare
        with): NamedEinsum scores of the rescaled queries, the causal mask (masked scores set
        to `dtype`'s most negative value), SoftmaxF32."""
        q_ax = {"seq": "q", "heads": "h", "projection": "p"}  # einsum letters per named axis
        kv_ax = {"seq": "k", "heads": "h", "projection": "p"}  # keys/values: their "seq" is k
        attn_ax = {"heads": "h", "seq": "q", "kv_seq": "k"}
        return pz.nn.Attention(
            input_to_query=pz.nn.Sequential([self.query, pz.nn.ConstantRescale(self.scale)]),
            input_to_key=self.key,
            input_to_value=self.value,
            query_key_to_attn=pz.nn.Sequential(
                [
                    pz.nn.NamedEinsum((q_ax, kv_ax), attn_ax),
                    *([causal_mask(dtype)] if self.causal else []),
                    SoftmaxF32("kv_seq"),
                ]
            ),
            attn_value_to_output=pz.nn.Sequential(
                [pz.nn.NamedEinsum((attn_ax, kv_ax), q_ax), self.output]
            ),
        )
