"""Token batches from three kinds of source, all read through Hugging Face `datasets`.

    TokenBatches("stories", tok, batch_size=32, seq_len=128)      # embedded grammar (default)
    TokenBatches("tinystories", tok, batch_size=32, seq_len=128)  # roneneldan/TinyStories
    TokenBatches("stories.txt", tok, batch_size=32, seq_len=128)  # .txt/.jsonl/.json/.parquet

Sources
- "stories": `jif.stories` generated on the fly (`datasets.IterableDataset.from_generator`),
  one row per seeded block of stories; the splits are disjoint sets of texts.
- "tinystories": the hub's train/validation splits, streamed. Offline it fails at once
  with a message naming the offline alternatives (it never waits on network retries).
- a local file: .txt (documents separated by a line "<|endoftext|>", as in TinyStories'
  own text files; without such lines, blank-line-separated paragraphs), .jsonl/.json (a
  "text" field) or .parquet (a "text" column). A fixed fraction of the documents, chosen by
  a hash of their text (so independent of the seed and of file order), is held out as the
  validation split. Files are tokenised once, in bulk, and the tokens cached in memory.
  A text file must be UTF-8, and no document of any source may hold the literal mask token
  "<|mask|>" (`jif.data_files`): each is refused with a DataError naming the file and the fix.

`data_identity(data)` says what a source is (a file's path, size and sha256; the grammar's
hash; the hub name), for a run to store and compare on resume.

Sequences (int32 [batch_size, seq_len]) always start with eot_id, which serves as BOS.
- packing="pack" (default): documents are joined into one stream with an eot separator
  after each, and the stream is cut into windows of seq_len - 1 tokens behind the BOS (a
  window does not begin with a bare separator). No token is padding, so every position
  trains the model and a batch costs the same whatever the document lengths; a model that
  sees separators learns where stories end, and long documents are never truncated. MDLM's
  `wrap` option packs the same way. `jif.stories.entropy_nats_per_token` is the entropy
  rate of this stream (one eot per story); the floor of its validation windows, which start
  mid-story, is `jif.floor.floor`.
- packing="align": as "pack", but every row starts at a document's first token (the rest
  of a document that the previous row cut is skipped): rows open a story, as unprompted
  samples then do, at the cost of the skipped tokens.
- packing="pad": one document per row, BOS + its first seq_len - 1 tokens, padded with eot.
  Rows then hold whole stories from their start, at the cost of compute spent on padding.

Iteration is deterministic for a seed, and `state()` / `restore()` resume it exactly: the
state names a chunk (a block of generated stories, an epoch of a file's shuffled
documents, or the hub stream's own `state_dict()`) and the offset inside it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np
import tyro

from jif import hub, stories
from jif.data_files import (  # noqa: F401 (re-exported: jif.data is where callers look)
    FILE_READERS,
    VALIDATION_FRACTION,
    DataError,
    _existing_file,
    _file_digest,
    read_documents,
    refuse_mask_token,
)
from jif.tokenizer import load_tokenizer

HUB_DATASET = "roneneldan/TinyStories"
HUB_CHUNK_DOCS = 2048  # documents per chunk of the hub stream (resume granularity)
SPLITS = ("train", "validation")
OFFLINE_ALTERNATIVES = (
    "offline alternatives: --data stories (the embedded story grammar, no download) or "
    "--data PATH to a local .txt/.jsonl/.json/.parquet file "
    "(e.g. TinyStories-valid.txt downloaded from the hub dataset's page)"
)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A run of documents as one token stream (each document followed by eot)."""

    key: dict
    """JSON-serialisable: `Source.chunks(key)` starts again with this chunk."""
    tokens: np.ndarray
    """int32 [n_tokens]: doc_0 eot doc_1 eot ..."""
    starts: np.ndarray
    """int64 [n_docs + 1]: start of each document in `tokens` (last entry = len(tokens))."""


def _chunk(key: dict, docs: list[np.ndarray], eot_id: int) -> Chunk:
    """docs: int32 arrays, each already ending with eot_id."""
    if not docs:
        return Chunk(key, np.zeros(0, np.int32), np.zeros(1, np.int64))
    lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return Chunk(key, np.concatenate(docs).astype(np.int32), starts)


