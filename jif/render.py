"""What the app draws of a sampling run: HTML of any frame, the per-call plots, the summary.

A run is a `jif.live.LiveRun`: frame c is the input of the run's network call c, the last
frame its final tokens. `Samples` is what the page keeps of one run, drawn again at any frame
without sampling: every revealed token coloured by when it was revealed (or by the
probability it was sampled with), the template's tokens marked, masked positions as
placeholders, a tooltip with the call, the probability and the model's top alternatives.
Colours come from matplotlib's viridis and cividis maps (readable with colour-blind vision),
each with the text colour that reads on it, so light and dark themes both work. Nothing here
imports gradio; `app.py` puts these pieces on the page.
"""

from __future__ import annotations

import dataclasses
import functools
import html

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jif import floor
from jif.live import LiveRun

MASK_GLYPH = "\u2591\u2591"  # placeholder of a masked position while its token is unknown
PLACEHOLDER_CLASS = "jif-mask"  # every placeholder span carries this class
NEW_CLASS = "jif-new"  # tokens revealed by the call that led to the frame shown
FIXED_CLASS = "jif-fixed"  # the template's own tokens
TOKEN_CLASS = "jif-token"  # every revealed (generated) token
SAMPLE_CLASS = "jif-sample"  # the box of one sample
ERROR_CLASS = "jif-error"  # an error shown in the output area
COLOURINGS = ("reveal order", "confidence")
MASK_BG = "rgba(128,128,128,0.28)"  # reads on light and dark backgrounds alike


@dataclasses.dataclass(frozen=True, kw_only=True)
class Samples:
    """One run as the page draws it (numpy arrays; F frames, B samples, L positions).

    frames int32 [F, B, L]; reveal_frame int32 [B, L] (0: template, -1: still masked);
    top_ids / top_probs [B, L, TOP]: the model's best tokens at the revealing call;
    masked_entropy float32 [F, B]; remasked int32 [F, B]; prob float32 [B, L] the revealed
    token's probability as sampled and reveal_step int32 [B, L] its sampler step (both None
    until the run ends); pieces: the text of each token id shown; final_pieces: per sample,
    each position's text in the final tokens (multi-byte characters whole); guess [B, L]:
    the model's most likely token at the latest call, while running; texts, reports
    (jif.floor.check_stories per sample, data "stories" only): None until the run ends.
    """

    label: str
    frames: np.ndarray
    reveal_frame: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    masked_entropy: np.ndarray
    remasked: np.ndarray
    pieces: dict
    mask_id: int
    eot_id: int
    done: bool = False
    stopped: bool = False
    prob: np.ndarray | None = None
    reveal_step: np.ndarray | None = None
    final_pieces: list | None = None
    texts: list | None = None
    reports: list | None = None
    n_calls: int = 0
    expected_calls: int = 1
    guess: np.ndarray | None = None
    seconds: float | None = None
    first_call_s: float | None = None

    @classmethod
    def from_run(
        cls, run: LiveRun, tokenizer, *, label: str, data: str, expected_calls: int = 1
    ) -> Samples:
        """What `run` has produced so far (all of it once run.done); expected_calls scales
        the reveal-order colours while the run goes on."""
        frames = np.stack(list(run.frames))
        guess = None if run.guess is None else run.guess.copy()
        shown = [frames.ravel(), run.top_ids.ravel()] + ([] if guess is None else [guess.ravel()])
        ids = np.unique(np.concatenate(shown))
        pieces = {int(t): tokenizer.decode([int(t)]) for t in ids if int(t) != tokenizer.mask_id}
        out = dict(
            label=label,
            frames=frames,
            reveal_frame=run.reveal_frame.copy(),
            top_ids=run.top_ids.copy(),
            top_probs=run.top_probs.copy(),
            masked_entropy=np.stack(run.masked_entropy[: len(frames)]),
            remasked=np.stack(run.remasked[: len(frames)]),
            pieces=pieces,
            mask_id=tokenizer.mask_id,
            eot_id=tokenizer.eot_id,
            stopped=run.stopped,
            n_calls=len(frames),
            expected_calls=expected_calls,
            guess=guess,
            seconds=run.seconds,
            first_call_s=run.first_call_s,
        )
        result = run.result if run.done and run.error is None else None
        if result is not None:
            final = np.asarray(result.tokens)
            texts = [tokenizer.decode(row) for row in final]
            out.update(
                done=True,
                prob=np.asarray(result.trajectory.prob),
                reveal_step=np.asarray(result.trajectory.reveal_step),
                final_pieces=[token_pieces(tokenizer, row) for row in final],
                texts=texts,
                reports=[floor.check_stories([t]) for t in texts] if data == "stories" else None,
                n_calls=int(result.n_calls),
            )
        return cls(**out)

    @property
    def last(self) -> int:
        """The index of the last frame."""
        return len(self.frames) - 1


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


