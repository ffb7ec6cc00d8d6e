"""Well-normed modules and the modular-dualisation optimizer, for penzai models.

import modula
m = modula.Linear("out", {"embedding": 64}, {"vocabulary": 128}) @ modula.GELU() @ ...
w = m.initialize(key); m.norm(w); m.dualize(grads, target_norm=0.1)
opt = modula.optimizer(0.1, model_config=cfg, params=params)   # jif's DiT
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
    Repeat,
    Sequential,
    Tuple,
    residual,
)
from modula.dit import dit_module
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
    "RMSNorm",
    "Repeat",
    "RoPE",
    "Sequential",
    "Tuple",
    "dit_module",
    "optimizer",
    "orthogonalize",
    "projection",
    "residual",
    "scale_by_dualization",
]