def _tokenize(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Texts -> int32 arrays with a trailing eot, tokenised in one parallel batch."""
    eot = tokenizer.eot_id
    return [np.array(ids + [eot], np.int32) for ids in tokenizer.encode_batch(texts) if ids]


# ----------------------------------------------------------------------------- sources


def _story_rows(seed: int, split: str, start_block: int):
    block = start_block
    while True:
        yield {"block": block, "texts": stories.story_block(seed, split, block)}
        block += 1


_STORY_FEATURES = datasets.Features(
    {"block": datasets.Value("int64"), "texts": datasets.Sequence(datasets.Value("string"))}
)


class StoriesSource:
    """The embedded grammar; chunk k = the `split` stories of seeded block k."""

    def __init__(self, tokenizer, *, split: str, seed: int):
        self.tokenizer, self.split, self.seed = tokenizer, split, seed

    def chunks(self, key: dict | None) -> Iterator[Chunk]:
        start = int(key["block"]) if key else 0
        ds = datasets.IterableDataset.from_generator(
            _story_rows,
            features=_STORY_FEATURES,
            gen_kwargs={"seed": self.seed, "split": self.split, "start_block": start},
        )
        for row in ds:
            yield _chunk(
                {"block": row["block"]},
                _tokenize(self.tokenizer, row["texts"]),
                self.tokenizer.eot_id,
            )


def _load_hub_stream(name: str, split: str) -> datasets.IterableDataset:
    """The hub dataset as a stream; fails fast (no retries) when the hub cannot be reached."""
    why_not = hub.unavailable(datasets=True)
    if why_not is not None:
        raise DataError(f"{name} needs the Hugging Face hub, but {why_not}; {OFFLINE_ALTERNATIVES}")
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise DataError(
            f"could not open {name} ({split}) on the hub: {e}; {OFFLINE_ALTERNATIVES}"
        ) from e


class HubSource:
    """A streamed hub dataset with a "text" column; chunk = HUB_CHUNK_DOCS documents."""

    def __init__(self, tokenizer, *, split: str, seed: int, name: str = HUB_DATASET):
        self.tokenizer, self.split, self.name = tokenizer, split, name
        self.stream = _load_hub_stream(name, split)  # opened now: fail at construction
        self._initial = copy.deepcopy(self.stream.state_dict())
        del seed  # the stream's own order is kept: a shuffle buffer would not resume exactly

    def chunks(self, key: dict | None) -> Iterator[Chunk]:
        epoch, state = (int(key["epoch"]), key["stream"]) if key else (0, None)
        while True:  # one pass over the stream per epoch; state None = start of the epoch
            self.stream.set_epoch(epoch)
            self.stream.load_state_dict(copy.deepcopy(self._initial if state is None else state))
            docs = []
            for row in self.stream:
                text = row.get("text")
                if isinstance(text, str) and text.strip():
                    docs.append(text.strip())
                if len(docs) == HUB_CHUNK_DOCS:
                    yield self._make({"epoch": epoch, "stream": state}, docs)
                    state, docs = copy.deepcopy(self.stream.state_dict()), []
            if docs:
                yield self._make({"epoch": epoch, "stream": state}, docs)
            elif state is None:
                raise DataError(f"{self.name} ({self.split}) has no non-empty 'text' rows")
            epoch, state = epoch + 1, None

    def _make(self, key: dict, docs: list[str]) -> Chunk:
        refuse_mask_token(docs, f"{self.name} ({self.split})", is_file=False)
        return _chunk(key, _tokenize(self.tokenizer, docs), self.tokenizer.eot_id)


@functools.lru_cache(maxsize=8)
def _file_tokens(
    path: str, mtime_ns: int, size: int, split: str, tokenizer
) -> tuple[np.ndarray, ...]:
    del mtime_ns, size  # cache keys only: a changed file is read again
    return tuple(_tokenize(tokenizer, read_documents(path, split)))


class FileSource:
    """A local file; chunk e = epoch e, the split's documents in a seeded random order."""

    def __init__(self, tokenizer, *, split: str, seed: int, path: str):
        p = _existing_file(path)
        st = p.stat()
        self.docs = _file_tokens(str(p.resolve()), st.st_mtime_ns, st.st_size, split, tokenizer)
        self.tokenizer, self.seed = tokenizer, seed

    def chunks(self, key: dict | None) -> Iterator[Chunk]:
        epoch = int(key["epoch"]) if key else 0
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
            yield _chunk({"epoch": epoch}, [self.docs[i] for i in perm], self.tokenizer.eot_id)
            epoch += 1


def open_source(data: str, tokenizer, *, split: str, seed: int):
    """ "stories", "tinystories" or a file path -> a source with `.chunks(key)`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if data in SOURCES:
        return SOURCES[data](tokenizer, split=split, seed=seed)
    open_source_check(data)
    return FileSource(tokenizer, split=split, seed=seed, path=data)


def open_source_check(data: str) -> None:
    """DataError unless `data` names a source or looks like a data file's path."""
    if data not in SOURCES and not (
        Path(data).suffix.lower() in FILE_READERS or Path(data).exists()
    ):
        raise DataError(
            f"unknown data source {data!r}: use {', '.join(map(repr, SOURCES))} or a path to "
            f"a {'/'.join(sorted(FILE_READERS))} file"
        )


SOURCES = {"stories": StoriesSource, "tinystories": HubSource}


def data_identity(data: str) -> dict:
    """What `data` is, as JSON to store with a run and compare on resume (equal dicts: same
    data). A file: {"source": "file", "path": absolute path, "size": bytes, "sha256": hex};
    "stories": {"source": "stories", "grammar": a hash of the grammar's tables and of the
    stories it generates for a fixed seed (the same for every training seed)};
    "tinystories": {"source": "hub", "name": the hub dataset}."""
    if data == "stories":
        blocks = [stories.story_block(0, split, 0) for split in SPLITS]  # the code, in effect
        text = json.dumps([stories.WORDS, blocks])
        return {"source": "stories", "grammar": hashlib.sha256(text.encode()).hexdigest()[:16]}
    if data == "tinystories":
        return {"source": "hub", "name": HUB_DATASET}
    open_source_check(data)
    path = _existing_file(data).resolve()
    st = path.stat()
    digest = _file_digest(str(path), st.st_mtime_ns, st.st_size)
    return {"source": "file", "path": str(path), "size": st.st_size, "sha256": digest}


# ----------------------------------------------------------------------------- batching


def _pack_row(it: TokenBatches) -> np.ndarray:
    """BOS + the next seq_len - 1 tokens of the stream (a leading separator is skipped)."""
    parts, need = [np.array([it.eot_id], np.int32)], it.seq_len - 1
    first = True
    while need:
        chunk = it._current()
        if first and chunk.tokens[it._offset] == it.eot_id:
            it._offset += 1
            continue
        first = False
        take = chunk.tokens[it._offset : it._offset + need]
        parts.append(take)
        it._offset += len(take)
        need -= len(take)
    return np.concatenate(parts)


def _pad_row(it: TokenBatches) -> np.ndarray:
    """BOS + the next document (without its separator) cut to seq_len - 1, eot-padded."""
    chunk = it._current()
    doc = chunk.tokens[chunk.starts[it._offset] : chunk.starts[it._offset + 1] - 1]
    it._offset += 1
    row = np.full(it.seq_len, it.eot_id, np.int32)
    row[1 : 1 + min(len(doc), it.seq_len - 1)] = doc[: it.seq_len - 1]
    return row


def _align_row(it: TokenBatches) -> np.ndarray:
    """BOS + the stream from the next document's start (the rest of a cut document is skipped)."""
    chunk = it._current()
    it._offset = int(chunk.starts[np.searchsorted(chunk.starts, it._offset)])  # may be the end
    return _pack_row(it)  # its first _current() moves on to the next chunk at the end


PACKERS: dict[str, Callable] = {"pack": _pack_row, "align": _align_row, "pad": _pad_row}


class TokenBatches:
    """Iterator of int32 [batch_size, seq_len] token batches, deterministic and resumable."""

    def __init__(
        self,
        data: str,
        tokenizer,
        *,
        split: str = "train",
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        packing: str = "pack",
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: need at least 2 (BOS + one token)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: need at least 1")
        if packing not in PACKERS:
            raise ValueError(f"packing={packing!r}: use one of {list(PACKERS)}")
        self.data, self.split, self.seed, self.packing = data, split, seed, packing
        self.batch_size, self.seq_len = batch_size, seq_len
        self.tokenizer, self.eot_id = tokenizer, tokenizer.eot_id
        self.source = open_source(data, tokenizer, split=split, seed=seed)
        self.sequences = 0  # rows served so far
        self._start(None, 0)

    def _start(self, key: dict | None, offset: int) -> None:
        self._chunks = self.source.chunks(key)
        self._chunk: Chunk | None = None
        self._key, self._offset = key, offset

    def _current(self) -> Chunk:
        """The chunk holding the next unit (token or document), loading chunks as needed."""
        if self._chunk is None:
            self._chunk = next(self._chunks)
        limit = self._limit()
        while self._offset >= limit:
            self._chunk, self._offset = next(self._chunks), 0
            limit = self._limit()
        self._key = self._chunk.key
        return self._chunk

    def _limit(self) -> int:
        """Offsets count tokens when packing and documents when padding."""
        return len(self._chunk.starts) - 1 if self.packing == "pad" else len(self._chunk.tokens)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> np.ndarray:
        packer = PACKERS[self.packing]
        batch = np.stack([packer(self) for _ in range(self.batch_size)])
        self.sequences += self.batch_size
        return batch

    def state(self) -> dict:
        """JSON-serialisable position; `restore` continues with exactly the next batch."""
        tok = self.tokenizer
        return {
            "data": self.data,
            "split": self.split,
            "seed": self.seed,
            "packing": self.packing,
            "n_bpe": tok.n_bpe,
            # a tokenizer other than the trimmed GPT-2 (n_bpe None) is named by its digest
            **({} if tok.n_bpe is not None else {"tokenizer": tok.digest}),
            "chunk": self._key,
            "offset": int(self._offset),
            "sequences": self.sequences,
        }

    def restore(self, state: dict) -> None:
        """Continue from a `state()` taken on an iterator over the same data."""
        mine = self.state()
        for field in ("data", "split", "seed", "packing", "n_bpe", "tokenizer"):
            if state.get(field) != mine.get(field):
                raise ValueError(
                    f"data state is for {field}={state.get(field)!r} but this iterator has "
                    f"{field}={mine.get(field)!r}; resume with the same data settings "
                    "(and the same tokenizer)"
                )
        self._start(state["chunk"], int(state["offset"]))
        self.sequences = int(state.get("sequences", 0))


def validation_tokens(
    data: str,
    tokenizer,
    *,
    seq_len: int,
    n_sequences: int,
    seed: int = 0,
    packing: str = "pack",
) -> np.ndarray:
    """A fixed int32 [n_sequences, seq_len] array from the validation split (same for a seed).

    A validation split smaller than n_sequences * seq_len tokens is cycled through again.
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences={n_sequences}: need at least 1")
    it = TokenBatches(
        data,
        tokenizer,
        split="validation",
        batch_size=n_sequences,
        seq_len=seq_len,
        seed=seed,
        packing=packing,
    )
    return next(it)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShowConfig:
    """Print decoded token batches of a data source (a look at what the model trains on)."""

    data: str = "stories"
    """"stories", "tinystories" or a .txt/.jsonl/.json/.parquet file."""
    split: str = "train"
    """"train" or "validation"."""
    batch_size: int = 2
    """Rows to print."""
    seq_len: int = 128
    """Tokens per row (the first is the eot BOS)."""
    seed: int = 0
    """Seed of the order."""
    packing: str = "pack"
    """"pack", "align" or "pad"."""
    n_bpe: int = 2048
    """Tokenizer size."""


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(ShowConfig, args=argv, description=ShowConfig.__doc__)
    tok = load_tokenizer(cfg.n_bpe)
    try:
        it = TokenBatches(
            cfg.data,
            tok,
            split=cfg.split,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            packing=cfg.packing,
        )
        batch = next(it)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in batch:
        print(f"{row.tolist()}\n{tok.decode(row)!r}\n")


if __name__ == "__main__":
    main()
