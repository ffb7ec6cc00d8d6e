"""Name-copying probes: validation stories of the embedded grammar with names masked.

A story's later mentions of a name are fixed by the story so far, so they measure whether a
model copies names from its context (`name_probes`); writing the hero's name where the
friend is introduced measures whether it also copies where the grammar never does
(`friend_probes`). Both are built from `jif.stories`' validation split, tokenised the way
the training data is.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

from jif import stories


@dataclasses.dataclass(frozen=True, kw_only=True)
class NameProbes:
    """Validation stories with one repeated name masked: does a model copy names?"""

    tokens: np.ndarray
    """int32 [n, seq_len]: BOS + one validation story, eot-padded (unmasked)."""
    mask: np.ndarray
    """bool [n, seq_len]: the tokens of one mention of a name the story has named before."""
    texts: tuple[str, ...]
    """The story of each row."""
    spans: tuple[tuple[int, int], ...]
    """Character span of the masked name in its story."""


def _tokens_with_names(tokenizer, text: str) -> tuple[list[int], list[tuple[re.Match, int, int]]]:
    """BOS + the text's tokens, and each name mention as (match, first token, n tokens).

    Encoding the text piece by piece gives its own tokenisation: GPT-2 pretokens never
    cross a name's edges (a name's leading space goes with the name)."""
    ids, names, pos = [tokenizer.eot_id], [], 0
    for m in stories.NAME.finditer(text):
        cut = m.start() - (m.start() > 0 and text[m.start() - 1] == " ")
        ids += tokenizer.encode(text[pos:cut])
        name_ids = tokenizer.encode(text[cut : m.end()])
        names.append((m, len(ids), len(name_ids)))
        ids += name_ids
        pos = m.end()
    return ids + tokenizer.encode(text[pos:]), names


def _row(tokenizer, ids: list[int], seq_len: int) -> np.ndarray:
    """int32 [seq_len]: ids cut to seq_len or padded with eot."""
    row = np.full(seq_len, tokenizer.eot_id, np.int32)
    row[: min(len(ids), seq_len)] = ids[:seq_len]
    return row


def name_probes(tokenizer, *, n_stories: int = 32, seq_len: int = 128, seed: int = 0):
    """One probe per repeated name mention in the first `n_stories` validation stories.

    A name's later mentions are fixed by the story so far, so the masked tokens are what a
    model that copies names predicts with near certainty; one that only knows that a name
    goes there pays about log 32 = 3.47 nats (the 32 names are equally likely)."""
    rows, masks, texts, spans_out = [], [], [], []
    for story in itertools.islice(stories.iter_stories(seed, "validation"), n_stories):
        ids, names = _tokens_with_names(tokenizer, story)
        row = _row(tokenizer, ids, seq_len)
        seen = set()
        for m, start, n_tok in names:
            if m.group(1) in seen and start + n_tok <= seq_len:
                mask = np.zeros(seq_len, bool)
                mask[start : start + n_tok] = True
                rows.append(row)
                masks.append(mask)
                texts.append(story)
                spans_out.append((m.start(), m.end()))
            seen.add(m.group(1))
    return NameProbes(
        tokens=np.array(rows, np.int32).reshape(-1, seq_len),
        mask=np.array(masks, bool).reshape(-1, seq_len),
        texts=tuple(texts),
        spans=tuple(spans_out),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FriendProbes:
    """Validation stories with the hero's name written where the friend is introduced."""

    tokens: np.ndarray
    """int32 [n, seq_len]: BOS + the story with the hero's name at the friend's
    introduction, eot-padded or cut to seq_len."""
    mask: np.ndarray
    """bool [n, seq_len]: that introduction's name and every later mention of the friend."""
    span: np.ndarray
    """bool [n, seq_len]: the hero's name at the introduction (inside mask)."""
    texts: tuple[str, ...]
    """The altered story of each row."""


def friend_probes(tokenizer, *, n_stories: int = 64, seq_len: int = 128, seed: int = 0):
    """Does a model name the friend after the hero? One probe per validation story with a
    friend: the friend's name is masked everywhere, and the probe asks for the probability
    that the introduction ("... a friend named [?]") names the hero. The grammar never does
    (0); a model that knew only the gender would say about 1/16."""
    rows, masks, spans, texts = [], [], [], []
    for story in itertools.islice(stories.iter_stories(seed, "validation"), n_stories):
        names = list(stories.NAME.finditer(story))
        hero = names[0].group(1)  # every introduction names the hero first
        friends = [m for m in names if m.group(1) != hero]
        if not friends:
            continue
        intro, friend = friends[0], friends[0].group(1)
        text = story[: intro.start()] + hero + story[intro.end() :]
        ids, mentions = _tokens_with_names(tokenizer, text)
        mask, span = np.zeros(seq_len, bool), np.zeros(seq_len, bool)
        for m, start, n_tok in mentions:
            if m.start() == intro.start():
                if start + n_tok > seq_len:  # the introduction is cut off
                    break
                span[start : start + n_tok] = mask[start : start + n_tok] = True
            elif m.group(1) == friend:
                mask[start : start + n_tok] = True  # (a mention cut at seq_len: its start)
        if not span.any():
            continue
        rows.append(_row(tokenizer, ids, seq_len))
        masks.append(mask)
        spans.append(span)
        texts.append(text)
    return FriendProbes(
        tokens=np.array(rows, np.int32).reshape(-1, seq_len),
        mask=np.array(masks, bool).reshape(-1, seq_len),
        span=np.array(spans, bool).reshape(-1, seq_len),
        texts=tuple(texts),
    )
