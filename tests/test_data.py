"""Token batches: every source, packing, splits, determinism, resumption and errors."""

import hashlib
import itertools
import json
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from jif import data, stories
from jif.data import DataError, TokenBatches, validation_tokens
from jif.tokenizer import EOT_TOKEN, MASK_TOKEN, load_tokenizer

SHARED_TXT = Path(__file__).resolve().parents[2] / "shared/data/tinystories-valid-sample.txt"
needs_shared = pytest.mark.skipif(
    not SHARED_TXT.is_file(), reason=f"shared TinyStories slice not found at {SHARED_TXT}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(2048, source="package")


@pytest.fixture
def small_blocks(monkeypatch):
    """Small story blocks so that tests cross chunk boundaries quickly."""
    monkeypatch.setattr(stories, "BLOCK_SIZE", 40)


def _pieces(tok, batch):
    """Complete documents inside rows: text between two eot separators after the BOS."""
    out = []
    for row in batch:
        parts = tok.decode(row).split(EOT_TOKEN)  # parts[1] may start mid-document
        out += [p for p in parts[2:-1] if p]
    return out


def _reference_pack(doc_token_lists, eot, n_rows, seq_len):
    """Independent packing: one stream doc eot doc eot ..., rows = BOS + next seq_len-1."""
    stream = [t for ids in doc_token_lists for t in ids + [eot]]
    rows, pos = [], 0
    for _ in range(n_rows):
        if stream[pos] == eot:
            pos += 1
        rows.append([eot] + stream[pos : pos + seq_len - 1])
        pos += seq_len - 1
    return np.array(rows, np.int32)


def _reference_align(doc_token_lists, eot, n_rows, seq_len):
    """Independent aligned packing: each row = BOS + the stream from the next document's
    first token; the rest of the document a row cut is skipped."""
    stream, starts = [], []
    for ids in doc_token_lists:
        starts.append(len(stream))
        stream += ids + [eot]
    rows, pos = [], 0
    for _ in range(n_rows):
        pos = next(s for s in starts if s >= pos)
        rows.append([eot] + stream[pos : pos + seq_len - 1])
        pos += seq_len - 1
    return np.array(rows, np.int32)


def test_stories_batches_match_reference_packing(tok, small_blocks):
    it = TokenBatches("stories", tok, batch_size=4, seq_len=64, seed=3)
    got = np.concatenate([next(it) for _ in range(30)])  # crosses several blocks
    assert got.dtype == np.int32 and got.shape == (120, 64)
    docs = [tok.encode(s) for s in itertools.islice(stories.iter_stories(3, "train"), 200)]
    np.testing.assert_array_equal(got, _reference_pack(docs, tok.eot_id, 120, 64))
    assert (got[:, 0] == tok.eot_id).all() and got.max() < tok.mask_id


@pytest.mark.parametrize("seq_len", [64, 200])  # rows shorter and longer than a story
def test_stories_aligned_rows_start_at_documents(tok, small_blocks, seq_len):
    it = TokenBatches("stories", tok, batch_size=4, seq_len=seq_len, seed=3, packing="align")
    got = np.concatenate([next(it) for _ in range(30)])  # crosses several blocks
    docs = [tok.encode(s) for s in itertools.islice(stories.iter_stories(3, "train"), 400)]
    np.testing.assert_array_equal(got, _reference_align(docs, tok.eot_id, 120, seq_len))
    heads = {tuple(d[:8]) for d in docs}
    assert all(tuple(row[1:9]) in heads for row in got)  # every row opens a story


def test_stories_splits_disjoint_and_seeded(tok, small_blocks):
    train = next(TokenBatches("stories", tok, batch_size=16, seq_len=512))
    val = validation_tokens("stories", tok, seq_len=512, n_sequences=16)
    train_docs, val_docs = _pieces(tok, train), _pieces(tok, val)
    assert len(train_docs) > 5 and len(val_docs) > 5
    assert not any(stories.is_validation(d) for d in train_docs)
    assert all(stories.is_validation(d) for d in val_docs)
    assert all(stories.check_text(d).score == 1.0 for d in val_docs)
    np.testing.assert_array_equal(
        val, validation_tokens("stories", tok, seq_len=512, n_sequences=16)
    )
    other = next(TokenBatches("stories", tok, batch_size=16, seq_len=512, seed=1))
    assert not np.array_equal(train, other)


def _check_resume(make, n_before, n_after):
    a = make()
    states = []
    for _ in range(n_before):
        states.append(json.loads(json.dumps(a.state())))
        next(a)
    states.append(json.loads(json.dumps(a.state())))
    expected = [next(a) for _ in range(n_after)]
    for k in (0, n_before // 2, n_before):
        b = make()
        b.restore(states[k])
        replay = [next(b) for _ in range(n_before - k + n_after)][n_before - k :]
        for x, y in zip(expected, replay, strict=True):
            np.testing.assert_array_equal(x, y)
    a.restore(states[1])  # restoring the same iterator rewinds it
    np.testing.assert_array_equal(next(a), next(_advance(make(), 1)))


def _advance(it, n):
    for _ in range(n):
        next(it)
    return it


@pytest.mark.parametrize("packing", ["pack", "align", "pad"])
def test_stories_resume_exactly(tok, small_blocks, packing):
    make = lambda: TokenBatches("stories", tok, batch_size=3, seq_len=48, seed=5, packing=packing)
    _check_resume(make, n_before=25, n_after=10)


@needs_shared
def test_shared_txt_file(tok):
    text = SHARED_TXT.read_text()
    docs = {d.strip() for d in text.split("\n<|endoftext|>\n")}
    assert len(docs) == 1412
    train_docs = data.read_documents(SHARED_TXT, "train")
    val_docs = data.read_documents(SHARED_TXT, "validation")
    assert len(train_docs) + len(val_docs) == 1412
    assert set(train_docs) | set(val_docs) == docs and not set(train_docs) & set(val_docs)
    assert len(val_docs) == 71  # ceil(5% of 1412)
    it = TokenBatches(str(SHARED_TXT), tok, batch_size=8, seq_len=1024, seed=0)
    batches = [next(it) for _ in range(10)]
    pieces = _pieces(tok, np.concatenate(batches))
    assert len(pieces) > 20 and set(pieces) <= set(train_docs)
    val = validation_tokens(str(SHARED_TXT), tok, seq_len=1024, n_sequences=8)
    assert set(_pieces(tok, val)) <= set(val_docs)
    _check_resume(lambda: TokenBatches(str(SHARED_TXT), tok, batch_size=8, seq_len=128), 5, 5)


def _write_jsonl(path, texts, **extra):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i, **extra}) + "\n")