def frames_to_play(n_frames: int, after: int = -1, max_frames: int | None = None) -> list[int]:
    """Frames after `after` up to the last of n_frames, at most max_frames of them (evenly
    spaced, the last kept)."""
    frames = list(range(after + 1, n_frames))
    if max_frames is not None and len(frames) > max(max_frames, 1):
        keep = np.unique(np.linspace(0, len(frames) - 1, max(max_frames, 1)).round().astype(int))
        frames = [frames[i] for i in keep]
    return frames


# ----------------------------------------------------------------------------- colours


def colour(value: float, cmap: str) -> tuple[str, str]:
    """(background, text colour) for value in [0, 1] on a matplotlib colour map: black or
    white text, whichever contrasts more (WCAG relative luminance)."""
    return _colour(round(float(np.clip(value, 0.0, 1.0)), 3), cmap)


@functools.lru_cache(maxsize=4096)
def _colour(value: float, cmap: str) -> tuple[str, str]:
    rgb = np.asarray(matplotlib.colormaps[cmap](value)[:3])
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    luminance = float(linear @ [0.2126, 0.7152, 0.0722])
    black = (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05)
    return matplotlib.colors.to_hex(rgb), "#000" if black else "#fff"


def _number(p: float) -> str:
    """A probability without rounding a small one to 0.00."""
    return f"{p:.2f}" if p >= 0.01 or p == 0 else f"{p:.1e}"


def _tooltip(s: Samples, b: int, pos: int) -> str:
    when = int(s.reveal_frame[b, pos])
    n = max(s.n_calls, 1)
    text = f"revealed by network call {when} of {n}"
    if s.reveal_step is not None:
        text += f" (sampler step {int(s.reveal_step[b, pos]) + 1})"
    if s.prob is not None:
        text += f"; sampled with p {_number(float(s.prob[b, pos]))}"
    top = [
        f"{s.pieces.get(int(i), '?')!r} {_number(float(p))}"
        for i, p in zip(s.top_ids[b, pos], s.top_probs[b, pos], strict=True)
        if p >= 1e-4  # a probability too small to be an alternative
    ]
    if top:
        text += "; model's top tokens: " + ", ".join(top)
    return html.escape(text, quote=True)


# ----------------------------------------------------------------------------- HTML


def _span(cls: str, style: str, text: str, title: str | None = None) -> str:
    tip = f' title="{title}"' if title else ""
    return f'<span class="{cls}"{tip} style="{style}">{text}</span>'


