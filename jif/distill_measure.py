"""Sample quality against sampling steps for a teacher and its distilled students (docs/distill.md).

    python -m jif.distill_measure --models teacher=runs/x r1=runs/x-sdtt/round-1 \
        --samples 64 --out runs/x-sdtt/measure                        # sample, story-level
    python -m jif.distill_measure --models ... --out runs/x-sdtt/measure --judge runs/ar
    python -m jif.distill_measure --models ... --out ... --figure docs/figures/distill.png

For every model, --methods and --steps it draws --samples unprompted samples (BOS + masks;
the same keys for every model, as jif.eval --judge draws them: jif.genppl.draw_samples) and
records the story-level measure (jif.floor.check_stories: the share of whole stories the
grammar writes) and the samples' unigram entropy (jif.genppl.sample_stats). With --judge, the
generative perplexity under that AR checkpoint (jif.genppl.judge_scores) is added. Results go
to <out>/results.json with the tokens of each setting (<out>/<model>-<method>-<steps>.npy),
so a second call only does what is missing: sample first, judge later when the judge is ready.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
import tyro

from jif import checkpoint as ckpt
from jif import floor, genppl, hostmem


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    models: tuple[str, ...]
    """name=checkpoint pairs (a run folder or a step folder), e.g. teacher=runs/x."""
    out: str
    """Folder of results.json and the samples' tokens."""
    judge: str | None = None
    """An AR checkpoint scoring the samples (generative perplexity)."""
    samples: int = 64
    """Samples per model, method and steps."""
    steps: tuple[int, ...] = (8, 16, 32, 64, 128)
    """Sampling steps."""
    methods: tuple[str, ...] = ("ddpm_cache", "confidence")
    """Samplers (jif.sampling.METHODS)."""
    seed: int = 0
    """Seed of the samples (the same for every model)."""
    batch_size: int = 32
    """Samples drawn at once."""
    figure: str | None = None
    """Write a PNG of story-level and generative perplexity against steps."""


def parse_models(models: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models {item!r}: write name=checkpoint, e.g. teacher=runs/x")
        out[name] = path
    return out


def measure(cfg: MeasureConfig, say=print) -> list[dict]:
    """The results (one dict per model, method and steps), updated in <out>/results.json."""
    models = parse_models(cfg.models)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "results.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    index = {(r["model"], r["method"], r["steps"]): r for r in rows}
    judge = genppl.open_judge(cfg.judge) if cfg.judge else None
    for name, where in models.items():
        loaded = None
        for method in cfg.methods:
            for steps in cfg.steps:
                row = index.setdefault((name, method, steps), {})
                tokens_file = os.path.join(cfg.out, f"{name}-{method}-{steps}.npy")
                if not os.path.exists(tokens_file):
                    loaded = loaded or ckpt.load_for_inference(where)
                    start = time.perf_counter()
                    tokens = genppl.draw_samples(
                        loaded,
                        jax.random.key(cfg.seed),
                        n=cfg.samples,
                        batch_size=cfg.batch_size,
                        steps=steps,
                        method=method,
                    )
                    np.save(tokens_file, tokens)
                    texts = [loaded.tokenizer.decode(r[1:].tolist()) for r in tokens]
                    report = floor.check_stories(texts, window=True)
                    row.update(
                        model=name,
                        checkpoint=loaded.path,
                        method=method,
                        steps=steps,
                        n_samples=len(tokens),
                        story_level=report.story_level,
                        n_stories=report.n_stories,
                        sentence_level=report.sentence_level,
                        distinct_4grams=report.distinct_4grams,
                        **genppl.sample_stats(tokens),
                        sample_seconds=time.perf_counter() - start,
                        example=texts[0][:300],
                    )
                if judge is not None and "gen_ppl" not in row:
                    tokens = np.load(tokens_file)
                    loaded = loaded or ckpt.load_for_inference(where)
                    scores = genppl.score_rows(judge, tokens, loaded.tokenizer, batch_size=32)
                    row.update({k: scores[k] for k in ("nll", "nll_ci95_halfwidth", "gen_ppl")})
                    row["judge"] = judge.name
                say(json.dumps({k: v for k, v in row.items() if k != "example"}))
                rows = list(index.values())
                with open(path + ".tmp", "w") as f:
                    json.dump(rows, f, indent=1)
                os.replace(path + ".tmp", path)
    return list(index.values())


def plot(rows: list[dict], figure: str, names: list[str]) -> None:
    """Story-level measure, generative perplexity and entropy against steps, one column a
    method, one line a model."""
    import matplotlib  # optional extra: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    metrics = [("story_level", "story-level (higher is better)")]
    if any("gen_ppl" in r for r in rows):
        metrics.append(("gen_ppl", "generative perplexity (lower)"))
    metrics.append(("entropy", "unigram entropy, nats"))
    fig, axes = plt.subplots(
        len(metrics), len(methods), figsize=(4 * len(methods), 3 * len(metrics)), squeeze=False
    )
    for j, method in enumerate(methods):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for name in names:
                pts = sorted(
                    (r["steps"], r[key]) for r in rows if r["model"] == name and r["method"] == method and key in r
                )  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_xscale("log", base=2)
            if key == "gen_ppl":
                ax.set_yscale("log")
            ticks = sorted({r["steps"] for r in rows})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(label)
            ax.set_title(method)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=64)


def main(argv: list[str] | None = None) -> list[dict]:
    hostmem.reuse_freed_memory()
    cfg = tyro.cli(MeasureConfig, args=argv, description=__doc__)
    try:
        rows = measure(cfg)
        if cfg.figure:
            plot(rows, cfg.figure, list(parse_models(cfg.models)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return rows


if __name__ == "__main__":
    main()
