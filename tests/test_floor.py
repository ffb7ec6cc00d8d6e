"""The grammar's automaton: exact window probabilities and the validation floor."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from jif import data, floor, stories
from jif.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(2048, source="package")


@pytest.fixture(scope="module")
def auto(tok):
    return floor.token_automaton(tok)


def _q(auto, tok, text_or_ids, packing):
    ids = tok.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    return math.exp(floor.window_logprob(auto, ids, tok.eot_id, packing))


def test_whole_stories_have_their_generator_probability(tok, auto):
    """Text and tokens of a story are the concatenation of its elements' units, and the sum
    over parses is the generator's own log p (choices are recoverable: one parse)."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        for _ in range(60):
            text, logp = stories.generate_story(rng)
            ids = tuple(tok.encode(text))
            assert auto.parse(ids, anywhere=False, prefix=False)[0] == pytest.approx(logp, abs=1e-9)
            assert floor._TEXT.parse(text, anywhere=False, prefix=False)[0] == pytest.approx(
                logp, abs=1e-9
            )
            assert auto.parse(ids[:-1], anywhere=False, prefix=False)[0] == -math.inf
            assert auto.parse(ids[:-1], anywhere=False, prefix=True)[0] >= logp - 1e-9


def test_exact_length_and_entropy_match_samples(tok, auto):
    rng = np.random.default_rng(11)
    sample = [stories.generate_story(rng) for _ in range(3000)]
    lengths = np.array([len(tok.encode(t)) for t, _ in sample])
    nats = -np.array([lp for _, lp in sample])
    se = lambda v: v.std() / math.sqrt(len(v))
    assert abs(auto.units_per_story - lengths.mean()) < 4 * se(lengths)
    assert abs(auto.entropy_per_story - nats.mean()) < 4 * se(nats)
    rate = auto.entropy_per_story / (auto.units_per_story + 1)
    assert rate == pytest.approx(stories.entropy_nats_per_token(tok, n_stories=3000), rel=0.01)


def test_known_windows(tok, auto):
    per_token = 1 / (auto.units_per_story + 1)
    n_names, n_place = len(stories.WORDS["name"]), len(stories.WORDS["place"])
    n_kadj, n_feel = len(stories.WORDS["kadj"]), len(stories.WORDS["feel"])
    # hero and friend named before the window: 1/32 and 1/31; FRIEND has 3 templates
    got = _q(auto, tok, " Mia had a friend named Tom.", "pack")
    assert got == pytest.approx(per_token / 3 / n_names / (n_names - 1), rel=1e-12)
    # "She": the hidden hero is a girl (1/2); the find event comes in a quarter of the stories
    p_find = 1 / 5 + 4 / 5 * stories.P_TWO_EVENTS / 4
    got = _q(auto, tok, " She was very happy.", "pack")
    assert got == pytest.approx(per_token * p_find / 2 / 2 / n_feel, rel=1e-12)
    got = _q(auto, tok, "Mia was a kind girl who loved the park.", "align")
    assert got == pytest.approx(1 / 4 / n_names / n_kadj / n_place, rel=1e-12)
    # the name comes after the window: P(the hero is a girl) = 1/2
    got = _q(auto, tok, "There once was a kind girl named", "align")
    assert got == pytest.approx(1 / 4 / n_kadj / 2, rel=1e-12)
    assert _q(auto, tok, "There once was a kind girl named Tom", "align") == 0.0
    assert _q(auto, tok, " Mia had a friend named Mia.", "pack") == 0.0
    assert _q(auto, tok, [tok.eot_id] + tok.encode("Once"), "pack") == 0.0  # never on a separator


