"""A bidirectional diffusion transformer (DiT) in penzai, ported from SEDD's DiT (or causal).

Top to bottom: config -> parameters -> attention -> MLP -> block -> model. The fast
penzai-compatible layers it is built from live in `jif.layers`.

Named axes (every activation and parameter carries names, never positions):
  "batch", "seq" (query positions), "kv_seq" (key positions inside attention), "embedding"
  (residual stream), "heads", "projection" (per-head q/k/v), "neurons" (MLP hidden),
  "vocabulary", "blocks" (LayerStack axis of stacked block parameters), "cond" (adaLN
  conditioning vector), "cond_hidden", "frequencies" (sinusoidal noise-level features).

Calling convention: ``model(tokens, mask_rate=r)`` with tokens a NamedArray int32 {"batch",
"seq"} and the side input mask_rate a NamedArray float32 {"batch"} (= 1 - alpha_t, used only
with adaln=True) returns logits {"batch", "seq", "vocabulary"} with exactly vocab_size
entries. Inside the model the embedding and output tables are padded to a multiple of
``vocab_multiple`` so that "vocabulary" can be sharded; padded rows are never read out.

Parameters (label = path; "blocks" is a leading stacked axis; fan-in axes listed first, as
``fan_in_axes(label)`` returns them for jif.mup and jif.well_normed):
  path                         axes (fan-in | fan-out)                 init (standard)
  dit/embed                    vocabulary | embedding                  N(0, 1)
  dit/cond/in ; dit/cond/out   frequencies | cond_hidden ; cond_hidden | cond   N(0, 1/fan_in)
  dit/cond/{in,out}_bias       | cond_hidden, | cond (vectors)         0               [adaln]
  dit/blocks/{attn,mlp}/norm   blocks, | embedding  (gain vector)      1   (dit/out/norm alike)
  dit/blocks/{attn,mlp}/{shift,scale,gate}  blocks, cond | embedding   0               [adaln]
  dit/blocks/attn/{query,key,value}   blocks, embedding | heads, projection   N(0, 1/fan_in)
  dit/blocks/attn/output       blocks, heads, projection | embedding   N(0, 1/fan_in)
  dit/blocks/mlp/up            blocks, embedding | neurons             N(0, 1/fan_in)
  dit/blocks/mlp/down          blocks, neurons | embedding             N(0, 1/fan_in)
  dit/out/{shift,scale}        cond | embedding                        0               [adaln]
  dit/out/unembed              embedding | vocabulary                  0
  dit/self_cond                prediction | embedding                  0               [self_condition]
The embedding table is a lookup: its "vocabulary" axis is the (one-hot) input axis.

arch="modula" (all of it in ``ARCHS["modula"]``): GELU / GELU_MAX_SLOPE (1-Lipschitz),
attention scores scaled 1/d_head, residual updates x <- (1 - 1/R) x + (1/R) f(x) with
R = 2 n_layers, matrices initialised orthogonal and scaled to RMS->RMS operator norm 1
(spectral norm sqrt(fan_out / fan_in)), embedding rows normalised to RMS 1; the output layer
and adaLN modulations stay zero. mup_base_width (muP): logits times base_width / d_model and
attention scores 1/d_head; initialisation unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import treescope
from penzai import pz

from jif.layers import (
    ATTENTION_NAMES,
    DotProductAttention,
    Embed,
    FlatLinear,
    FlatRMSStandardize,
    ScaledResidual,
    TableRoPE,
    Unembed,
    static_positions,
)
from modula import GELU_MAX_SLOPE

N_FREQUENCIES = 256  # sinusoidal features of the mask rate (SEDD's frequency_embedding_size)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and variant of the DiT."""

    vocab_size: int = 2050  # token ids: trimmed GPT-2 ids + end-of-text + mask
    d_model: int  # width of the residual stream ("embedding")
    n_layers: int  # number of blocks ("blocks")
    n_heads: int  # attention heads; d_model / n_heads must be even (RoPE)
    mlp_ratio: int = 4  # MLP width ("neurons") as a multiple of d_model
    cond_dim: int = 128  # width of the adaLN conditioning vector ("cond")
    adaln: bool = False  # condition blocks on the mask rate (SEDD adaLN shift/scale/gate)
    causal: bool = False  # attention sees only earlier positions (jif.ar's next-token model)
    arch: str = "standard"  # a key of ARCHS: "standard", "modula" (well-normed), "modula_ref"
    dtype: str = "float32"  # "float32" | "bfloat16": parameters and activations
    attention: str = "auto"  # jif.layers.ATTENTION_NAMES; auto: the platform's (pick_attention)
    mup_base_width: int | None = None  # muP: logits * base/d_model, scores 1/d_head
    rope_wavelength: float = 10_000.0  # maximum wavelength of the rotary embedding
    norm_eps: float = 1e-6  # epsilon of the RMS normalisation
    vocab_multiple: int = 128  # tables padded to a multiple of this ("vocabulary" shards)
    self_condition: bool = False  # a second pass fed the first pass's prediction (see DiT)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def validate(self) -> ModelConfig:
        if self.d_model % self.n_heads or self.d_head % 2:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} into an "
                "even head size (RoPE rotates pairs); pick e.g. n_heads=d_model // 64."
            )
        for field, allowed in (("arch", ARCHS), ("dtype", DTYPES), ("attention", ATTENTION_NAMES)):
            if (value := getattr(self, field)) not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {sorted(allowed)}.")
        if self.self_condition and (self.arch != "standard" or self.causal):
            raise ValueError(
                "self_condition=True needs the standard, non-causal DiT (the well-normed "
                "description and the autoregressive model have no self-conditioning input); "
                "drop --self-condition or use --arch standard."
            )
        if min(self.vocab_size, self.d_model, self.n_layers, self.vocab_multiple) < 1:
            raise ValueError(f"sizes must be positive, got {self}.")
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arch:
    """Everything that differs between architecture variants (ModelConfig.arch)."""

    gelu: Callable[[jax.Array], jax.Array]  # the MLP nonlinearity
    residual: Callable[[pz.nn.Layer, ModelConfig], pz.nn.Layer]  # wraps each block branch
    matrix_init: str  # INITS entry of the weight matrices that are not zero-initialised
    embed_init: str  # INITS entry of the embedding table
    score_scale: Callable[[ModelConfig], float]  # q . k is multiplied by this
    attn_gain: float = 1.0  # attention's output (before its output matrix) is multiplied by this


