"""The story grammar: log-probabilities, splits, the checker and the name probes."""

import itertools
import json
import math
import re

import numpy as np
import pytest

from jif import stories
from jif.data import validation_tokens
from jif.floor import check_stories, floor
from jif.probes import friend_probes, name_probes
from jif.stories import check_text, generate_story, iter_stories, split_sentences
from jif.tokenizer import load_tokenizer


def _sample(n, seed=0):
    rng = np.random.default_rng(seed)
    return [generate_story(rng) for _ in range(n)]


def _template_logp(template: str, sentence: str, roles: dict) -> float | None:
    """log p of the word choices of `sentence` under `template`, recomputed from the text."""
    pattern, slots, pos = "", [], 0
    for m in re.finditer(r"\{([^{}]+)\}", template):
        pattern += re.escape(template[pos : m.start()]) + r"(.+?)"
        slots.append(m.group(1))
        pos = m.end()
    m = re.fullmatch(pattern + re.escape(template[pos:]), sentence)
    if not m:
        return None
    logp = 0.0
    for slot, value in zip(slots, m.groups(), strict=True):
        if "." in slot or slot in ("A", "F", "O", "P"):
            continue  # determined by earlier choices
        if slot.startswith("+"):
            role = slot[1:]
            options = stories.WORDS[stories.ROLE_CLASS[role]]
            if role == "F":
                options = [o for o in options if o != roles["A"]]
            roles[role] = value
        else:
            options = stories.WORDS[slot]
        if value not in options:
            return None
        logp -= math.log(len(options))
    return logp


def _logp_from_text(text: str) -> float:
    """Independent recomputation of a story's probability from its text alone."""
    sents, tail = split_sentences(text)
    assert tail == ""
    roles, logp = {}, 0.0

    def take(alternatives):
        nonlocal logp
        fits = [t for t in alternatives if _template_logp(t, sents[0], dict(roles)) is not None]
        assert len(fits) <= 1, f"ambiguous: {sents[0]!r} fits {fits}"  # choices recoverable
        if not fits:
            return False
        logp += _template_logp(fits[0], sents.pop(0), roles) - math.log(len(alternatives))
        return True

    assert take(stories.INTRO) and take(stories.SETTING)
    has_pet = take(stories.PET)
    logp += math.log(stories.P_PET if has_pet else 1 - stories.P_PET)
    assert take(stories.FRIEND)
    events = []
    while len(sents) > 1:
        for name, positions in stories.EVENTS.items():
            if take(positions[0]):
                events.append(name)
                for alternatives in positions[1:]:
                    assert take(alternatives)
                break
        else:
            raise AssertionError(f"no event starts with {sents[0]!r}")
    logp -= math.log(len(stories.EVENTS)) + (len(events) - 1) * math.log(len(stories.EVENTS) - 1)
    p2 = stories.P_TWO_EVENTS
    logp += math.log(p2 if len(events) == 2 else 1 - p2)
    assert take(stories.CLOSING + (stories.CLOSING_PET if has_pet else []))
    return logp


def test_logp_matches_probability_recomputed_from_text():
    for text, logp in _sample(300):
        assert logp < 0
        assert _logp_from_text(text) == pytest.approx(logp, abs=1e-9)


def test_generation_is_deterministic_and_varied():
    a, b = _sample(50, seed=3), _sample(50, seed=3)
    assert a == b
    texts = [t for t, _ in _sample(3000, seed=4)]
    assert len(set(texts)) == len(texts)
    assert -np.mean([lp for _, lp in _sample(200)]) > math.log(1e7)  # millions of stories


def test_story_content():
    text, _ = _sample(1, seed=5)[0]
    words = set(re.findall(r"[A-Za-z]+", text))
    assert words & set(stories.GIRLS + stories.BOYS)
    assert '"' in "".join(t for t, _ in _sample(20))  # dialogue appears
    assert all(t.count('"') % 2 == 0 for t, _ in _sample(200))