DOCS = [f"Story number {i}. {'A dog ran. ' * (i % 7)}The end." for i in range(60)]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "json", "txt"])
def test_local_files_pad_mode_rows_are_documents(tok, tmp_path, kind):
    path = tmp_path / f"docs.{kind}"
    if kind in ("jsonl", "json"):
        _write_jsonl(path, DOCS)
    elif kind == "parquet":
        datasets.Dataset.from_dict({"text": DOCS, "n": list(range(60))}).to_parquet(str(path))
    else:
        path.write_text("\n<|endoftext|>\n".join(DOCS) + "\n")
    train = data.read_documents(path, "train")
    assert len(train) == 57 and len(data.read_documents(path, "validation")) == 3
    seq_len = 24
    it = TokenBatches(str(path), tok, batch_size=57, seq_len=seq_len, seed=1, packing="pad")
    rows = next(it)
    expected = set()
    for d in train:
        ids = [tok.eot_id] + tok.encode(d)[: seq_len - 1]
        expected.add(tuple(ids + [tok.eot_id] * (seq_len - len(ids))))
    assert {tuple(r) for r in rows} == expected  # one epoch = every train document once
    again = next(
        TokenBatches(str(path), tok, batch_size=57, seq_len=seq_len, seed=1, packing="pad")
    )
    np.testing.assert_array_equal(rows, again)
    reshuffled = next(it)  # epoch 1: same documents, another order
    assert {tuple(r) for r in reshuffled} == expected and not np.array_equal(rows, reshuffled)


