"""The story grammar as a weighted automaton: whole-story checking and the validation floor.

`jif.stories` writes a story as a chain of sentence positions (introduction, setting, maybe a
pet, the friend, one or two events, a closing), each from a uniformly chosen template whose
slots are uniform choices. `Automaton` sums, over a sequence of units (characters or token
ids), the probability of every way the grammar writes it: as a whole story, as a prefix of
one, or as a piece starting at any unit inside one (a window of the packed stream).

- `check_stories(texts, window=...)`: a story is valid when that probability is not zero:
  the sentence order and event structure, one hero, one friend who is not the hero, one
  pet, each event's object, every name, pronoun and "girl" / "boy"; an unfinished tail must
  be a prefix the grammar can continue, and a window's first story a suffix it can write.
- `floor(tokenizer, seq_len=..., n_sequences=..., seed=..., packing=...)`: the mean of
  -log q(row) / seq_len over the rows of `jif.data.validation_tokens`, q the distribution of
  training rows: the validation NELBO of the true denoiser.

Exact sums. Every template is rendered left to right and GPT-2's pre-tokeniser never joins
a word with the space or punctuation around it, so a story's characters and its tokens are
the concatenation of its elements' units (tests/test_floor.py checks it). A role introduced
out of sight (before the window, or after a "girl named" that constrains it) keeps the set
of values the visible text allows, and the probability of that set under the generator (the
hero uniform over 32 names, the friend over the 31 others, an object over 24, the pet over
18) is multiplied in at the end. "pack" rows start at a uniform token of the endless stream
of stories, each followed by eot, moved past an eot they would start on, so a story's first
token weighs twice, and each token 1 / E[tokens per story + 1]; "align" rows start at a
story's first token, "pad" rows hold one story and eot padding. How this law, and the NELBO
of the true denoiser, compare with what jif measures: docs/data.md ("The loss floor").
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from jif import data as data_lib
from jif import stories
from jif.tokenizer import EOT_TOKEN

NAMES, OBJECTS, ANIMALS = (stories.WORDS[c] for c in ("name", "object", "animal"))
ROLES = "AFOP"  # role index in a roles tuple (None: not introduced; str: seen; frozenset: hidden)
CLASS_OF_ROLE = {"A": NAMES, "F": NAMES, "O": OBJECTS, "P": ANIMALS}
FULL = tuple(frozenset(CLASS_OF_ROLE[r]) for r in ROLES)  # every role out of sight, unconstrained
GENDER_SET = {g: frozenset(n for n in NAMES if stories.GENDER[n] == g) for g in stories.FORMS}
EVENT_NAMES = list(stories.EVENTS)
START, END = ("intro", None, False), ("end", None, False)
NEG_INF = -math.inf

# ----------------------------------------------------------------------------- structure


def _alternatives(stage, pet: bool | None) -> list[str]:
    """The templates of one sentence position (uniform among them)."""
    if isinstance(stage, tuple):
        return stories.EVENTS[stage[1]][stage[2]]
    table = {"intro": stories.INTRO, "setting": stories.SETTING, "pet": stories.PET}
    table |= {"friend": stories.FRIEND, "closing": stories.CLOSING}
    return table[stage] + (stories.CLOSING_PET if stage == "closing" and pet else [])


def _after(state) -> list[tuple[float, tuple]]:
    """(log p, next state) after a sentence at `state` = (stage, pet, in the second event)."""
    stage, pet, second = state
    if stage == "intro":
        return [(0.0, ("setting", None, False))]
    if stage == "setting":
        p = stories.P_PET
        return [(math.log(p), ("pet", True, False)), (math.log(1 - p), ("friend", False, False))]
    if stage == "pet":
        return [(0.0, ("friend", True, False))]
    if stage == "friend":
        return [(-math.log(len(EVENT_NAMES)), (("ev", e, 0), pet, False)) for e in EVENT_NAMES]
    if stage == "closing":
        return [(0.0, END)]
    _, event, k = stage
    if k + 1 < len(stories.EVENTS[event]):
        return [(0.0, (("ev", event, k + 1), pet, second))]
    closing = ("closing", pet, False)
    if second:
        return [(0.0, closing)]
    p2, others = stories.P_TWO_EVENTS, [e for e in EVENT_NAMES if e != event]
    two = [(math.log(p2 / len(others)), (("ev", e, 0), pet, True)) for e in others]
    return two + [(math.log(1 - p2), closing)]


def _visits() -> dict[tuple, float]:
    """Probability that a story passes through each state (sentence by sentence)."""
    visits, layer = {}, {START: 1.0}
    while layer:
        nxt: dict[tuple, float] = {}
        for state, p in layer.items():
            visits[state] = visits.get(state, 0.0) + p
            for lp, s2 in _after(state):
                if s2 != END:
                    nxt[s2] = nxt.get(s2, 0.0) + p * math.exp(lp)
        layer = nxt
    return visits


def _elements(template: str, lead: bool) -> list[tuple[str, int | None, list[tuple[str, str]]]]:
    """A template as (kind, role index, [(text, value)]) elements, kind one of lit / word /
    intro / ref / form. A space before a slot goes with the slot, as GPT-2 tokenises it;
    `lead`: a sentence after the first starts with the space that joins it to the story."""
    template, out, pos = (" " if lead else "") + template, [], 0
    for m in stories._SLOT.finditer(template):
        lit, space = template[pos : m.start()], ""
        if lit.endswith(" "):
            lit, space = lit[:-1], " "
        if lit:
            out.append(("lit", None, [(lit, "")]))
        slot, pos = m.group(1), m.end()
        if "." in slot:
            role, form = slot.split(".")
            forms = [(stories.FORMS[g][form.lower()], g) for g in stories.FORMS]
            opts = [(w.capitalize() if form[0].isupper() else w, g) for w, g in forms]
            out.append(("form", ROLES.index(role), [(space + w, g) for w, g in opts]))
        elif slot.lstrip("+") in ROLES:
            kind, role = ("intro", slot[1:]) if slot[0] == "+" else ("ref", slot)
            words = CLASS_OF_ROLE[role]
            out.append((kind, ROLES.index(role), [(space + w, w) for w in words]))
        else:
            out.append(("word", None, [(space + w, w) for w in stories.WORDS[slot]]))
    if template[pos:]:
        out.append(("lit", None, [(template[pos:], "")]))
    return out


# ----------------------------------------------------------------------------- roles


def _apply(kind: str, r: int, value: str, roles: tuple) -> tuple[tuple, float] | None:
    """Roles after one slot value (and a log-factor), or None if the grammar forbids it."""
    if r is None:  # a word or a literal: no role
        return roles, 0.0
    cur = roles[r]
    if kind == "ref":
        if isinstance(cur, str):
            return (roles, 0.0) if cur == value else None
        if cur is None or value not in cur:
            return None
        new, extra = frozenset((value,)), 0.0
    elif kind == "form":  # value: the gender the word agrees with
        if isinstance(cur, str):
            return (roles, 0.0) if stories.GENDER[cur] == value else None
        new, extra = GENDER_SET[value] if cur is None else cur & GENDER_SET[value], 0.0
        if not new:
            return None
    else:  # intro: A, F and the pet once per story; each event introduces its own object
        extra = 0.0
        if r == ROLES.index("O"):
            if isinstance(cur, frozenset):  # the previous object, out of sight: its share
                extra = math.log(len(cur) / len(OBJECTS))
        elif isinstance(cur, str) or (cur is not None and value not in cur):
            return None
        if r == ROLES.index("F") and roles[0] == value:  # the friend is never the hero
            return None
        new = value
    return roles[:r] + (new,) + roles[r + 1 :], extra


def _hidden_logp(roles: tuple) -> float:
    """log P(the roles out of sight take values the text allows), given the seen ones."""
    a, f, o, p = roles
    n = len(NAMES)
    if isinstance(a, frozenset):
        if isinstance(f, str):
            w = len(a - {f}) / n
        elif isinstance(f, frozenset):
            w = (len(a) * len(f) - len(a & f)) / (n * (n - 1))
        else:
            w = len(a) / n
    elif isinstance(f, frozenset):
        w = len(f - {a}) / (n - 1) if isinstance(a, str) else len(f) / n
    else:
        w = 1.0
    w *= len(o) / len(OBJECTS) if isinstance(o, frozenset) else 1.0
    w *= len(p) / len(ANIMALS) if isinstance(p, frozenset) else 1.0
    return math.log(w) if w > 0 else NEG_INF


# ----------------------------------------------------------------------------- automaton


class Automaton:
    """The grammar over units: `encode(list of texts) -> list of unit sequences` (characters:
    the texts themselves; tokens: their ids as tuples)."""

    def __init__(self, encode: Callable[[list[str]], list[Sequence]]):
        self.visits = _visits()
        self.templates: list[tuple[str, bool]] = []  # (text, starts a story) per template
        self.at: dict[tuple, list[tuple[float, int]]] = {}  # state -> [(log p, template)]
        for state in self.visits:
            alts = _alternatives(state[0], state[1])
            for text in alts:
                if (text, state == START) not in self.templates:
                    self.templates.append((text, state == START))
            tids = [self.templates.index((t, state == START)) for t in alts]
            self.at[state] = [(-math.log(len(alts)), tid) for tid in tids]
        raw = [_elements(text, not first) for text, first in self.templates]
        texts = sorted({t for els in raw for _, _, opts in els for t, _ in opts})
        units = dict(zip(texts, encode(texts), strict=True))
        self.elements = []  # per template: [(kind, role, [(units, value, log p)], first-unit index)]
        for els in raw:
            compiled = []
            for kind, role, opts in els:
                n_opts = len(opts) - (kind == "intro" and role == ROLES.index("F"))  # F != A
                lp = -math.log(n_opts) if kind in ("word", "intro") else 0.0
                options = [(units[t], v, lp) for t, v in opts]
                first: dict = {}
                for i, (u, _, _) in enumerate(options):
                    first.setdefault(u[0], []).append(i)
                compiled.append((kind, role, options, first))
            self.elements.append(compiled)
        self.states_of: dict[int, list[tuple[tuple, float]]] = {}
        for state, v in self.visits.items():
            for lt, tid in self.at[state]:
                self.states_of.setdefault(tid, []).append((state, math.log(v) + lt))
        self.starts: dict = {}  # first unit of a window -> [(template, element, option, offset)]
        for tid, els in enumerate(self.elements):
            for e, (_, _, options, _) in enumerate(els):
                for oi, (u, _, _) in enumerate(options):
                    for k in range(len(u)):
                        self.starts.setdefault(u[k], []).append((tid, e, oi, k))
        self.units_per_story = self._story_units()
        self.entropy_per_story = self._story_entropy()

    def _per_story(self, f: Callable[[list], float]) -> float:
        """E[sum of f(options) over the elements of a story]."""
        total = 0.0
        for state, v in self.visits.items():
            for lt, tid in self.at[state]:
                total += v * math.exp(lt) * sum(f(o) for _, _, o, _ in self.elements[tid])
        return total

    def _story_units(self) -> float:
        """Expected units per story (exact: every option of an element is equally likely in
        the margin, the friend's name and an event's object included)."""
        return self._per_story(lambda opts: float(np.mean([len(u) for u, _, _ in opts])))

    def _story_entropy(self) -> float:
        """Entropy of a story in nats (exact): structure, templates and slot choices."""
        h = self._per_story(lambda opts: -opts[0][2])  # uniform slot choices
        for state, v in self.visits.items():
            h += v * math.log(len(self.at[state]))  # the template of each sentence
            h -= v * sum(math.exp(lp) * lp for lp, _ in _after(state))  # pet, events
        return h

    def parse(self, x: Sequence, *, anywhere: bool, prefix: bool, start_bonus: float = 0.0):
        """(log of the summed weight, units parsed by the furthest reading) of x as: a story
        from its start (anywhere=False) or a piece starting at a uniformly chosen unit of a
        story (anywhere=True: the weight of each unit position is P(story) each, so the sum
        over positions and stories is E[units per story]; `start_bonus` is added at a
        story's first unit), ending with the story (prefix=False) or anywhere (prefix=True)."""
        n, acc = len(x), []
        buckets: list[dict] = [{} for _ in range(n + 1)]

        def accept(lw: float, roles: tuple) -> None:
            acc.append(lw + _hidden_logp(roles))

        def push(pos: int, key: tuple, lw: float) -> None:
            buckets[pos][key] = np.logaddexp(buckets[pos].get(key, NEG_INF), lw)

        def match(pos, state, tid, e, roles, lw):
            kind, role, options, first = self.elements[tid][e]
            for oi in first.get(x[pos], ()):
                u, value, lp = options[oi]
                end = pos + len(u)
                if end <= n:
                    if x[pos:end] != u:
                        continue
                elif not prefix or u[: n - pos] != x[pos:]:
                    continue
                res = _apply(kind, role, value, roles)
                if res is None:
                    continue
                w = lw + lp + res[1]
                if end > n:
                    accept(w, res[0])
                    continue
                push(end, (state, tid, e + 1, res[0]), w)

        if not anywhere:
            buckets[0][(START, -1, 0, (None,) * 4)] = 0.0  # template -1: before the story
        elif n:
            for tid, e, oi, k in self.starts.get(x[0], ()):
                kind, role, options, _ = self.elements[tid][e]
                u, value, lp = options[oi]
                tail = u[k:]
                res = _apply(kind, role, value, FULL)
                if res is None or tail[:n] != x[: len(tail)]:
                    continue
                if len(tail) > n and not prefix:
                    continue
                for state, lv in self.states_of[tid]:
                    w = lv + lp + res[1] + (start_bonus if state == START and e == k == 0 else 0)
                    if len(tail) > n:
                        accept(w, res[0])
                    else:
                        push(len(tail), (state, tid, e + 1, res[0]), w)
        reached = 0
        for pos in range(n + 1):
            for (state, tid, e, roles), lw in buckets[pos].items():
                reached = pos
                if tid >= 0 and e < len(self.elements[tid]):  # inside a sentence
                    if pos < n:
                        match(pos, state, tid, e, roles, lw)
                    elif prefix:
                        accept(lw, roles)
                    continue
                if pos == n:  # between sentences, at the end of x
                    if prefix or (tid >= 0 and _after(state)[0][1] == END):
                        accept(lw, roles)
                    continue
                succ = [(0.0, START)] if tid < 0 else _after(state)
                for lp, s2 in succ:
                    for lt, t2 in self.at.get(s2, ()):
                        match(pos, s2, t2, 0, roles, lw + lp + lt)
            buckets[pos] = {}
        return (float(np.logaddexp.reduce(acc)) if acc else NEG_INF), reached


# ----------------------------------------------------------------------------- checker


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoryReport:
    """Whole-story verdicts and diversity of some texts, beside the sentence fractions."""

    story_level: float
    """n_valid / n_stories (0 if none): stories the grammar writes; a window's first one may
    be a suffix of a story, a last one that no separator closes a prefix."""
    n_stories: int
    """Non-empty pieces between "<|endoftext|>" separators, over all texts."""
    n_valid: int
    """Stories that pass (what story_level counts)."""
    n_complete: int
    """Stories that run whole from the introduction to the closing sentence."""
    sentence_level: float
    """jif.stories.check_text's `grammatical`: complete sentences a template writes, alone."""
    in_context: float
    """jif.stories.check_text's `score`: names and pronouns also agree with the story so far."""
    n_sentences: int
    """Complete sentences behind the two sentence fractions."""
    repeated_sentences: float
    """Share of complete sentences repeating an earlier one of their story (grammar: 0)."""
    distinct_stories: float
    """Distinct stories / stories (texts compared after whitespace normalisation)."""
    distinct_4grams: float
    """Distinct word 4-grams / word 4-grams over all texts together (distinct-4)."""
    invalid: tuple[str, ...] = ()
    """Up to 10 invalid stories, around the point ("<<") where the furthest reading stopped."""


_TEXT = Automaton(lambda texts: list(texts))


def _pieces(text: str) -> list[tuple[str, bool, bool]]:
    """(whitespace-normalised story, first piece, last piece without a separator after it)."""
    parts = [" ".join(part.split()) for part in text.split(EOT_TOKEN)]
    return [(p, i == 0, i == len(parts) - 1) for i, p in enumerate(parts) if p]


def check_stories(texts: Sequence[str], *, window: bool = False) -> StoryReport:
    """Parse whole stories of `texts` against the grammar ("<|endoftext|>" separates them).

    window: each text is a window of packed text (a training window, or a sample decoded
    after its BOS): its first piece may start anywhere inside a story. A last piece that no
    separator closes may stop anywhere the grammar can continue, with or without window.
    """
    if isinstance(texts, str):
        raise ValueError("check_stories takes a list of texts; wrap a single text as [text]")
    n_valid = n_complete = n_rep = n_sent = 0
    seen, invalid, grams = [], [], Counter()
    checks = [stories.check_text(t, window=window) for t in texts]
    for text in texts:
        words = text.replace(EOT_TOKEN, " ").split()
        grams.update(zip(words, words[1:], words[2:], words[3:], strict=False))
        for piece, first, last in _pieces(text):
            cut = window and first
            logw, reached = _TEXT.parse(piece, anywhere=cut, prefix=last)
            ok = logw > NEG_INF
            n_valid += ok
            if ok and (cut or last):
                ok = _TEXT.parse(piece, anywhere=False, prefix=False)[0] > NEG_INF
            n_complete += ok
            if logw == NEG_INF and len(invalid) < 10:
                invalid.append(f"{piece[max(0, reached - 80) : reached]} << {piece[reached:][:40]}")
            sentences = stories.split_sentences(piece)[0][1 if cut else 0 :]
            n_rep, n_sent = n_rep + len(sentences) - len(set(sentences)), n_sent + len(sentences)
            seen.append(piece)
    n_checked = sum(c.n_sentences for c in checks)
    return StoryReport(
        story_level=n_valid / len(seen) if seen else 0.0,
        n_stories=len(seen),
        n_valid=n_valid,
        n_complete=n_complete,
        sentence_level=sum(c.n_grammatical for c in checks) / n_checked if n_checked else 0.0,
        in_context=sum(c.n_valid for c in checks) / n_checked if n_checked else 0.0,
        n_sentences=n_checked,
        repeated_sentences=n_rep / n_sent if n_sent else 0.0,
        distinct_stories=len(set(seen)) / len(seen) if seen else 0.0,
        distinct_4grams=len(grams) / grams.total() if grams else 0.0,
        invalid=tuple(invalid),
    )


# ----------------------------------------------------------------------------- the floor


def token_automaton(tokenizer) -> Automaton:
    """The grammar over `tokenizer`'s ids (10 ms to build)."""
    return Automaton(lambda texts: [tuple(ids) for ids in tokenizer.encode_batch(texts)])


def window_logprob(automaton: Automaton, window: Sequence[int], eot_id: int, packing: str):
    """log q(window) for a row without its BOS, under the training windows of `packing`:
    pieces between eot separators are independent stories; in "pack" the first piece starts
    at a uniform token of the stream (see the module docstring), in "align" and "pad" at a
    story's first token; "pad" rows end with their story and eot padding."""
    if packing not in data_lib.PACKERS:
        raise ValueError(f"packing={packing!r}: use one of {list(data_lib.PACKERS)}")
    x = tuple(int(t) for t in window)
    cuts = [i for i, t in enumerate(x) if t == eot_id]
    bounds = [-1, *cuts, len(x)]
    pieces = [x[a + 1 : b] for a, b in itertools.pairwise(bounds)]
    if packing == "pack":
        if x[:1] == (eot_id,):  # a window never starts on a separator
            return NEG_INF
        bonus = math.log(2)  # a story's first token also takes the share of the eot before it
        lp = automaton.parse(pieces[0], anywhere=True, prefix=not cuts, start_bonus=bonus)[0]
        lp -= math.log(automaton.units_per_story + 1)  # 1 / E[tokens per story + 1] a token
    else:
        lp = automaton.parse(pieces[0], anywhere=False, prefix=not cuts)[0]
    if not cuts:
        return lp
    if packing == "pad":
        return lp if all(t == eot_id for t in x[cuts[0] :]) else NEG_INF
    for piece in pieces[1:-1]:
        lp += automaton.parse(piece, anywhere=False, prefix=False)[0]
    return lp + automaton.parse(pieces[-1], anywhere=False, prefix=True)[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Floor:
    """The validation NELBO a perfect model reaches on one validation set."""

    nats_per_token: float
    """Mean over the windows of -log q(row) / seq_len (per position, BOS included, as
    `val_nelbo` counts): the continuous-time NELBO of the true denoiser."""
    standard_error: float
    """Standard error of that mean (as an estimate of the floor of other windows)."""
    n_windows: int
    """Validation rows used (all of them)."""
    seq_len: int
    packing: str
    seed: int
    entropy_rate: float
    """Exact entropy rate of the packed stream, per token: the floor's long-window limit."""
    seconds: float


def floor(
    tokenizer, *, seq_len: int = 128, n_sequences: int = 64, seed: int = 0, packing: str = "pack"
) -> Floor:
    """The floor of `jif.data.validation_tokens("stories", tokenizer, seq_len=seq_len,
    n_sequences=n_sequences, seed=seed, packing=packing)`: the mean of -log q(row) / seq_len
    over its rows, q the distribution of training rows of the same packing, computed exactly
    for each row by summing the grammar over everything the row does not show (the start of
    its first story, the end of its last): 0.1 to 0.3 s for 64 rows of 128 on 2 cores."""
    t0 = time.perf_counter()
    rows = data_lib.validation_tokens(
        "stories", tokenizer, seq_len=seq_len, n_sequences=n_sequences, seed=seed, packing=packing
    )
    automaton = token_automaton(tokenizer)
    nats = []
    for i, row in enumerate(rows):
        lp = window_logprob(automaton, row[1:], tokenizer.eot_id, packing)
        if lp == NEG_INF:
            raise ValueError(
                f"validation row {i} has probability 0 under the grammar ({row.tolist()}): "
                "jif.floor no longer matches jif.stories or jif.data; update it to match"
            )
        nats.append(-lp / seq_len)
    nats = np.array(nats)
    se = float(nats.std(ddof=1) / math.sqrt(len(nats))) if len(nats) > 1 else math.nan
    return Floor(
        nats_per_token=float(nats.mean()),
        standard_error=se,
        n_windows=len(nats),
        seq_len=seq_len,
        packing=packing,
        seed=seed,
        entropy_rate=automaton.entropy_per_story / (automaton.units_per_story + 1),
        seconds=time.perf_counter() - t0,
    )