_gelu = lambda x: jax.nn.gelu(x, approximate=True)  # tanh approximation, as SEDD
ARCHS: dict[str, Arch] = {
    "standard": Arch(
        gelu=_gelu,
        residual=lambda branch, config: pz.nn.Residual(branch),
        matrix_init="normal",
        embed_init="unit_normal",
        score_scale=lambda config: config.d_head**-0.5,
    ),
    "modula": Arch(  # well-normed: every layer has RMS->RMS operator norm at most 1
        gelu=lambda x: _gelu(x) / GELU_MAX_SLOPE,
        residual=lambda branch, cfg: ScaledResidual(delta=branch, alpha=1 / (2 * cfg.n_layers)),
        matrix_init="orthogonal",
        embed_init="embed_rms1",
        score_scale=lambda config: 1.0 / config.d_head,  # O(1) scores when q and k align
    ),
}
# The reference Modula library's GPT multiplies attention's output by 1/3 (a bound for the
# three inputs q, k, v), so its query, key and value matrices get larger shares of a step.
ARCHS["modula_ref"] = dataclasses.replace(ARCHS["modula"], attn_gain=1 / 3)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=32, n_layers=2, n_heads=2, cond_dim=16),
    "cpu": ModelConfig(d_model=128, n_layers=3, n_heads=4),  # 1.2M params
    "small": ModelConfig(d_model=256, n_layers=3, n_heads=4),
    "medium": ModelConfig(d_model=384, n_layers=4, n_heads=6),
    "big": ModelConfig(d_model=512, n_layers=6, n_heads=8),
}


