"""Embedded TinyStories-style corpus: a seeded probabilistic grammar and its checker.

A story is a main character (A), sometimes a pet (P), a friend (F), one or two events
(find, lose, share, help, play) about an object (O) with a size and a colour, a line or two
of quoted dialogue and a closing line:

    Once upon a time, there was a kind girl named Mia. She loved to run and jump in the
    park. Mia had a friend named Tom. One day, Mia lost her red ball. She looked
    everywhere, but she could not find it. Tom helped her look, and they found it under
    the bed. Mia said, "Thank you, Tom!" From that day on, Mia and Tom were best friends.

Every sentence comes from a template whose slots are filled by uniform choices;
`generate_story` returns the text and the log-probability of all choices made. Choices are
recoverable from the text (distinct options give distinct text), so the mean of -log p per
token is the entropy rate of the packed stream of stories, each followed by an eot
(`entropy_nats_per_token`). That is the limit for long windows; the loss floor of the
validation windows, which start and stop mid-story, is higher: `jif.floor.floor`.

Slot syntax: `{+R}` introduces role R (A, F: a name; O: an object; P: an animal),
`{R}` repeats it, `{R.sub}` / `{R.obj}` / `{R.pos}` / `{R.kid}` are the pronoun / "girl",
"boy" agreeing with R's name (capitalised form: `{R.Sub}`), `{word_class}` is one word of
`WORDS[word_class]`. The same templates compile to regular expressions for `check_text`,
which scores any text by the fraction of its sentences the grammar can produce: sentence by
sentence (`grammatical`), and in context, with names and pronouns that agree with the story
so far (`score`). Whole stories are parsed by `jif.floor.check_stories` (`--check`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tyro

from jif.tokenizer import load_tokenizer

GIRLS = "Lily Mia Anna Sue Amy Lucy Emma Kate Jane Rose Sara Zoe Ella Lisa Mary Ann".split()
BOYS = "Tom Ben Sam Max Tim Jack Leo Bob Dan Joe Jim Ned Paul Mark Luke Adam".split()
GENDER = {**{n: "f" for n in GIRLS}, **{n: "m" for n in BOYS}}
FORMS = {
    "f": {"sub": "she", "obj": "her", "pos": "her", "kid": "girl"},
    "m": {"sub": "he", "obj": "him", "pos": "his", "kid": "boy"},
}
# Nouns and words that can follow "a" directly start with a consonant sound.
WORDS = {
    "name": GIRLS + BOYS,
    "object": "ball kite box hat book toy car doll cup boat drum shoe bag truck ring key shell "
    "rock stick flower leaf coin star sock spoon".split(),
    "animal": "dog cat bird frog duck fish bunny puppy kitten horse cow pig bear fox mouse "
    "turtle lamb goat".split(),
    "colour": "red blue green yellow pink purple brown white black orange".split(),
    "size": "big small little tiny huge".split(),
    "place": "park garden forest beach yard farm school river hill lake town field woods "
    "pond".split(),
    "thing": "tree bed table bush chair fence bench car door".split(),
    "prep": ["under", "behind", "near", "next to"],
    "kadj": "little kind happy brave curious shy friendly funny smart".split(),
    "feel": "happy surprised excited glad".split(),
    "game": "tag catch ball".split(),
    "lesson": "share|help friends|be kind|look carefully|say thank you".split("|"),
}
ROLE_CLASS = {"A": "name", "F": "name", "O": "object", "P": "animal"}

# One entry per sentence position; each is a list of alternative templates (uniform).
INTRO = [
    "Once upon a time, there was a {kadj} {A.kid} named {+A}.",
    "Once upon a time, a {kadj} {A.kid} named {+A} lived near the {place}.",
    "There once was a {kadj} {A.kid} named {+A}.",
    "{+A} was a {kadj} {A.kid} who loved the {place}.",
]
SETTING = [
    "{A.Sub} lived in a {size} house near the {place}.",
    "Every day, {A.sub} liked to play in the {place}.",
    "{A.Sub} loved to run and jump in the {place}.",
    "{A.Pos} favorite color was {colour}.",
]
FRIEND = [
    "{A} had a friend named {+F}.",
    "{A.Pos} best friend was a {F.kid} named {+F}.",
    "One day, {A} met a {kadj} {F.kid} named {+F}.",
]
PET = [
    "{A} also had a {size} {colour} {+P}.",
    "{A.Sub} had a pet {+P} too.",
]
EVENTS = {
    "find": [
        ["One day, {A} found a {size} {colour} {+O} {prep} the {thing}."],
        ["{A.Sub} was very {feel}.", "{A.Sub} ran to show it to {F}."],
        ['{A} said, "Look, {F}! I found a {O}!"', '{F} said, "Wow, what a nice {O}!"'],
    ],
    "lose": [
        ["One day, {A} lost {A.pos} {colour} {+O}.", "{A} could not find {A.pos} {colour} {+O}."],
        ["{A.Sub} looked everywhere, but {A.sub} could not find it."],
        [
            "{F} helped {A.obj} look, and they found it {prep} the {thing}.",
            "Then {F} found the {O} {prep} the {thing}.",
        ],
        ['{A} said, "Thank you, {F}!"', '{A} hugged {F} and said, "You are the best!"'],
    ],
    "share": [
        ["{F} had a {size} {colour} {+O}.", "{F} got a new {colour} {+O}."],
        ['{A} asked, "Can I play with your {O}, {F}?"', '{A} said, "I like your {O}, {F}."'],
        ["{F} smiled and shared the {O} with {A.obj}.", '{F} said, "Yes, we can share it!"'],
    ],
    "help": [
        ["{F} was sad because {F.pos} {+O} was stuck in the {thing}."],
        ["{A} wanted to help {F.obj}.", "{A} saw {F} and came to help."],
        ["{A.Sub} reached up and got the {O} for {F.obj}.", "{A.Sub} pulled out the {O}."],
        ['{F} said, "Thank you, {A}! You are a good friend."', "{F} was very {feel}."],
    ],
    "play": [
        ["{A} and {F} went to the {place} to play.", "{A} and {F} ran to the {place}."],
        [
            "They played with a {size} {colour} {+O} all day.",
            "They played {game} until the sun went down.",
            "They saw a {size} {animal} and played with it all day.",
        ],
        ['{A} said, "This is so much fun, {F}!"', '{F} laughed and said, "Let us play again!"'],
    ],
}
CLOSING = [
    "From that day on, {A} and {F} were best friends.",
    "{A} went home with a big smile.",
    "{A} and {F} played together every day after that.",
    "{A} learned that it is good to {lesson}.",
]
CLOSING_PET = ["{A}, {F} and the {P} were happy together."]
P_PET = 0.5  # probability of a pet sentence
P_TWO_EVENTS = 0.25  # probability of two events (else one): keeps most stories < 128 tokens
VALIDATION_PERCENT = 5  # stories whose text hash falls in this bucket form the validation split
BLOCK_SIZE = 256  # stories generated per seeded block (iteration resumes at block granularity)

_SLOT = re.compile(r"\{([^{}]+)\}")


class _Chooser:
    """Uniform choices from a numpy Generator, accumulating their log-probability."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.buf, self.i, self.logp = rng, rng.random(64), 0, 0.0

    def _uniform(self) -> float:
        """The next U(0, 1) draw (drawn 64 at a time: one numpy call per 64 choices)."""
        if self.i == len(self.buf):
            self.buf, self.i = self.rng.random(64), 0
        u, self.i = self.buf[self.i], self.i + 1
        return u

    def index(self, n: int) -> int:
        u = self._uniform()
        self.logp -= math.log(n)
        return min(int(u * n), n - 1)

    def pick(self, options: list):
        return options[self.index(len(options))]

    def coin(self, p: float) -> bool:
        u = self._uniform()
        self.logp += math.log(p if u < p else 1.0 - p)
        return bool(u < p)