def test_file_pack_matches_reference(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, DOCS)
    train = data.read_documents(path, "train")
    perm = np.random.default_rng([7, 0]).permutation(len(train))
    docs = [tok.encode(train[i]) for i in perm]
    got = next(TokenBatches(str(path), tok, batch_size=10, seq_len=16, seed=7))
    np.testing.assert_array_equal(got, _reference_pack(docs, tok.eot_id, 10, 16))
    make = lambda: TokenBatches(str(path), tok, batch_size=4, seq_len=16, seed=7)
    _check_resume(make, n_before=30, n_after=10)  # ~1800 tokens: crosses an epoch (~1100)


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        TokenBatches(str(tmp_path / "missing.txt"), tok, batch_size=2, seq_len=8)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        TokenBatches(str(empty), tok, batch_size=2, seq_len=8)
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        TokenBatches(str(csv), tok, batch_size=2, seq_len=8)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"story": "a"}\n{"story": "b"}\n')
    with pytest.raises(DataError, match="no 'text' column.*story"):
        TokenBatches(str(no_text), tok, batch_size=2, seq_len=8)
    ints = tmp_path / "ints.jsonl"
    ints.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(DataError, match="not text"):
        TokenBatches(str(ints), tok, batch_size=2, seq_len=8)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not json\nnor this\n")
    with pytest.raises(DataError, match="could not be read as .jsonl"):
        TokenBatches(str(garbage), tok, batch_size=2, seq_len=8)
    one = tmp_path / "one.txt"
    one.write_text("Only one story.")
    with pytest.raises(DataError, match="need at least 2"):
        TokenBatches(str(one), tok, batch_size=2, seq_len=8)
    with pytest.raises(DataError, match="unknown data source 'storeys'"):
        TokenBatches("storeys", tok, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="seq_len=1"):
        TokenBatches("stories", tok, batch_size=2, seq_len=1)
    with pytest.raises(ValueError, match="packing='zip'"):
        TokenBatches("stories", tok, batch_size=2, seq_len=8, packing="zip")
    with pytest.raises(ValueError, match="split='test'"):
        TokenBatches("stories", tok, split="test", batch_size=2, seq_len=8)
    it = TokenBatches("stories", tok, batch_size=2, seq_len=8, seed=1)
    with pytest.raises(ValueError, match="seed=0"):
        it.restore(TokenBatches("stories", tok, batch_size=2, seq_len=8).state())


def test_tinystories_offline_fails_fast(tok, monkeypatch):
    t0 = time.monotonic()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set; .*--data stories"):
        TokenBatches("tinystories", tok, batch_size=2, seq_len=8)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE is set; .*--data stories"):
        TokenBatches("tinystories", tok, batch_size=2, seq_len=8)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DataError, match="not reachable.*--data stories.*--data PATH"):
        TokenBatches("tinystories", tok, batch_size=2, seq_len=8)
    assert time.monotonic() - t0 < 20  # the probe times out after 2 s; retries would take ~24 s


def test_hub_stream_path_resumes(tok, monkeypatch):
    """The tinystories code path, fed by a local stream instead of the hub."""
    texts = [f"Tiny story {i}. {'It was fun. ' * (i % 4)}" for i in range(23)]

    def fake_stream(name, split):
        assert (name, split) == ("roneneldan/TinyStories", "train")
        ds = datasets.Dataset.from_dict({"text": texts})
        return ds.to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(data, "_load_hub_stream", fake_stream)
    monkeypatch.setattr(data, "HUB_CHUNK_DOCS", 5)
    make = lambda: TokenBatches("tinystories", tok, batch_size=2, seq_len=20)
    first = next(make())
    docs = [tok.encode(t.strip()) for t in texts]
    np.testing.assert_array_equal(first, _reference_pack(docs, tok.eot_id, 2, 20))
    _check_resume(make, n_before=20, n_after=8)  # crosses chunks and the end of the stream


def test_file_tokens_cached(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, DOCS)
    TokenBatches(str(path), tok, batch_size=2, seq_len=8)
    hits = data._file_tokens.cache_info().hits
    validation_tokens(str(path), tok, seq_len=8, n_sequences=2)
    validation_tokens(str(path), tok, seq_len=8, n_sequences=2)
    assert data._file_tokens.cache_info().hits == hits + 1


def test_cli(capsys):
    data.main(["--batch-size", "1", "--seq-len", "16", "--seed", "2"])
    out = capsys.readouterr().out
    row = next(TokenBatches("stories", load_tokenizer(2048), batch_size=1, seq_len=16, seed=2))[0]
    assert str(row.tolist()) in out
    with pytest.raises(SystemExit) as e:
        data.main(["--data", "nowhere.txt"])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err