def default_dtype(backend: str | None = None) -> str:
    """The dtype="auto" choice: bfloat16 on accelerators (scores, softmax and the loss stay
    float32), float32 on CPU (where bfloat16 matmuls are slower)."""
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def make_config(preset: str = "cpu", **overrides) -> ModelConfig:
    """Preset by name, with any ModelConfig field overridden (None values are ignored;
    dtype="auto" becomes `default_dtype()`)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {list(PRESETS)}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("dtype") == "auto":
        overrides["dtype"] = default_dtype()
    return dataclasses.replace(PRESETS[preset], **overrides).validate()


# ----------------------------------------------------------------------------- parameters

# Fan-in axes by label suffix (whole path parts, longest match wins), as in the table of the
# module docstring; tests/test_model.py checks it against the layers of every variant.
FAN_IN_AXES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("query", "key", "value", "up", "unembed"), ("embedding",)),
    **dict.fromkeys(("shift", "scale", "gate"), ("cond",)),
    **{"embed": ("vocabulary",), "cond/in": ("frequencies",), "cond/out": ("cond_hidden",)},
    **{"attn/output": ("heads", "projection"), "down": ("neurons",)},
    **dict.fromkeys(("norm", "in_bias", "out_bias"), ()),  # gains and biases: vectors
    "self_cond": ("prediction",),
}


def fan_in_axes(label: str) -> tuple[str, ...]:
    """Fan-in axes of the parameter `label`; its other axes except "blocks" are fan-out."""
    matches = [k for k in FAN_IN_AXES if label == k or label.endswith("/" + k)]
    if not matches:
        raise ValueError(
            f"parameter {label!r} has no entry in jif.model.FAN_IN_AXES "
            f"(label suffixes: {sorted(FAN_IN_AXES)})."
        )
    return FAN_IN_AXES[max(matches, key=len)]


def _init_normal(key, shape, n_in, dtype):  # N(0, 1/fan_in), fan_in = prod(shape[:n_in])
    fan_in = math.prod(shape[:n_in])
    return jax.random.normal(key, shape, jnp.float32).astype(dtype) / math.sqrt(fan_in)


def _init_orthogonal(key, shape, n_in, dtype):
    """Semi-orthogonal [fan_in, fan_out] matrix scaled to RMS->RMS operator norm 1."""
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    w = jax.nn.initializers.orthogonal()(key, (fan_in, fan_out), jnp.float32)
    return (w * math.sqrt(fan_out / fan_in)).reshape(shape).astype(dtype)


def _init_embed_rms1(key, shape, n_in, dtype):  # embedding rows normalised to RMS 1
    w = jax.random.normal(key, shape, jnp.float32)
    return (w * jax.lax.rsqrt(jnp.mean(w**2, axis=-1, keepdims=True))).astype(dtype)


INITS: dict[str, Callable] = {
    "normal": _init_normal,
    "unit_normal": lambda key, shape, n_in, dtype: jax.random.normal(key, shape, dtype),
    "orthogonal": _init_orthogonal,
    "embed_rms1": _init_embed_rms1,
    "zeros": lambda key, shape, n_in, dtype: jnp.zeros(shape, dtype),
    "ones": lambda key, shape, n_in, dtype: jnp.ones(shape, dtype),
}


def _param(name: str, key, config: ModelConfig, in_axes: dict, out_axes: dict, init: str):
    """A pz.Parameter labelled exactly `name` with axes in_axes + out_axes."""
    shape = (*in_axes.values(), *out_axes.values())
    value = INITS[init](
        pz.nn.derive_param_key(key, name), shape, len(in_axes), DTYPES[config.dtype]
    )
    return pz.Parameter(value=pz.nx.wrap(value).tag(*in_axes, *out_axes), label=name)


def _linear(name, key, config, in_axes, out_axes, init=None) -> pz.nn.Linear:
    """in_axes -> out_axes; init defaults to the architecture's matrix init."""
    w = _param(name, key, config, in_axes, out_axes, init or ARCHS[config.arch].matrix_init)
    return FlatLinear(weights=w, in_axis_names=tuple(in_axes), out_axis_names=tuple(out_axes))


def _rms_norm(name, key, config) -> pz.nn.RMSLayerNorm:
    """RMS standardisation over "embedding" times a learned gain (penzai's RMSLayerNorm)."""
    w = _param(name, key, config, {}, {"embedding": config.d_model}, init="ones")
    gain = FlatLinear(weights=w, in_axis_names=(), out_axis_names=())  # parallel over axis
    eps = jnp.asarray(config.norm_eps, DTYPES[config.dtype])
    return pz.nn.RMSLayerNorm([FlatRMSStandardize(across="embedding", epsilon=eps), gain])


@pz.pytree_dataclass
class AdaLNModulate(pz.nn.Layer):
    """x * (1 + scale(c)) + shift(c), c = side input "cond" {"batch", "cond"}."""

    shift: pz.nn.Layer
    scale: pz.nn.Layer

    def __call__(self, x: pz.nx.NamedArray, **side) -> pz.nx.NamedArray:
        return x * (1 + self.scale(side["cond"])) + self.shift(side["cond"])


