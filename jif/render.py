"""What the app draws of a sampling run: HTML of any frame, the per-step plot, the scores.

A run is `jif.sampling.sample(..., return_trajectory=True)`; its trajectory says when each
position was revealed (`jif.sampling.first_frame`), so every frame is drawn again from the
final tokens without sampling: masked positions are placeholders, the tokens revealed in
the current frame are coloured by the model's confidence, earlier tokens are plain.
Nothing here imports gradio; `app.py` puts these pieces on the page.
"""

from __future__ import annotations

import dataclasses
import html

import jax
import numpy as np
from matplotlib.figure import Figure

from jif import sampling
from jif.stories import check_text

MASK_GLYPH = "\u2591\u2591"  # placeholder drawn for a masked position
PLACEHOLDER_CLASS = "jif-mask"  # every placeholder span carries this class
NEW_CLASS = "jif-new"  # every token revealed in the frame shown carries this class
SAMPLE_CLASS = "jif-sample"  # the box of one sample


@dataclasses.dataclass(frozen=True, kw_only=True)
class Samples:
    """One Generate as the page draws it: the sampler's result and each position's text.

    result: jif.sampling.SampleResult with its trajectory, as numpy arrays (tokens int32
      [B, L], the final tokens). pieces: per sample, the text of each position
      (`token_pieces`). texts: the decoded samples. scores: jif.stories.check_text per
    sample, or None for models trained on other data.
    """

    result: sampling.SampleResult
    pieces: list[list[str]]
    texts: list[str]
    scores: list | None
    eot_id: int
    mask_id: int

    @classmethod
    def from_result(cls, result: sampling.SampleResult, tokenizer, *, data: str) -> Samples:
        """A SampleResult with its trajectory -> Samples (grammar scores for data="stories")."""
        if result.trajectory is None:
            raise ValueError("the page needs the trajectory: sample with return_trajectory=True")
        result = jax.device_get(result)
        texts = [tokenizer.decode(row) for row in result.tokens]
        scores = None
        if data == "stories":
            scores = [check_text(t.replace("<|endoftext|>", " ").strip()) for t in texts]
        return cls(
            result=result,
            pieces=[token_pieces(tokenizer, row) for row in result.tokens],
            texts=texts,
            scores=scores,
            eot_id=tokenizer.eot_id,
            mask_id=tokenizer.mask_id,
        )

    @property
    def n_steps(self) -> int:
        """The last frame."""
        return self.result.trajectory.n_steps


def token_pieces(tokenizer, row) -> list[str]:
    """The text of each position of one sample, list[str] [L].

    A character split over several byte tokens (an emoji, an accented letter) decodes only
    as a whole: its text goes to the last token of the group, the others show nothing.
    """
    pieces, group = [], []
    for t in (int(t) for t in row):
        group.append(t)
        text = tokenizer.decode(group)
        if "\ufffd" in text and len(group) < 4:  # UTF-8 characters are at most 4 bytes
            pieces.append("")
            continue
        pieces.append(text)
        group = []
    if group:  # an incomplete character at the end: show what the tokens decode to
        pieces[-len(group) :] = [tokenizer.decode([t]) for t in group]
    return pieces


def frames_to_play(samples: Samples, max_frames: int | None = None) -> list[int]:
    """The frames worth showing: 0, then every frame that reveals something, then the last;
    at most max_frames of them (evenly spaced, the first and the last kept) when given."""
    revealing = np.flatnonzero(np.asarray(samples.result.trajectory.counts).sum(axis=0))
    changed = [int(s) + 1 for s in revealing]  # step s is revealed in frame s + 1
    last = samples.n_steps
    frames = [0, *changed] if changed and changed[-1] == last else [0, *changed, last]
    if max_frames is not None and len(frames) > max(max_frames, 2):
        keep = np.unique(np.linspace(0, len(frames) - 1, max(max_frames, 2)).round().astype(int))
        frames = [frames[i] for i in keep]
    return frames


# ----------------------------------------------------------------------------- HTML


def _confidence_colour(c: float) -> str:
    """Red (0) through yellow to green (1), light enough to read black text on."""
    hue = 120.0 * float(np.clip(c, 0.0, 1.0))
    return f"hsl({hue:.0f}, 85%, 72%)"