def test_mask_token_in_training_text_is_refused(tok, tmp_path, monkeypatch):
    # The literal token encodes to the mask id: a clean token the model can never predict.
    assert tok.mask_id in tok.encode(f"a {MASK_TOKEN} b")
    docs = [*DOCS[:2], f"Tom saw a {MASK_TOKEN} ball.", *DOCS[2:6]]
    txt, jsonl = tmp_path / "m.txt", tmp_path / "m.jsonl"
    txt.write_text("\n\n".join(docs))
    _write_jsonl(jsonl, docs)
    for path in (txt, jsonl):
        for split in ("train", "validation"):  # refused whichever split holds it
            with pytest.raises(DataError) as e:
                TokenBatches(str(path), tok, split=split, batch_size=2, seq_len=8)
            msg = str(e.value)
            assert msg.startswith(f"{path}: 1 document(s) contain the mask token '<|mask|>'")
            assert "document 3: 'Tom saw a <|mask|> ball.'" in msg and "Replace it" in msg
    fake = lambda name, split: datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()
    monkeypatch.setattr(data, "_load_hub_stream", fake)
    with pytest.raises(DataError, match=r"roneneldan/TinyStories \(train\): 1 document"):
        next(TokenBatches("tinystories", tok, batch_size=2, seq_len=8))


def test_text_that_is_not_utf8_is_named(tok, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("A dog.\n\nTom ate a caf\xe9 cake.\n".encode("latin-1"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    latin_jsonl = tmp_path / "latin.jsonl"
    latin_jsonl.write_bytes('{"text": "a"}\n{"text": "se\xf1or"}\n'.encode("latin-1"))
    # A character split by the reader's 1 MiB chunks is fine; a bad byte after it is found.
    edge = tmp_path / "edge.txt"
    edge.write_bytes(b"a" * ((1 << 20) - 1) + "\u00e9 ok\n\nmore\n".encode() + b"\xff")
    cases = [
        (latin, "byte 0xe9 at offset 21 (line 3)"),  # "A dog.\n\nTom ate a caf" is 21 bytes
        (binary, "byte 0x80 at offset 128 (line 2)"),  # 0x0a, a newline, is byte 10
        (latin_jsonl, "byte 0xf1 at offset 26 (line 2)"),
        (edge, f"byte 0xff at offset {(1 << 20) + 11} (line 4)"),  # 2^20 - 1 + 2 + 10
    ]
    for path, where in cases:
        with pytest.raises(DataError) as e:
            TokenBatches(str(path), tok, batch_size=2, seq_len=8)
        assert str(e.value).startswith(f"{path} is not UTF-8 text: {where}"), str(e.value)
        assert "iconv -f latin1 -t utf-8" in str(e.value)
    edge.write_bytes(b"a" * ((1 << 20) - 1) + "\u00e9 ok\n\nmore\n".encode())
    assert data.read_documents(edge, "train")[0].endswith("\u00e9 ok")


def test_data_identity(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, DOCS)
    want = {
        "source": "file",
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert data.data_identity(str(path)) == want
    monkeypatch.chdir(tmp_path)
    assert data.data_identity("d.jsonl") == want  # a relative path names the same file
    path.write_bytes(path.read_bytes().replace(b"Story number 7", b"Story number 8"))
    changed = data.data_identity(str(path))
    assert changed["size"] == want["size"] and changed["sha256"] != want["sha256"]

    grammar = data.data_identity("stories")
    assert grammar == data.data_identity("stories") and set(grammar) == {"source", "grammar"}
    monkeypatch.setitem(stories.WORDS, "colour", [*stories.WORDS["colour"], "teal"])
    assert data.data_identity("stories") != grammar  # a changed grammar is other data
    assert data.data_identity("tinystories") == {"source": "hub", "name": data.HUB_DATASET}
    assert json.loads(json.dumps(want)) == want  # stored as JSON in a run
    with pytest.raises(DataError, match="unknown data source 'storeys'"):
        data.data_identity("storeys")
    with pytest.raises(DataError, match="not found"):
        data.data_identity(str(tmp_path / "missing.txt"))