@pz.pytree_dataclass
class AdaLNGate(pz.nn.Layer):
    """x * gate(c), c = side input "cond"; zero at init so each block starts as identity."""

    gate: pz.nn.Layer

    def __call__(self, x: pz.nx.NamedArray, **side) -> pz.nx.NamedArray:
        return x * self.gate(side["cond"])


def _pre(name, key, config) -> list[pz.nn.Layer]:
    """Pre-branch norm, with adaLN shift/scale when enabled."""
    layers = [_rms_norm(f"{name}/norm", key, config)]
    if config.adaln:
        cond, emb = {"cond": config.cond_dim}, {"embedding": config.d_model}
        shift = _linear(f"{name}/shift", key, config, cond, emb, init="zeros")
        scale = _linear(f"{name}/scale", key, config, cond, emb, init="zeros")
        layers.append(AdaLNModulate(shift=shift, scale=scale))
    return layers


def _post(name, key, config) -> list[pz.nn.Layer]:
    """adaLN gate at the end of a residual branch (nothing without adaLN)."""
    if not config.adaln:
        return []
    cond, emb = {"cond": config.cond_dim}, {"embedding": config.d_model}
    return [AdaLNGate(gate=_linear(f"{name}/gate", key, config, cond, emb, init="zeros"))]


# ----------------------------------------------------------------------------- attention


def build_attention(name: str, key, config: ModelConfig) -> DotProductAttention:
    """Multi-head attention, RoPE on queries and keys; bidirectional, or causal (config.causal),
    by the fused kernel config.attention names (jif.layers.pick_attention)."""
    emb, hp = {"embedding": config.d_model}, {"heads": config.n_heads, "projection": config.d_head}
    rope = TableRoPE("projection", config.rope_wavelength, "token_positions")
    mup = config.mup_base_width is not None  # muP: 1/d_head scores, whatever the architecture
    linear = lambda part, ins, outs: _linear(f"{name}/{part}", key, config, ins, outs)
    output, gain = linear("output", hp, emb), ARCHS[config.arch].attn_gain
    if gain != 1.0:
        output = pz.nn.Sequential([pz.nn.ConstantRescale(by=gain), output])
    return DotProductAttention(
        query=pz.nn.Sequential([linear("query", emb, hp), rope]),
        key=pz.nn.Sequential([linear("key", emb, hp), rope]),
        value=linear("value", emb, hp),
        output=output,
        scale=1.0 / config.d_head if mup else ARCHS[config.arch].score_scale(config),
        causal=config.causal,
        implementation=config.attention,
    )


# ----------------------------------------------------------------------------- MLP and block


def build_mlp(name: str, key, config: ModelConfig) -> pz.nn.Sequential:
    """Linear up -> GELU (the architecture's) -> Linear down."""
    emb, neurons = {"embedding": config.d_model}, {"neurons": config.mlp_ratio * config.d_model}
    up = _linear(f"{name}/up", key, config, emb, neurons)
    down = _linear(f"{name}/down", key, config, neurons, emb)
    return pz.nn.Sequential([up, pz.nn.Elementwise(ARCHS[config.arch].gelu), down])


def build_block(name: str, init_base_rng, config: ModelConfig) -> pz.nn.Sequential:
    """One DiT block: attention and MLP residual branches, each pre-normed (and adaLN'd)."""
    key = init_base_rng
    attn = [*_pre(f"{name}/attn", key, config), build_attention(f"{name}/attn", key, config)]
    mlp = [*_pre(f"{name}/mlp", key, config), build_mlp(f"{name}/mlp", key, config)]
    res, post = ARCHS[config.arch].residual, lambda part: _post(f"{name}/{part}", key, config)
    attn, mlp = pz.nn.Sequential(attn + post("attn")), pz.nn.Sequential(mlp + post("mlp"))
    return pz.nn.Sequential([res(attn, config), res(mlp, config)])


# ----------------------------------------------------------------------------- the model