def render_step(samples: Samples, step: int) -> str:
    """HTML of every sample as it stood in frame `step` (0 = the template)."""
    first = sampling.first_frame(samples.result.trajectory)
    prob = np.asarray(samples.result.trajectory.prob)
    tokens = np.asarray(samples.result.tokens)
    blocks = []
    for b, pieces in enumerate(samples.pieces):
        spans = []
        for pos, piece in enumerate(pieces):
            when = int(first[b, pos])
            if when > step:
                spans.append(
                    f'<span class="{PLACEHOLDER_CLASS}" style="color:#9aa0a6;'
                    f'letter-spacing:-1px;margin-right:3px">{MASK_GLYPH}</span>'
                )
                continue
            text = html.escape(piece)
            if int(tokens[b, pos]) == samples.eot_id:  # BOS first, then story separators
                text = "" if pos == 0 else '<span style="color:#9aa0a6">⏎</span><br>'
            if when == step and step > 0:
                c = float(prob[b, pos])
                spans.append(
                    f'<span class="{NEW_CLASS}" title="confidence {c:.2f}" style="background:'
                    f'{_confidence_colour(c)};border-radius:3px">{text}</span>'
                )
            else:
                spans.append(f"<span>{text}</span>")
        blocks.append(
            f'<div class="{SAMPLE_CLASS}" style="white-space:pre-wrap;font-family:ui-monospace,'
            "monospace;font-size:15px;line-height:1.6;padding:8px;margin-bottom:8px;"
            f'border:1px solid #ddd;border-radius:6px"><b>#{b + 1}</b> ' + "".join(spans) + "</div>"
        )
    legend = (
        '<div style="font-size:12px;color:#666;margin-bottom:6px">'
        f"step {step} / {samples.n_steps} · {MASK_GLYPH} masked · newly revealed coloured by "
        f'confidence: <span style="background:{_confidence_colour(0.1)}">low</span> '
        f'<span style="background:{_confidence_colour(0.5)}">mid</span> '
        f'<span style="background:{_confidence_colour(0.95)}">high</span></div>'
    )
    return legend + "".join(blocks)


# ----------------------------------------------------------------------------- plot, scores


def step_statistics(samples: Samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames [S] = 1..n_steps, tokens revealed in each [S] summed over samples, their
    mean confidence [S], NaN where none)."""
    trajectory = samples.result.trajectory
    frames = np.arange(1, samples.n_steps + 1)
    revealed = np.asarray(trajectory.counts).sum(axis=0)
    first, prob = sampling.first_frame(trajectory), np.asarray(trajectory.prob)
    conf = np.array(
        [prob[first == f].mean() if n else np.nan for f, n in zip(frames, revealed, strict=True)]
    )
    return frames, revealed, conf


def plot_statistics(samples: Samples) -> Figure:
    """Tokens revealed per step and their mean confidence (a figure outside pyplot)."""
    steps, revealed, conf = step_statistics(samples)
    fig = Figure(figsize=(6, 3.2))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar(steps, revealed, width=1.0, color="#4c78a8", label="revealed (final tokens)")
    remasked = samples.result.trajectory.remasked  # remasking samplers (jif.remask) only
    if remasked is not None:
        ax1.bar(steps, -np.asarray(remasked).sum(axis=0), width=1.0, color="#f58518")
        ax1.legend(["revealed (final tokens)", "remasked (below 0)"], fontsize=7)
    ax1.set_ylabel("revealed")
    ok = ~np.isnan(conf)
    ax2.plot(steps[ok], conf[ok], ".-", color="#e45756", markersize=3)
    top = float(np.nanmax(conf)) if ok.any() else 1.0
    ax2.set_ylim(0, min(1.02, 1.15 * top) if top > 0 else 1.0)
    ax2.set_ylabel("mean conf.")
    ax2.set_xlabel("step")
    fig.suptitle("tokens revealed and their mean confidence, per step", fontsize=9)
    fig.tight_layout()
    return fig


def scores_markdown(samples: Samples, data: str) -> str:
    """The grammar checker's verdict per sample, as a Markdown table."""
    if samples.scores is None:
        return f"Grammar score: only for checkpoints trained on the embedded stories (this one: `{data}`)."
    rows = [
        "| # | grammar in context | sentence by sentence | sentences | names and pronouns ok |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(samples.scores):
        ok = "yes" if r.pronouns_consistent else "no"
        rows.append(f"| {i + 1} | {r.score:.2f} | {r.grammatical:.2f} | {r.n_sentences} | {ok} |")
    return "\n".join(rows)
