"""Well-normed modules and the modular-dualisation optimizer, for penzai models.

Model-agnostic: a model is described by composing modules whose weights are its parameters,
keyed by label (jif's DiT is described in `jif.well_normed`).

import modula
m = modula.Linear("out", {"embedding": 64}, {"vocabulary": 128}) @ modula.GELU() @ ...
w = m.initialize(key); m.norm(w); m.dualize(grads, target_norm=0.1)
opt = modula.optimizer(0.1, module=m)   # opt.init(w) checks that w's labels are m's
"""

from modula.atoms import NS_COEFFS, Bias, Embedding, Gain, Linear, orthogonalize
from modula.bonds import GELU, GELU_MAX_SLOPE, Attention, RMSNorm, RoPE
from modula.core import (
    STACK_AXIS,
    Add,
    Bond,
    Identity,
    Module,
    Mul,
    Parallel,
    Repeat,
    Sequential,
    Tuple,
    residual,
)
from modula.optim import optimizer, projection, scale_by_dualization

__all__ = [
    "NS_COEFFS",
    "STACK_AXIS",
    "Add",
    "Attention",
    "Bias",
    "Bond",
    "Embedding",
    "GELU",
    "GELU_MAX_SLOPE",
    "Gain",
    "Identity",
    "Linear",
    "Module",
    "Mul",
    "Parallel",
    "RMSNorm",
    "Repeat",
    "RoPE",
    "Sequential",
    "Tuple",
    "optimizer",
    "orthogonalize",
    "projection",
    "residual",
    "scale_by_dualization",
]