def _render(template: str, roles: dict, ch: _Chooser) -> str:
    """Fill one template; introduces new roles into `roles` (chosen before the rest)."""
    for slot in _SLOT.findall(template):
        if slot.startswith("+"):
            role = slot[1:]
            options = WORDS[ROLE_CLASS[role]]
            if role == "F":  # the friend is never the main character
                options = [n for n in options if n != roles["A"]]
            roles[role] = ch.pick(options)

    def fill(m: re.Match) -> str:
        slot = m.group(1).lstrip("+")
        if "." in slot:
            role, form = slot.split(".")
            word = FORMS[GENDER[roles[role]]][form.lower()]
            return word.capitalize() if form[0].isupper() else word
        if slot in ROLE_CLASS:
            return roles[slot]
        return ch.pick(WORDS[slot])

    return _SLOT.sub(fill, template)


def generate_story(rng: np.random.Generator) -> tuple[str, float]:
    """One story and the log-probability (nats, <= 0) of the choices that made it."""
    ch, roles = _Chooser(rng), {}
    sentences = [_render(ch.pick(INTRO), roles, ch), _render(ch.pick(SETTING), roles, ch)]
    if ch.coin(P_PET):
        sentences.append(_render(ch.pick(PET), roles, ch))
    sentences.append(_render(ch.pick(FRIEND), roles, ch))
    names = list(EVENTS)
    first = ch.pick(names)
    events = [first]
    if ch.coin(P_TWO_EVENTS):
        events.append(ch.pick([e for e in names if e != first]))
    for event in events:
        for position in EVENTS[event]:
            sentences.append(_render(ch.pick(position), roles, ch))
    closings = CLOSING + (CLOSING_PET if "P" in roles else [])
    sentences.append(_render(ch.pick(closings), roles, ch))
    return " ".join(sentences), ch.logp