def render_frame(s: Samples, frame: int, colouring: str = "reveal order") -> str:
    """HTML of every sample as it stood at `frame` (0: the template; s.last: the end)."""
    frame = int(np.clip(frame, 0, s.last))
    shown = s.frames[frame]
    by_order = colouring != "confidence" or s.prob is None
    span = max((s.n_calls if s.done else max(s.expected_calls, s.last)) - 1, 1)
    blocks = []
    for b in range(shown.shape[0]):
        spans = []
        for pos, token in enumerate(int(t) for t in shown[b]):
            final_text = None if s.final_pieces is None else s.final_pieces[b][pos]
            if token == s.mask_id:  # invisible text as wide as the token to come, or the
                # model's current guess, keeps the layout nearly still
                if final_text is None and s.guess is not None:
                    final_text = s.pieces.get(int(s.guess[b, pos]))
                hidden = html.escape(final_text) if final_text else MASK_GLYPH
                style = f"color:transparent;background:{MASK_BG};border-radius:3px"
                spans.append(_span(PLACEHOLDER_CLASS, style, hidden))
                continue
            when = int(s.reveal_frame[b, pos])
            kept = s.frames[-1][b, pos] == token and 0 <= when <= frame
            piece = final_text if kept and final_text is not None else s.pieces.get(token, "")
            text = html.escape(piece)
            if token == s.eot_id:  # BOS first, then story separators
                text = "" if pos == 0 else "⏎<br>"
            if when == 0 and kept:  # the template's own text
                style = "border-bottom:2px dotted #888;font-style:italic"
                spans.append(_span(FIXED_CLASS, style, text, "from the template"))
                continue
            if not kept:  # a token a remasking sampler will replace
                style = f"background:{MASK_BG};text-decoration:line-through"
                spans.append(_span(TOKEN_CLASS, style, text, "masked again later"))
                continue
            value = (when - 1) / span if by_order else float(s.prob[b, pos])
            bg, fg = colour(value, "viridis" if by_order else "cividis")
            style = f"background:{bg};color:{fg};border-radius:3px"
            cls = TOKEN_CLASS
            if when == frame and frame > 0:
                cls += f" {NEW_CLASS}"
                style += ";outline:2px solid #ff7f0e"
            spans.append(_span(cls, style, text, _tooltip(s, b, pos)))
        blocks.append(
            f'<div class="{SAMPLE_CLASS}" style="white-space:pre-wrap;overflow-wrap:anywhere;'
            "font-family:ui-monospace,monospace;font-size:15px;line-height:1.7;padding:8px;margin-bottom:8px;"
            f'border:1px solid #8888;border-radius:6px"><b>#{b + 1}</b> '
            + "".join(spans)
            + "</div>"
        )
    return legend(s, frame, by_order) + "".join(blocks)


def legend(s: Samples, frame: int, by_order: bool) -> str:
    """The frame counter and the colour key (every swatch with its own colours)."""
    swatch = lambda v, cmap, word: _span("", _swatch_style(v, cmap), word)
    if by_order:
        key = "revealed: " + " ".join(
            swatch(v, "viridis", w) for v, w in ((0, "first"), (0.5, "middle"), (1, "last"))
        )
    else:
        key = "sampled with p: " + " ".join(
            swatch(v, "cividis", w) for v, w in ((0.1, "0.1"), (0.5, "0.5"), (0.95, "0.95"))
        )
    masked = int(np.sum(s.frames[frame] == s.mask_id))
    state = "stopped" if s.stopped else ("done" if s.done else "running")
    where = f"after network call {frame} of {s.n_calls}" if s.done else f"network call {frame}"
    return (
        f'<div style="font-size:13px;margin-bottom:6px"><b>{html.escape(s.label)}</b> · {where}'
        f" · {masked} masked · {state}<br>{key} · "
        + _span("", "border-bottom:2px dotted #888;font-style:italic", "template")
        + " · "
        + _span("", f"background:{MASK_BG};border-radius:3px", "&nbsp;masked&nbsp;")
        + " · "
        + _span("", "outline:2px solid #ff7f0e", "revealed by this call")
        + " · hover a token for its call, probability and alternatives</div>"
    )


def _swatch_style(value: float, cmap: str) -> str:
    bg, fg = colour(value, cmap)
    return f"background:{bg};color:{fg};padding:0 4px;border-radius:3px"


def error_html(message: str) -> str:
    """An error that stays in the output area until the next Generate."""
    return (
        f'<div class="{ERROR_CLASS}" style="border:2px solid #d62728;border-radius:6px;'
        f'padding:10px;white-space:pre-wrap"><b>Error:</b> {html.escape(message)}</div>'
    )


# ----------------------------------------------------------------------------- plots


def call_statistics(s: Samples) -> dict:
    """Per network call c (1..n): tokens it revealed that were kept, tokens it masked again,
    the mean probability the kept ones were sampled with (NaN if none or not yet known), and
    the mean entropy (nats) of the positions still masked at its input."""
    calls = np.arange(1, s.last + 1)
    revealed = np.array([(s.reveal_frame == c).sum() for c in calls])
    conf = np.full(len(calls), np.nan)
    if s.prob is not None:
        for i, c in enumerate(calls):
            if revealed[i]:
                conf[i] = s.prob[s.reveal_frame == c].mean()
    entropy = s.masked_entropy[:-1] if len(s.masked_entropy) > 1 else s.masked_entropy[:0]
    with np.errstate(invalid="ignore"):
        ent = np.array([np.nanmean(e) if np.isfinite(e).any() else np.nan for e in entropy])
    return dict(
        calls=calls,
        revealed=revealed,
        remasked=s.remasked[1:].sum(axis=1),
        confidence=conf,
        entropy=ent[: len(calls)],
    )


