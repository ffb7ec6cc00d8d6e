"""The modular structure of jif's DiT, attached to its parameters by label and axis names.

The well-normed counterpart of `jif.mup`: where muP rescales Adam's learning rates by a
parameter's role, `modula.optimizer(lr, module=dit_module(model_config, params))` dualises
the gradient in the modular norm that this tree defines. It mirrors the forward pass of
``jif.model`` (arch="modula", or "modula_ref" with attention's output times 1/3):

    model  = head @ Repeat(block, n_layers) @ embed
    block  = residual(mlp, R) @ residual(attn, R),            R = 2 n_layers
    attn   = output @ Attention @ (query, key, value) @ norm gain @ RMSNorm
    mlp    = down @ GELU / GELU_MAX_SLOPE @ up @ norm gain @ RMSNorm
    head   = unembed @ norm gain @ RMSNorm

Sizes are read from the parameters' named axes and fan-in/fan-out splits from
``jif.model.fan_in_axes``, so any width/depth/head count works. With adaln=True the
conditioning network and the shift/scale/gate matrices (inputs: the noise level, not the
residual stream) are dualised as a separate group composed in parallel (a `Tuple`), a
simplification: their effect on the output is not covered by the measured bounds.
"""

from __future__ import annotations

from jif.model import ARCHS, ModelConfig, fan_in_axes
from modula.atoms import Bias, Embedding, Gain, Linear
from modula.bonds import GELU, Attention, RMSNorm
from modula.core import STACK_AXIS, Module, Parallel, Repeat, Tuple, Weights, residual

# Modula's GPT masses (Large et al. 2024, their `GPT(blocks_mass=5)`): embedding 1, all blocks
# together 5, output 1. Norm gains get a small mass: a max-norm (sign) update of mass 1 would
# move every gain by the same step as a whole matrix's spectrum.
BLOCKS_MASS = 5.0
GAIN_MASS = 0.1


def _axes(params: Weights, label: str) -> dict[str, int]:
    if label not in params:
        raise ValueError(f"parameter {label!r} missing: got labels {sorted(params)}")
    return {a: n for a, n in params[label].named_shape.items() if a != STACK_AXIS}


def linear(params: Weights, label: str, mass: float = 1.0) -> Linear:
    """A Linear atom for ``label``: fan-in axes from `jif.model.fan_in_axes`, the rest fan-out."""
    axes, fan_in = _axes(params, label), fan_in_axes(label)
    return Linear(
        label,
        {a: axes[a] for a in fan_in},
        {a: n for a, n in axes.items() if a not in fan_in},
        mass=mass,
    )


def gain(params: Weights, label: str) -> Gain:
    return Gain(label, _axes(params, label), mass=GAIN_MASS)


def dit_module(
    model_config: ModelConfig, params: Weights, *, blocks_mass: float = BLOCKS_MASS
) -> Module:
    """The modular description of a jif DiT whose parameters are ``params``.

    Args:
      model_config: a ``jif.model.ModelConfig`` (n_layers is read from it).
      params: {label: NamedArray} as returned by ``jif.model.params_dict``.
      blocks_mass: total mass of all blocks relative to embedding and output (mass 1 each).
    """
    p = "dit/blocks"
    norm = lambda label: gain(params, label) @ RMSNorm("embedding")
    qkv = Tuple(*(linear(params, f"{p}/attn/{n}") for n in ("query", "key", "value")))
    attn_gain = ARCHS[model_config.arch].attn_gain  # 1/3 for "modula_ref", as Modula's GPT
    attend = Attention() if attn_gain == 1.0 else attn_gain * Attention()
    attn = linear(params, f"{p}/attn/output") @ attend @ qkv @ norm(f"{p}/attn/norm")
    mlp = linear(params, f"{p}/mlp/down") @ GELU() @ linear(params, f"{p}/mlp/up")
    mlp = mlp @ norm(f"{p}/mlp/norm")
    depth = 2 * model_config.n_layers
    blocks = Repeat(residual(mlp, depth) @ residual(attn, depth), model_config.n_layers)
    blocks.tare(blocks_mass)

    embed_axes = _axes(params, "dit/embed")
    embed = Embedding(
        "dit/embed",
        ("vocabulary", embed_axes.pop("vocabulary")),
        embed_axes,
    )
    head = linear(params, "dit/out/unembed") @ norm("dit/out/norm")
    model = head @ blocks @ embed
    if model_config.adaln:
        model = Tuple(model, _adaln_group(params, model_config.n_layers))
    return model


def _adaln_group(params: Weights, n_layers: int) -> Module:
    """Conditioning MLP, per-block and output modulations, as one parallel group of mass 1.
    The blocks' modulations all read the condition side by side (`Parallel`: equal shares),
    not one after another."""
    cond = Tuple(
        linear(params, "dit/cond/in"),
        Bias("dit/cond/in_bias", _axes(params, "dit/cond/in_bias")),
        linear(params, "dit/cond/out"),
        Bias("dit/cond/out_bias", _axes(params, "dit/cond/out_bias")),
        *(linear(params, f"dit/out/{n}") for n in ("shift", "scale")),
    )
    per_block = [
        linear(params, f"dit/blocks/{b}/{n}")
        for b in ("attn", "mlp")
        for n in ("shift", "scale", "gate")
    ]
    return Tuple(cond, Parallel(Tuple(*per_block), n_layers)).tare(1.0)