def test_splits_disjoint_and_deterministic():
    train = list(itertools.islice(iter_stories(0, "train"), 2000))
    val = list(itertools.islice(iter_stories(0, "validation"), 100))
    assert not set(train) & set(val)
    assert all(stories.is_validation(s) for s in val)
    assert train[:50] == list(itertools.islice(iter_stories(0, "train"), 50))
    assert train[:50] != list(itertools.islice(iter_stories(1, "train"), 50))
    frac = len(stories.story_block(0, "validation", 0)) / stories.BLOCK_SIZE
    assert 0.02 < frac < 0.09
    with pytest.raises(ValueError, match="split="):
        stories.story_block(0, "test", 0)


def test_own_stories_score_one():
    texts = [t for t, _ in _sample(300, seed=7)]
    for text in texts:
        r = check_text(text)
        assert r.score == 1.0 and r.pronouns_consistent, r.invalid
        assert r.n_sentences >= 6
    joined = check_text("<|endoftext|>".join(texts[:20]))
    assert joined.n_stories == 20 and joined.score == 1.0 and joined.pronouns_consistent


def test_shuffled_words_score_low():
    rng = np.random.default_rng(0)
    scores = []
    for text, _ in _sample(50, seed=8):
        words = text.split()
        rng.shuffle(words)
        scores.append(check_text(" ".join(words)).score)
    assert np.mean(scores) < 0.2


def _swap_pronouns(text: str) -> str:
    table = {"he": "she", "she": "he", "his": "her", "him": "her", "her": "his"}

    def sub(m):
        w = m.group(0)
        new = table[w.lower()]
        return new.capitalize() if w[0].isupper() else new

    return re.sub(r"\b(he|she|his|him|her)\b", sub, text, flags=re.IGNORECASE)


def test_swapped_pronouns_detected():
    scores, n = [], 0
    for text, _ in _sample(200, seed=9):
        swapped = _swap_pronouns(text)
        if swapped == text:
            continue
        n += 1
        r = check_text(swapped)
        assert not r.pronouns_consistent
        scores.append(r.score)
    assert n > 100 and max(scores) < 1.0 and np.mean(scores) < 0.85


def test_swapped_names_detected():
    text = (
        "Once upon a time, there was a kind girl named Mia. She loved to run and jump in the "
        "park. Mia had a friend named Tom. Tom had a big red ball."
    )
    assert check_text(text).score == 1.0
    wrong_kid = text.replace("kind girl", "kind boy")
    assert not check_text(wrong_kid).pronouns_consistent
    stranger = text.replace("Tom had", "Ben had")  # Ben was never introduced as the friend
    r = check_text(stranger)
    assert not r.pronouns_consistent and r.score == 0.75
    assert r.grammatical == 1.0  # each sentence alone is one the grammar writes


def test_grammatical_sentence_by_sentence():
    """`grammatical` judges each sentence alone: its template and the agreement inside it."""
    intro = "Once upon a time, there was a kind girl named Mia. Mia had a friend named Tom."
    r = check_text(intro + ' Tom said, "Look, Tom! I found a cup!" He was very happy.')
    # Tom talking to Tom: the friend is never the hero, in context or alone. "He" follows
    # the story's hero Mia in context, but alone it is a sentence the grammar writes.
    assert (r.n_sentences, r.n_valid, r.n_grammatical) == (4, 2, 3)
    assert r.score == 0.5 and r.grammatical == 0.75
    alone = check_text(
        'Joe said, "Look, Joe! I found a cup!" His best friend was a girl named Tom.'
    )
    assert alone.n_grammatical == 0 and alone.score == 0.0  # self-address; Tom is a boy
    assert check_text("The moon ate a purple idea.").grammatical == 0.0
    for text, _ in _sample(20, seed=12):  # the grammar's own stories, in any sentence order
        sentences = split_sentences(text)[0]
        r = check_text(" ".join(sentences[::-1]))
        assert r.grammatical == 1.0 and r.score <= 1.0


