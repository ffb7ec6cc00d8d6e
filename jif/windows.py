"""Evaluation windows from any text source, and the UTF-8 bytes their tokens stand for.

    rows, identity = eval_windows("notes.txt", tok, split="all", seq_len=128, n_sequences=1024,
                                  seed=0, packing="pack")
    n_bytes = token_bytes(tok)[rows].sum()

Windows are jif.data's rows (BOS + the packed stream, the same windows jif.train validates on
for the same seed): from a stream ("stories", "tinystories") the first n_sequences; from a
file only its distinct windows (one pass over the split's documents, never cycled), so that
every window counts once in an interval. Files are checked before they are read: missing,
empty, not UTF-8, or holding the mask token's text give a ValueError naming the fix.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from jif import data as data_lib
from jif.tokenizer import MASK_TOKEN


@functools.lru_cache(maxsize=4)
def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, int64 [vocab_size] (`Tokenizer.token_bytes`,
    computed once per tokenizer)."""
    return tokenizer.token_bytes()


def check_text_file(path: str) -> str:
    """ValueError for a file that is missing, empty, not UTF-8 or holds the mask token's text
    (which the tokenizer reserves); the file's sha256 otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {path!r} not found; give an existing file, or --data stories")
    raw = p.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path} is empty: give a file with text in it")
    if p.suffix.lower() in (".txt", ".json", ".jsonl"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(
                f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                f"(line {line}) does not decode; convert it first, e.g. "
                f"`iconv -f latin1 -t utf-8 {path} > {p.stem}-utf8{p.suffix}`"
            ) from None
        if MASK_TOKEN in text:
            line = text[: text.index(MASK_TOKEN)].count("\n") + 1
            raise ValueError(
                f"{path} line {line} contains {MASK_TOKEN!r}, the text of the diffusion mask "
                "token, which the tokenizer cannot represent as text: remove or rewrite it"
            )
    return hashlib.sha256(raw).hexdigest()


def _split_windows(data, tokenizer, *, split, seq_len, limit, seed, packing) -> list:
    """Every distinct window of a file's split (its first epoch), at most `limit`."""
    it = data_lib.TokenBatches(
        data, tokenizer, split=split, batch_size=1, seq_len=seq_len, seed=seed, packing=packing
    )
    rows = []
    while len(rows) < limit:
        row = next(it)[0]
        if it.state()["chunk"]["epoch"] != 0:  # the split is used up: it would repeat
            break
        rows.append(row)
    return rows


def eval_windows(
    data: str, tokenizer, *, split: str, seq_len: int, n_sequences: int, seed: int, packing: str
) -> tuple[np.ndarray, dict]:
    """(windows int32 [N, seq_len], identity of the data): N = n_sequences windows from a
    stream (stories, tinystories) or up to n_sequences distinct windows of a file's split."""
    identity = {"data": data, "split": split, "seq_len": seq_len, "packing": packing, "seed": seed}
    args = dict(seq_len=seq_len, seed=seed, packing=packing)
    if data in data_lib.SOURCES:
        if split == "all":
            raise ValueError(
                f"--split all reads a whole file; {data!r} is a stream: use validation"
            )
        rows = next(
            data_lib.TokenBatches(data, tokenizer, split=split, batch_size=n_sequences, **args)
        )
    else:
        identity["sha256"] = check_text_file(data)
        splits = ("train", "validation") if split == "all" else (split,)
        rows = []
        for part in splits:
            rows += _split_windows(
                data, tokenizer, split=part, limit=n_sequences - len(rows), **args
            )
        if not rows:
            raise ValueError(
                f"{data}: its {split} split holds less than one window of {seq_len} tokens; "
                "use --split all, a shorter --seq-len or a longer file"
            )
        rows = np.stack(rows)
    if np.any(rows == tokenizer.mask_id):
        raise ValueError(f"{data} holds the mask token {MASK_TOKEN!r}, which cannot be scored")
    return rows, identity