def text_hash(text: str) -> int:
    """A stable 64-bit hash of a text (blake2b): splits documents into train and validation
    by their text alone, whatever the seed or the order they come in."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def is_validation(text: str) -> bool:
    """The split a story belongs to, from a hash of its text (so the splits never overlap)."""
    return text_hash(text) % 100 < VALIDATION_PERCENT


def story_block(seed: int, split: str, block: int) -> list[str]:
    """The stories of one seeded block of `BLOCK_SIZE` draws that belong to `split`."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}: use 'train' or 'validation'")
    rng = np.random.default_rng([seed, block])
    want_val = split == "validation"
    stories = (generate_story(rng)[0] for _ in range(BLOCK_SIZE))
    return [s for s in stories if is_validation(s) == want_val]


def iter_stories(seed: int, split: str, start_block: int = 0) -> Iterator[str]:
    """Infinite stream of stories; "train" and "validation" are disjoint sets of texts."""
    block = start_block
    while True:
        yield from story_block(seed, split, block)
        block += 1


def entropy_nats_per_token(tokenizer, n_stories: int = 2000, seed: int = 0) -> float:
    """Entropy rate of the packed stream, estimated from n_stories: sum of -log p / tokens,
    one eot separator per story (`jif.floor` computes it exactly)."""
    rng = np.random.default_rng(seed)
    texts, nats = [], 0.0
    for _ in range(n_stories):
        text, logp = generate_story(rng)
        texts.append(text)
        nats -= logp
    n_tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
    return nats / n_tokens


# ----------------------------------------------------------------------------- checker


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckResult:
    """How well a text fits the grammar."""

    score: float
    """Fraction of complete sentences the grammar can produce in their context (0 if none)."""
    pronouns_consistent: bool
    """No sentence names a character inconsistently or uses a pronoun that disagrees."""
    n_sentences: int
    """Complete sentences scored (an unfinished last sentence is left out)."""
    n_valid: int
    """Sentences the grammar can produce in their context (what `score` counts)."""
    n_grammatical: int = 0
    """Sentences the grammar can produce in some story: a template's words, with the names,
    pronouns and "girl" / "boy" inside the sentence agreeing, whatever came before."""
    n_stories: int
    """Non-empty pieces of the text between "<|endoftext|>" separators."""
    story_scores: tuple[float, ...] = ()
    """Score of each story."""
    grammatical: float = 0.0
    """n_grammatical / n_sentences: sentence by sentence, ignoring the story (>= score)."""
    invalid: tuple[str, ...] = ()
    """Up to 20 sentences the grammar cannot produce (for display)."""


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _compile(template: str) -> tuple[re.Pattern, list[str]]:
    """Template -> (regex with one group per slot, slot of each group)."""
    parts, slots, pos = [], [], 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        slot = m.group(1)
        bare = slot.lstrip("+")
        if "." in bare:
            role, form = bare.split(".")
            words = [FORMS[g][form.lower()] for g in FORMS]
            words = [w.capitalize() for w in words] if form[0].isupper() else words
        else:
            words = WORDS[ROLE_CLASS.get(bare, bare)]
        parts.append(f"({_alternation(words)})")
        slots.append(slot)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), slots