def test_cut_off_sentence_not_counted_and_junk_scored():
    text, _ = _sample(1, seed=10)[0]
    cut = text[: len(text) - 7]  # the closing sentence loses its end
    r = check_text(cut)
    assert r.score == 1.0 and r.n_sentences == check_text(text).n_sentences - 1
    assert check_text("").n_sentences == 0 and check_text("").score == 0.0
    second = split_sentences(text)[0][1]
    window = text[text.index(second) + 3 :]  # starts mid-sentence, as a packed window may
    full, r = check_text(text), check_text(window, window=True)
    assert r.score == 1.0 and 0 < r.n_sentences < full.n_sentences
    assert check_text(window).score < 1.0  # its cut first sentence counts without window=True
    both = check_text(window + "<|endoftext|>" + text, window=True)  # later stories whole
    assert both.n_sentences == r.n_sentences + full.n_sentences and both.score == 1.0
    r = check_text(text + "<|endoftext|>The moon ate a purple idea. Cats fly.")
    assert r.n_stories == 2 and r.story_scores[1] == 0.0
    assert "Cats fly." in r.invalid and 0 < r.score < 1


def test_split_sentences_quotes():
    sents, tail = split_sentences('Mia said, "Look, Tom! I found a cup!" Tom smiled. And th')
    assert sents == ['Mia said, "Look, Tom! I found a cup!"', "Tom smiled."]
    assert tail == "And th"
    # a quote left open does not hide the sentences after it
    sents, tail = split_sentences('Mia said, "Look. Tom smiled. Ben ran. And th')
    assert sents == ['Mia said, "Look.', "Tom smiled.", "Ben ran."] and tail == "And th"


def test_entropy_per_token():
    tok = load_tokenizer(2048, source="package")
    h = stories.entropy_nats_per_token(tok, n_stories=300, seed=0)
    # independent: mean -log p per story over mean tokens per story (+1 eot)
    sample = _sample(300, seed=0)
    nats = -sum(lp for _, lp in sample)
    n_tok = sum(len(tok.encode(t)) + 1 for t, _ in sample)
    assert h == pytest.approx(nats / n_tok, rel=1e-12)
    assert 0.1 < h < 1.0