def noise_features(mask_rate: pz.nx.NamedArray, n: int = N_FREQUENCIES) -> pz.nx.NamedArray:
    """Sinusoidal features {"batch", "frequencies"} of mask_rate in [0, 1] (scaled by 1000)."""
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(n // 2) / (n // 2))
    feats = lambda r: jnp.concatenate([jnp.cos(1000.0 * r * freqs), jnp.sin(1000.0 * r * freqs)])
    return pz.nx.nmap(feats)(mask_rate.astype(jnp.float32)).tag("frequencies")


def build_cond(name: str, key, config: ModelConfig) -> pz.nn.Sequential:
    """SEDD's TimestepEmbedder followed by SiLU: features -> MLP -> SiLU -> "cond"."""
    hid, cond = {"cond_hidden": config.cond_dim}, {"cond": config.cond_dim}
    zeros = lambda part, ax: _param(f"{name}/{part}", key, config, {}, ax, "zeros")
    bias = lambda part, ax: pz.nn.AddBias(zeros(part, ax), ())
    freq, silu = {"frequencies": N_FREQUENCIES}, pz.nn.Elementwise(jax.nn.silu)
    layer_in = [_linear(f"{name}/in", key, config, freq, hid), bias("in_bias", hid), silu]
    layer_out = [_linear(f"{name}/out", key, config, hid, cond), bias("out_bias", cond), silu]
    return pz.nn.Sequential(layer_in + layer_out)


@pz.pytree_dataclass
class DiT(pz.nn.Layer):
    """tokens {"batch","seq"} (+ side input mask_rate {"batch"}) -> logits {..., "vocabulary"}.

    With config.self_condition (Bit Diffusion's self-conditioning, for masked tokens) the
    network runs twice: the first pass's predicted distribution (gradient stopped), embedded
    through the token table, goes through `self_cond` (zero at init, so both passes start
    equal) and is added to the token embeddings of the second pass. The second pass's input
    is a function of the tokens alone, so a sampler that reuses logits while the tokens do
    not change stays exact. Side input self_condition=False (a bool, may be traced) skips it:
    training does so for half of its batches. Side input prediction (float32 [B, L, V]
    probabilities, an array) replaces the first pass by that prediction: one pass, fed an
    earlier call's output (sampling's "previous" mode); all zeros is exactly the pass
    without self-conditioning (`self_cond` is linear, with no bias).
    """

    embed: Embed
    cond: pz.nn.Layer | None
    blocks: pz.nn.LayerStack
    head: pz.nn.Sequential
    self_cond: pz.nn.Layer | None
    config: ModelConfig = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, tokens: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
        return self.readout(self.features(tokens, **side_inputs))

    def features(self, tokens: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
        """tokens {"batch","seq"} -> {"batch","seq","embedding"}: all but the readout."""
        side = {"token_positions": static_positions(tokens.named_shape["seq"])}
        if self.cond is not None:
            if side_inputs.get("mask_rate") is None:
                raise ValueError("this model has adaln=True: call it as model(tokens, mask_rate=r)")
            cond = self.cond(noise_features(side_inputs["mask_rate"]))
            side["cond"] = cond.astype(DTYPES[self.config.dtype])
        x = self.embed(tokens)
        if self.self_cond is not None and side_inputs.get("prediction") is not None:
            x = x + self._prediction_input(side_inputs["prediction"], names=("batch", "seq"))
        elif self.self_cond is not None:
            use = side_inputs.get("self_condition", True)
            second = lambda x: x + self._first_pass_input(self.readout(self._trunk(x, side)))
            if isinstance(use, bool):
                x = second(x) if use else x
            else:
                x = jax.lax.cond(use, second, lambda x: x, x)
        return self._trunk(x, side)

    def _trunk(self, x: pz.nx.NamedArray, side: dict) -> pz.nx.NamedArray:
        x = self.blocks(x, **side)
        for layer in self.head.sublayers[: self._readout_start()]:  # final norm (+ adaLN)
            x = layer(x, **side)
        return x

    def _first_pass_input(self, logits: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """self_cond(softmax(logits) @ token table), gradient stopped: {..., "embedding"}."""
        names = tuple(n for n in logits.named_shape if n != "vocabulary")
        p = jax.nn.softmax(logits.unwrap(*names, "vocabulary").astype(jnp.float32), axis=-1)
        return self._prediction_input(p, names=names)

    def _prediction_input(self, p: jax.Array, *, names: tuple) -> pz.nx.NamedArray:
        """self_cond(p @ token table), gradient stopped; p float32 [*names, V]."""
        table = self.embed.table.value.unwrap("vocabulary", "embedding")[: p.shape[-1]]
        soft = jax.lax.stop_gradient(p.astype(table.dtype) @ table)
        return self.self_cond(pz.nx.wrap(soft).tag(*names, "prediction"))

    def readout(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """{..., "embedding"} -> {..., "vocabulary"}: the unembedding (and muP's rescale),
        position by position, so it can run on any subset of positions."""
        for layer in self.head.sublayers[self._readout_start() :]:
            x = layer(x)
        return x

    def _readout_start(self) -> int:
        return next(i for i, la in enumerate(self.head.sublayers) if isinstance(la, Unembed))


def build_model(config: ModelConfig, key: jax.Array) -> DiT:
    """Builds the DiT with freshly initialised parameters (labels as in the module docstring)."""
    config.validate()
    emb, vocab = {"embedding": config.d_model}, {"vocabulary": config.padded_vocab}
    head = [*_pre("dit/out", key, config)]
    unembed = _param("dit/out/unembed", key, config, emb, vocab, init="zeros")
    head.append(Unembed(weights=unembed, size=config.vocab_size))
    if config.mup_base_width is not None:
        mult = config.mup_base_width / config.d_model
        head.append(pz.nn.ConstantRescale(by=jnp.asarray(mult, DTYPES[config.dtype])))
    embed_init = ARCHS[config.arch].embed_init
    return DiT(
        embed=Embed(table=_param("dit/embed", key, config, vocab, emb, embed_init)),
        cond=build_cond("dit/cond", key, config) if config.adaln else None,
        blocks=pz.nn.LayerStack.from_sublayer_builder(  # builder, axis, size, key, kwargs
            build_block, "blocks", config.n_layers, key, dict(name="dit/blocks", config=config)
        ),
        head=pz.nn.Sequential(head),
        self_cond=_linear(
            "dit/self_cond", key, config, {"prediction": config.d_model}, emb, init="zeros"
        )
        if config.self_condition
        else None,
        config=config,
    )


# ----------------------------------------------------------------------------- helpers


def apply_logits(
    model: DiT, tokens: jax.Array, mask_rate: jax.Array, prediction: jax.Array | None = None
) -> jax.Array:
    """int32 [B, L], float32 [B] -> float32 logits [B, L, V] (self-conditioned, if the
    model is: on its own first pass, or on `prediction`, float32 [B, L, V] probabilities)."""
    x, r = pz.nx.wrap(tokens).tag("batch", "seq"), pz.nx.wrap(mask_rate).tag("batch")
    out = model(x, mask_rate=r, prediction=prediction)
    return out.unwrap("batch", "seq", "vocabulary").astype(jnp.float32)


def apply_features(
    model: DiT, tokens: jax.Array, mask_rate: jax.Array, self_condition=True, prediction=None
):
    """int32 [B, L], float32 [B] -> [B, L, d_model]: the network up to its readout.
    self_condition (bool, may be traced): take the second pass, if the model has one;
    prediction: as in apply_logits."""
    x, r = pz.nx.wrap(tokens).tag("batch", "seq"), pz.nx.wrap(mask_rate).tag("batch")
    out = model.features(x, mask_rate=r, self_condition=self_condition, prediction=prediction)
    return out.unwrap("batch", "seq", "embedding")


def apply_readout(model: DiT, features: jax.Array) -> jax.Array:
    """[N, d_model] (any positions' features) -> float32 logits [N, V]."""
    out = model.readout(pz.nx.wrap(features).tag("rows", "embedding"))
    return out.unwrap("rows", "vocabulary").astype(jnp.float32)


def make_denoise_fn(model: DiT, *, mask_id: int) -> Callable[..., jax.Array]:
    """tokens int32 [B, L] (, prediction) -> logits [B, L, V]; the mask rate is each row's
    mask fraction; prediction: as in apply_logits (sampling's "previous" self-conditioning)."""
    mask_rate = lambda tokens: jnp.mean((tokens == mask_id).astype(jnp.float32), axis=-1)
    return lambda tokens, prediction=None: apply_logits(
        model, tokens, mask_rate(tokens), prediction
    )


def params_dict(model: pz.nn.Layer) -> dict[str, pz.nx.NamedArray]:
    """{label: value} of every parameter (stacked block parameters keep the "blocks" axis)."""
    return {p.label: p.value for p in pz.unbind_params(model)[1]}


def count_params(model: pz.nn.Layer) -> int:
    """Number of stored parameter scalars (including vocabulary padding rows)."""
    return sum(int(v.data_array.size) for v in params_dict(model).values())


def show_model(model: pz.nn.Layer, path: str | None = None) -> str:
    """Renders the model with treescope; writes standalone HTML to `path` if given."""
    html = treescope.render_to_html(model, roundtrip_mode=False)
    if path is not None:
        pathlib.Path(path).write_text(html)
    return html