def _all_templates() -> list[str]:
    out = INTRO + SETTING + FRIEND + PET + CLOSING + CLOSING_PET
    for positions in EVENTS.values():
        for alternatives in positions:
            out += alternatives
    return out


_COMPILED = [_compile(t) for t in _all_templates()]
NAME = re.compile(r"\b(" + _alternation(WORDS["name"]) + r")\b")  # group 1: a grammar name


def split_sentences(text: str, quotes: bool = True) -> tuple[list[str], str]:
    """Whitespace-normalised text -> (complete sentences, unfinished tail).

    A sentence ends at ".", "!" or "?" outside quotes, or at a closing quote right after one.
    A quote left open does not swallow the rest: the tail is then split ignoring quotes.
    """
    text = " ".join(text.split())
    sentences, start, in_quote = [], 0, False
    for i, c in enumerate(text):
        after = text[i + 1] if i + 1 < len(text) else " "
        if c == '"':
            in_quote = quotes and not in_quote
            ends = not in_quote and i > 0 and text[i - 1] in ".!?" and after == " "
        else:
            ends = c in ".!?" and not in_quote and after == " "
        if ends:
            sentences.append(text[start : i + 1].strip())
            start = i + 1
    tail = text[start:].strip()
    if in_quote and quotes and tail:
        more, tail = split_sentences(tail, quotes=False)
        sentences += more
    return [s for s in sentences if s], tail


def _check_roles(slots: list[str], values: tuple, roles: dict) -> tuple[bool, dict]:
    """Do the slot values agree with the story's roles? Returns (ok, updated roles)."""
    new = dict(roles)
    ok = True
    for slot, value in zip(slots, values, strict=True):  # introductions first
        if slot.startswith("+"):
            if slot == "+A":
                new = {}
            new[slot[1:]] = value
    for slot, value in zip(slots, values, strict=True):  # repeated names
        if slot in ROLE_CLASS:
            if slot not in new:
                new[slot] = value  # text that starts mid-story: learn the role
            elif new[slot] != value:
                ok = False
    if "F" in new and new.get("A") == new["F"]:  # the friend is never the main character
        ok = False
    for slot, value in zip(slots, values, strict=True):  # pronouns and girl/boy
        bare = slot.lstrip("+")
        if "." in bare:
            role, form = bare.split(".")
            if role in new:
                want = FORMS[GENDER[new[role]]][form.lower()]
                ok &= value.lower() == want
    return ok, new


def _check_story(text: str, skip_first: bool = False) -> tuple[int, int, int, bool, list[str]]:
    """(n_sentences, n_valid, n_grammatical, consistent, invalid sentences) for one story."""
    sentences, _tail = split_sentences(text)
    sentences = sentences[1:] if skip_first else sentences
    roles: dict = {}
    n_valid, n_grammatical, consistent, invalid = 0, 0, True, []
    for sentence in sentences:
        matches = [(slots, m.groups()) for rx, slots in _COMPILED if (m := rx.fullmatch(sentence))]
        n_grammatical += any(_check_roles(slots, values, {})[0] for slots, values in matches)
        best = None
        for slots, values in matches:
            ok, new = _check_roles(slots, values, roles)
            if ok:
                best = (True, new)
                break
            best = best or (False, new)
        if best is None:
            invalid.append(sentence)
            continue
        ok, roles = best
        n_valid += ok
        consistent &= ok
        if not ok:
            invalid.append(sentence)
    return len(sentences), n_valid, n_grammatical, consistent, invalid