def plot_statistics(runs: list[Samples]) -> Figure:
    """Per network call, for each run: tokens revealed, their sampled probability, and the
    entropy of what is still masked (a figure outside pyplot)."""
    fig = Figure(figsize=(6.4, 4.6))
    axes = fig.subplots(3, 1, sharex=True)
    for s, style in zip(runs, ("-", "--"), strict=False):
        st = call_statistics(s)
        axes[0].step(st["calls"], st["revealed"], style, where="mid", label=s.label)
        if st["remasked"].any():
            axes[0].step(st["calls"], -st["remasked"], style, where="mid", label="remasked (< 0)")
        axes[1].plot(st["calls"], st["confidence"], style + ".", markersize=3, label=s.label)
        axes[2].plot(st["calls"], st["entropy"], style, label=s.label)
    axes[0].set_ylabel("revealed")
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("sampled p")
    axes[1].set_ylim(0, 1.02)
    axes[2].set_ylabel("entropy of\nmasked (nats)")
    axes[2].set_xlabel("network call")
    fig.suptitle("per network call: tokens revealed, their probability, what is left", fontsize=9)
    fig.tight_layout()
    return fig


def plot_reveal_order(runs: list[Samples]) -> Figure:
    """A heat map per run: for each sample (row) and position (column), the network call
    that revealed it; the template's positions grey."""
    fig = Figure(figsize=(6.4, 1.0 + 1.1 * len(runs)))
    axes = np.atleast_1d(fig.subplots(len(runs), 1, squeeze=False)[:, 0])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    for ax, s in zip(axes, runs, strict=True):
        order = np.ma.masked_less_equal(s.reveal_frame.astype(float), 0)
        image = ax.imshow(order, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(order.shape[0]), [f"#{b + 1}" for b in range(order.shape[0])])
        ax.set_title(f"{s.label}: network call that revealed each position", fontsize=8)
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[-1].set_xlabel("position")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- summary


def summary_markdown(runs: list[Samples], data: str) -> str:
    """One row per run (calls, wall time, quality), then each sample's verdict."""
    rows = [
        "| run | network calls | wall time | first call after | tokens/s | whole stories |",
        "|---|---|---|---|---|---|",
    ]
    for s in runs:
        generated = int(np.sum(s.frames[0] == s.mask_id))
        wall = "" if s.seconds is None else f"{s.seconds:.2f} s"
        first = "" if s.first_call_s is None else f"{s.first_call_s:.2f} s"
        rate = f"{generated / s.seconds:.0f}" if s.seconds else ""
        stories = "n/a"
        if s.reports is not None:
            n = sum(r.n_stories for r in s.reports)
            stories = f"{sum(r.n_valid for r in s.reports)} of {n}"
        rows.append(f"| {s.label} | {s.n_calls} | {wall} | {first} | {rate} | {stories} |")
    notes = [
        "",
        "Wall time includes compiling when the settings are new (the first call comes after "
        "it). Whole stories: pieces between end-of-text tokens that the stories grammar "
        "writes (`jif.floor.check_stories`; an unfinished last one counts if the grammar "
        "can continue it).",
    ]
    if all(s.reports is None for s in runs):
        notes = [
            "",
            f"Quality: the story checker only reads models trained on the embedded stories "
            f"(this one: `{data}`).",
        ]
        return "\n".join(rows + notes)
    rows += notes + [
        "",
        "| run | # | whole stories | sentences a template writes | ... and agree in context |",
        "|---|---|---|---|---|",
    ]
    for s in runs:
        for i, r in enumerate(s.reports or []):
            rows.append(
                f"| {s.label} | {i + 1} | {r.n_valid} of {r.n_stories} | "
                f"{r.sentence_level:.2f} of {r.n_sentences} | {r.in_context:.2f} |"
            )
    return "\n".join(rows)
