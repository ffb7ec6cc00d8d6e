"""Evaluation during training: validation NELBO, name probes, samples and their grammar.

    evaluator = Evaluator(EvalConfig(), tokenizer, data="stories", seq_len=128, ...)
    row = evaluator(unbound, ema_params, key)   # {"val_nelbo": ..., "samples": [...], ...}

The validation set is fixed by (data, seq_len, seed, packing), the NELBO's time grid and masks
by `eval_times` and a fixed key, so the same weights always get the same number.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jif import checkpoint as ckpt
from jif import data as data_lib
from jif import diffusion, probes, sampling, stories
from jif import model as model_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """When and how a training run evaluates its EMA weights."""

    eval_every: int = 1000
    """Validation NELBO and samples every N steps and at the end (0: never)."""
    eval_sequences: int = 64
    """Number of fixed validation sequences."""
    eval_times: int = 8
    """Number of fixed noise levels of the validation NELBO."""
    n_samples: int = 4
    """Samples decoded at each evaluation."""
    sample_steps: int = 128
    """Denoising steps per sample."""
    sample_method: str = "confidence"
    """Sampler of those samples (jif.sampling.METHODS): confidence-ordered unmasking by default."""
    sample_temperature: float = 1.0
    """Temperature of those samples (0: argmax)."""

    def validate(self) -> EvalConfig:
        """ValueError naming any out-of-range setting."""
        for name in ("eval_sequences", "eval_times"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("eval_every", "n_samples"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.sample_temperature < 0:
            raise ValueError(f"--sample-temperature must be >= 0, got {self.sample_temperature}")
        if self.n_samples and self.sample_method not in sampling.METHODS:
            raise ValueError(
                f"--sample-method {self.sample_method!r} is unknown; choose one of "
                f"{sorted(sampling.METHODS)}"
            )
        return self


def batched(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """[N, L] -> consecutive [batch_size, L] batches (the last one may be smaller)."""
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def val_nelbo(model, batches, *, mask_id: int, n_times: int) -> dict:
    """`jif.diffusion.eval_nelbo` of a bound DiT on fixed batches (time grid seed 0); one
    compile serves every model of the same shape."""
    return diffusion.eval_nelbo(
        model_lib.apply_logits, batches, mask_id=mask_id, n_times=n_times, seed=0, model=model
    )


class Evaluator:
    """The fixed validation set and probes of a run; calling it evaluates some weights."""

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer,
        *,
        data: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        packing: str = "pack",
    ):
        self.cfg, self.tokenizer, self.data, self.seq_len = cfg, tokenizer, data, seq_len
        val = data_lib.validation_tokens(
            data,
            tokenizer,
            seq_len=seq_len,
            n_sequences=cfg.eval_sequences,
            seed=seed,
            packing=packing,
        )
        self.val_batches = batched(val, batch_size)
        self.probes = self.friends = None
        if data == "stories":
            self.probes = probes.name_probes(tokenizer, seq_len=seq_len, seed=seed)
            self.friends = probes.friend_probes(tokenizer, seq_len=seq_len, seed=seed)

    def __call__(self, unbound, params, key) -> dict:
        """Validation NELBO of `params` on the fixed validation set, plus decoded samples and
        (for the embedded stories) the grammar checker's scores, how well the model copies
        names (val_name_nats, val_name_exact) and how often it names the friend after the
        hero (val_hero_as_friend)."""
        mask_id = self.tokenizer.mask_id
        model = ckpt.bind_params(unbound, params)
        jitted = jax.jit(lambda m, xt, r: model_lib.apply_logits(m, xt, r))
        logits = lambda xt, r: jitted(model, xt, r)  # for the probes
        result = val_nelbo(model, self.val_batches, mask_id=mask_id, n_times=self.cfg.eval_times)
        out = {
            "val_" + k: float(v)
            for k, v in result.items()
            if np.ndim(v) == 0 and isinstance(v, int | float | np.floating | jax.Array)
        }
        if self.probes is not None and len(self.probes.tokens):
            p = self.probes
            nats, exact = diffusion.span_scores(logits, p.tokens, p.mask, mask_id=mask_id)
            out["val_name_nats"] = float(nats.mean())
            out["val_name_exact"] = float(exact.mean())
        if self.friends is not None and len(self.friends.tokens):
            f = self.friends
            logp = diffusion.span_logprob(logits, f.tokens, f.mask, f.span, mask_id=mask_id)
            out["val_hero_as_friend"] = float(np.exp(logp).mean())
        if self.cfg.n_samples > 0:
            out.update(self.samples(model, key))
        return out

    def samples(self, model, key) -> dict:
        """A few unconditional samples (BOS + masks) decoded to text, with grammar scores."""
        cfg, tok = self.cfg, self.tokenizer
        tokens = np.full((cfg.n_samples, self.seq_len), tok.mask_id, np.int32)
        tokens[:, 0] = tok.eot_id
        denoise = jax.jit(model_lib.make_denoise_fn(model, mask_id=tok.mask_id))
        result = sampling.sample(
            denoise,
            key,
            jnp.asarray(tokens),
            mask_id=tok.mask_id,
            steps=cfg.sample_steps,
            method=cfg.sample_method,
            temperature=cfg.sample_temperature,
        )
        texts = [tok.decode(np.asarray(row)[1:].tolist()) for row in result.tokens]
        out: dict[str, Any] = {"samples": texts}
        if self.data == "stories":
            checks = [stories.check_text(text, window=True) for text in texts]
            n_sentences = max(sum(c.n_sentences for c in checks), 1)
            out["grammar_score"] = sum(c.n_valid for c in checks) / n_sentences
            out["grammatical"] = sum(c.n_grammatical for c in checks) / n_sentences
        return out


def summary_line(row: dict) -> str:
    """One line for the terminal: the NELBO and, where measured, the probes' scores."""
    parts = [f"step {row['step']}: val NELBO {row.get('val_nelbo', float('nan')):.4f} nats/token"]
    if "grammar_score" in row:
        parts.append(
            f"grammar {row['grammar_score']:.2f} in context"
            f" ({row['grammatical']:.2f} sentence by sentence)"
        )
    if "val_name_nats" in row:
        parts.append(
            f"repeated names {row['val_name_nats']:.2f} nats ({row['val_name_exact']:.0%} exact)"
        )
    if "val_hero_as_friend" in row:
        parts.append(f"friend named after the hero {row['val_hero_as_friend']:.0%}")
    return ", ".join(parts)