def check_text(text: str, *, window: bool = False) -> CheckResult:
    """Score any text against the grammar, story by story ("<|endoftext|>" separates).

    window: the text is a window of packed text (what a model trained on packed windows
    samples without a prompt): it may start mid-sentence, so the first sentence before the
    first separator is left out, as the unfinished last sentence always is.
    """
    pieces = text.split("<|endoftext|>")
    stories = [(i, s) for i, s in enumerate(pieces) if s.strip()]
    n_sent = n_valid = n_gram = 0
    consistent, scores, invalid = True, [], []
    for i, story in stories:
        n, v, g, c, bad = _check_story(story, skip_first=window and i == 0)
        n_sent, n_valid, n_gram, consistent = n_sent + n, n_valid + v, n_gram + g, consistent and c
        scores.append(v / n if n else 0.0)
        invalid += bad
    return CheckResult(
        score=n_valid / n_sent if n_sent else 0.0,
        pronouns_consistent=consistent,
        n_sentences=n_sent,
        n_valid=n_valid,
        n_grammatical=n_gram,
        n_stories=len(stories),
        story_scores=tuple(scores),
        grammatical=n_gram / n_sent if n_sent else 0.0,
        invalid=tuple(invalid[:20]),
    )


# ----------------------------------------------------------------------------- CLI


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoriesConfig:
    """Print stories of the embedded grammar and its entropy rate, the checker's verdict on a
    file, or the loss floor of the validation windows."""

    n: int = 3
    """Stories to print."""
    seed: int = 0
    """Seed of the generator (and of the validation windows of --floor)."""
    n_bpe: int = 2048
    """Tokenizer size for the entropy rate and the floor (GPT-2 BPE ids kept)."""
    entropy: bool = True
    """Print the packed stream's entropy rate (exact, jif.floor)."""
    check: str | None = None
    """A text file to check instead (stories separated by "<|endoftext|>")."""
    window: bool = False
    """With --check: the file is one window of packed text, its first story cut at the start."""
    json: bool = False
    """With --check: one JSON object on one line (jif.floor.StoryReport), not indented."""
    floor: bool = False
    """Print the floor of the validation windows instead (jif.floor.floor, as JSON)."""
    seq_len: int = 128
    """With --floor: tokens per validation row (BOS included)."""
    n_sequences: int = 64
    """With --floor: validation rows."""
    packing: str = "pack"
    """With --floor: "pack", "align" or "pad"."""


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(StoriesConfig, args=argv, description=StoriesConfig.__doc__)
    from jif import floor  # import cycle: jif.floor builds its automaton from this grammar

    try:
        if cfg.check:
            if not Path(cfg.check).is_file():
                raise ValueError(
                    f"--check {cfg.check!r} is not a file; give a text file of stories"
                )
            text = Path(cfg.check).read_text(encoding="utf-8")
            report = floor.check_stories([text], window=cfg.window)
            print(json.dumps(dataclasses.asdict(report), indent=None if cfg.json else 1))
            return
        tok = load_tokenizer(cfg.n_bpe)
        if cfg.floor:
            kw = dict(seq_len=cfg.seq_len, n_sequences=cfg.n_sequences, packing=cfg.packing)
            print(json.dumps(dataclasses.asdict(floor.floor(tok, seed=cfg.seed, **kw))))
            return
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.n):
        text, logp = generate_story(rng)
        print(f"[log p = {logp:.2f} nats]\n{text}\n")
    if cfg.entropy:
        auto = floor.token_automaton(tok)
        rate = auto.entropy_per_story / (auto.units_per_story + 1)
        print(
            f"entropy rate of the packed stream: {rate:.4f} nats/token with n_bpe={cfg.n_bpe} "
            "(the long-window limit; the validation windows' floor is higher: --floor)"
        )


if __name__ == "__main__":
    main()