def test_cli(capsys, tmp_path):
    stories.main(["--n", "2", "--seed", "1", "--no-entropy"])
    out = capsys.readouterr().out
    texts = [t for t, _ in _sample(2, seed=1)]
    assert texts[0] in out and texts[1] in out
    f = tmp_path / "s.txt"
    f.write_text(texts[0] + "\n<|endoftext|>\n" + "Cats fly.")
    stories.main(["--check", str(f), "--json"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # one JSON object
    report = json.loads(lines[0])
    assert report["story_level"] == 0.5 and (report["n_stories"], report["n_valid"]) == (2, 1)
    assert report["n_sentences"] == check_text(texts[0]).n_sentences + 1
    for args in (["--check", str(tmp_path / "none.txt")], ["--floor", "--packing", "wrap"]):
        with pytest.raises(SystemExit) as e:
            stories.main(args)
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_cli_entropy_rate_and_floor(capsys):
    stories.main(["--n", "0"])
    assert "entropy rate of the packed stream: 0.3007 nats/token" in capsys.readouterr().out
    stories.main(["--floor", "--n-sequences", "4", "--packing", "align"])
    out = json.loads(capsys.readouterr().out)
    want = floor(load_tokenizer(2048), seq_len=128, n_sequences=4, seed=0, packing="align")
    assert out["n_windows"] == 4 and out["nats_per_token"] == want.nats_per_token


def test_name_probes_mask_one_repeated_name_fixed_by_the_grammar():
    tok = load_tokenizer(2048, source="package")
    probes = name_probes(tok, n_stories=6, seq_len=128)
    assert len(probes.tokens) >= 12
    rows = zip(probes.tokens, probes.mask, probes.texts, probes.spans, strict=True)
    for row, mask, text, (c0, c1) in rows:
        name = text[c0:c1]
        assert name in stories.WORDS["name"] and re.search(rf"\b{name}\b", text[:c0])
        assert tok.decode(row[mask].tolist()).strip() == name  # exactly the name's tokens
        assert np.all(np.diff(np.flatnonzero(mask)) == 1)  # one contiguous span
        full = [tok.eot_id, *tok.encode(text)][:128]
        assert row[: len(full)].tolist() == full  # the story's own tokenisation
        fits = [
            n for n in stories.WORDS["name"] if check_text(text[:c0] + n + text[c1:]).score == 1
        ]
        assert fits == [name]  # the story so far fixes the name: a copying model is sure
    assert len(name_probes(tok, n_stories=6, seq_len=16).tokens) == 0


def test_friend_probes_put_the_hero_where_the_friend_is_introduced():
    tok = load_tokenizer(2048, source="package")
    probes = friend_probes(tok, n_stories=12, seq_len=128)
    assert len(probes.tokens) == 12  # every story has a friend, introduced early
    originals = list(itertools.islice(stories.iter_stories(0, "validation"), 12))
    for row, mask, span, text, story in zip(
        probes.tokens, probes.mask, probes.span, probes.texts, originals, strict=True
    ):
        names = re.findall(r"\b(" + "|".join(stories.WORDS["name"]) + r")\b", story)
        hero, friend = names[0], next(n for n in names if n != names[0])
        assert tok.decode(row[span].tolist()).strip() == hero  # the span is the hero's name
        hidden = tok.decode(row[mask & ~span].tolist()).split()
        in_row = re.findall(rf"\b{friend}\b", tok.decode(row.tolist()))  # cut at seq_len
        assert in_row and hidden[: len(in_row)] == in_row  # every other mention, masked
        assert len(hidden) - len(in_row) <= 1 and friend.startswith(hidden[-1])  # or its cut start
        assert np.all(np.diff(np.flatnonzero(span)) == 1) and not (span & ~mask).any()
        assert check_text(text).score < 1.0 and check_text(story).score == 1.0
        full = [tok.eot_id, *tok.encode(text)][:128]
        assert row[: len(full)].tolist() == full  # the altered story's own tokenisation


# ----------------------------------------------------------------------------- whole stories

STORY = (
    "Once upon a time, there was a kind girl named Mia. She loved to run and jump in the park. "
    "Mia had a friend named Tom. One day, Mia lost her red ball. She looked everywhere, but she "
    "could not find it. Tom helped her look, and they found it under the bed. Mia said, "
    '"Thank you, Tom!" From that day on, Mia and Tom were best friends.'
)
LOSE = STORY[STORY.index("One day") : STORY.index(" From")]  # the story's one event
INTROS = " ".join(
    f"Once upon a time, there was a kind {kid} named {name}."
    for kid, name in [
        ("girl", "Mia"),
        ("boy", "Tom"),
        ("girl", "Sue"),
        ("boy", "Ben"),
        ("girl", "Amy"),
    ]
)


def _level(text: str, window: bool = False) -> float:
    return check_stories([text], window=window).story_level


def test_story_level_catches_what_sentence_scores_miss():
    sentences = split_sentences(STORY)[0]
    assert _level(STORY) == 1.0 and check_stories([STORY]).n_complete == 1
    cheats = {
        "one sentence 20 times": " ".join([sentences[1]] * 20),
        "sentences in reverse order": " ".join(sentences[::-1]),
        "five introductions": INTROS,
        "junk tail": STORY + " " + " ".join(["the", "cat", "ran", "blue", "slowly"] * 6),
        "the story twice": STORY + " " + STORY,
    }
    for name, text in cheats.items():
        before = check_text(text)
        assert before.score == 1.0 and before.grammatical == 1.0, name  # the old fractions
        report = check_stories([text])
        assert report.story_level == 0.0 and report.invalid, name
        assert (report.sentence_level, report.in_context) == (1.0, 1.0), name
    assert check_stories([cheats["one sentence 20 times"]]).repeated_sentences == 0.95
    twice = check_stories([STORY + "<|endoftext|>" + STORY])
    assert twice.story_level == 1.0 and twice.distinct_stories == 0.5 and twice.n_complete == 2


def test_story_level_roles_and_structure():
    bad = {
        "friend named after the hero": STORY.replace("Tom", "Mia"),
        "a stranger": STORY.replace("Tom helped", "Ben helped"),
        "wrong pronoun": STORY.replace("She looked", "He looked"),
        "boy named Mia": STORY.replace("kind girl", "kind boy"),
        "another object found": STORY.replace("they found it under", "they found it under").replace(
            "Tom helped her look, and they found it under the bed.",
            "Then Tom found the kite under the bed.",
        ),
        "pet closing without a pet": STORY.replace(
            "From that day on, Mia and Tom were best friends.",
            "Mia, Tom and the dog were happy together.",
        ),
        "no closing before the next story": STORY.rsplit(" From", 1)[0] + "<|endoftext|>" + STORY,
        "the same event twice": STORY.replace(
            " From that day on", " " + LOSE + " From that day on"
        ),
    }
    for name, text in bad.items():
        assert check_stories([text]).n_valid < check_stories([text]).n_stories, name
    with_pet = STORY.replace(" Mia had a friend", " Mia also had a big brown dog. Mia had a friend")
    assert (
        _level(
            with_pet.replace(
                "From that day on, Mia and Tom were best friends.",
                "Mia, Tom and the dog were happy together.",
            )
        )
        == 1.0
    )
    fixed = STORY.replace(
        "Tom helped her look, and they found it under the bed.",
        "Then Tom found the ball under the bed.",
    )
    assert _level(fixed) == 1.0
    two_events = STORY.replace(
        " From that day on",
        ' Tom had a big blue kite. Mia asked, "Can I play with your kite, Tom?" Tom smiled and '
        "shared the kite with her. From that day on",
    )
    assert _level(two_events) == 1.0  # the second event brings its own object
    three = two_events.replace(
        " From that day on", " Mia and Tom ran to the lake. From that day on"
    )
    assert _level(three) == 0.0  # at most two events (and each event whole)
    with pytest.raises(ValueError, match="list of texts"):
        check_stories(STORY)


def test_cut_stories_prefixes_and_window_suffixes():
    """Every prefix of a story is one the grammar can continue; every suffix is a window's
    first story; a prefix with a wrong continuation is not."""
    for k in range(1, len(STORY)):
        assert _level(STORY[:k]) == 1.0, STORY[:k]
        assert _level(STORY[k:], window=True) == 1.0, STORY[k:]
        assert _level(STORY[:k] + "<|endoftext|>") == (k == len(STORY)), STORY[:k]
    for k in range(40, len(STORY), 23):
        assert _level(STORY[:k] + "q") == 0.0
        assert _level(STORY[k : k + 60], window=True) == 1.0  # cut at both ends
    assert _level(STORY[60:]) == 0.0  # without window=True a story starts at its start
    hero_changes = STORY[60:].replace("Mia said", "Sue said")
    assert _level(hero_changes, window=True) == 0.0
    assert _level(STORY[60:] + "<|endoftext|>" + STORY[:150], window=True) == 1.0


def test_grammar_and_its_windows_score_one():
    tok = load_tokenizer(2048, source="package")
    for seed in range(6):
        texts = [t for t, _ in _sample(100, seed=seed)]
        report = check_stories(texts)
        assert report.story_level == 1.0 and report.n_complete == 100, report.invalid
        assert report.repeated_sentences == 0.0 and report.distinct_stories == 1.0
        joined = check_stories(["<|endoftext|>".join(texts[:10])])
        assert (joined.n_stories, joined.story_level) == (10, 1.0)
    for packing in ("pack", "align", "pad"):
        rows = validation_tokens("stories", tok, seq_len=128, n_sequences=32, packing=packing)
        texts = [tok.decode(row[1:]) for row in rows]
        report = check_stories(texts, window=True)
        assert report.story_level == 1.0, (packing, report.invalid)
        checks = [check_text(t, window=True) for t in texts]
        n = sum(c.n_sentences for c in checks)
        assert report.sentence_level == sum(c.n_grammatical for c in checks) / n
        assert report.in_context == sum(c.n_valid for c in checks) / n