def test_probabilities_sum_to_one_and_marginalise(tok, auto):
    """Over every next token, the probabilities of the longer windows add up to the shorter
    window's: q is a distribution over windows of every length."""
    vocab = range(tok.n_bpe + 1)
    for packing in ("pack", "align", "pad"):
        total = math.fsum(_q(auto, tok, [v], packing) for v in vocab)
        assert total == pytest.approx(1.0, abs=1e-12)
        rows = next(
            data.TokenBatches("stories", tok, batch_size=64, seq_len=10, seed=2, packing=packing)
        )
        with_eot = [r for r in rows if tok.eot_id in r[2:]][:1]
        for row in [rows[0], *with_eot]:
            w = list(row[1:])
            q = _q(auto, tok, w, packing)
            assert q > 0
            assert math.fsum(_q(auto, tok, w + [v], packing) for v in vocab) == pytest.approx(
                q, rel=1e-9
            )


def _assert_frequencies(auto, tok, windows: list[tuple], packing: str) -> None:
    """Counts of the most probable windows agree with q, and the observed windows' total q
    with the Good-Turing estimate of the mass seen (1 - singletons / N)."""
    n, counts = len(windows), Counter(windows)
    q = {w: math.exp(floor.window_logprob(auto, w, tok.eot_id, packing)) for w in counts}
    top = sorted(q, key=q.get, reverse=True)[:30]
    z = [(counts[w] - n * q[w]) / math.sqrt(n * q[w] * (1 - q[w])) for w in top]
    assert max(map(abs, z)) < 4.5, (packing, z)
    singletons = sum(c == 1 for c in counts.values())
    assert math.fsum(q.values()) == pytest.approx(1 - singletons / n, abs=0.01)


def test_pack_windows_follow_uniform_cuts(tok, auto):
    """Windows cut at uniform tokens of a long stream of stories (past an eot they would
    start on) have the frequencies q gives them."""
    texts = list(itertools.islice(stories.iter_stories(5, "train"), 2000))
    stream = np.concatenate([np.array([*ids, tok.eot_id]) for ids in tok.encode_batch(texts)])
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(stream) - 10, size=8000)
    starts += stream[starts] == tok.eot_id
    _assert_frequencies(auto, tok, [tuple(stream[s : s + 3].tolist()) for s in starts], "pack")


@pytest.mark.parametrize("packing", ["align", "pad"])
def test_aligned_rows_follow_q(tok, auto, packing):
    rows = next(
        data.TokenBatches("stories", tok, batch_size=4000, seq_len=7, seed=4, packing=packing)
    )
    _assert_frequencies(auto, tok, [tuple(r[1:].tolist()) for r in rows], packing)


def test_pad_rows_cost_their_story(tok, auto):
    rng = np.random.default_rng(8)
    for _ in range(50):
        text, logp = stories.generate_story(rng)
        ids = tok.encode(text)
        row = (ids + [tok.eot_id] * 200)[:127]
        got = floor.window_logprob(auto, row, tok.eot_id, "pad")
        if len(ids) < 127:
            assert got == pytest.approx(logp, abs=1e-9)
        else:  # a prefix of the story: its end is summed over
            assert got >= logp - 1e-9


def test_floor_of_the_validation_windows(tok, auto):
    rate = auto.entropy_per_story / (auto.units_per_story + 1)
    for packing in ("pack", "align"):
        f = floor.floor(tok, seq_len=128, n_sequences=16, seed=0, packing=packing)
        rows = data.validation_tokens("stories", tok, seq_len=128, n_sequences=16, packing=packing)
        nats = [-floor.window_logprob(auto, r[1:], tok.eot_id, packing) / 128 for r in rows]
        assert f.nats_per_token == pytest.approx(np.mean(nats), rel=1e-12)
        assert f.standard_error == pytest.approx(np.std(nats, ddof=1) / 4, rel=1e-9)
        assert (f.n_windows, f.seq_len, f.packing) == (16, 128, packing)
        assert f.entropy_rate == pytest.approx(rate, rel=1e-12)
        assert f.nats_per_token > rate  # windows pay for what their cut start hides
    with pytest.raises(ValueError, match="packing="):
        floor.window_logprob(auto, [1, 2], tok.eot_id, "wrap")
