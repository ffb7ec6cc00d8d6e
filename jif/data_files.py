"""Local data files for `jif.data`: their documents, checks, validation split and digest.

A file is .txt (documents separated by a line "<|endoftext|>", as in TinyStories' own text
files; without such lines, blank-line-separated paragraphs), .jsonl/.json (a "text" field)
or .parquet (a "text" column), read with Hugging Face `datasets`. Before a file is used, a
text file must be UTF-8 and no document may hold the literal mask token; each failure is a
DataError naming the file and the fix. A fixed fraction of the documents, chosen by a hash
of their text (so independent of the seed and of file order), is the validation split.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import datasets

from jif import stories
from jif.tokenizer import MASK_TOKEN

VALIDATION_FRACTION = 0.05  # share of a file's documents held out for validation
EOT_LINE = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)


class DataError(ValueError):
    """A data source that cannot be read; the message names the problem and the fix."""


def refuse_mask_token(docs: list[str], where: str, *, is_file: bool = True) -> None:
    """DataError if a document holds the literal mask token: it would be read as a masked
    position, whose target the model can never predict (an infinite loss at step 1).
    where: the file (is_file) or the dataset the documents come from."""
    bad = [i for i, d in enumerate(docs) if MASK_TOKEN in d]
    if bad:
        at = docs[bad[0]].index(MASK_TOKEN)
        raise DataError(
            f"{where}: {len(bad)} document(s) contain the mask token {MASK_TOKEN!r} (first in "
            f"document {bad[0] + 1}: {docs[bad[0]][max(0, at - 30) : at + 40]!r}); training "
            "text must not hold it. "
            + (
                f"Replace it, e.g. `sed -i 's/<|mask|>/[mask]/g' {where}`, and train again."
                if is_file
                else "Train on a local copy without it (--data PATH)."
            )
        )


def _check_utf8(path: Path) -> None:
    """DataError naming the first byte of `path` that is not UTF-8 (its offset and line)."""
    start, lines, pending = 0, 1, b""
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            data = pending + chunk
            try:
                data.decode("utf-8")
                done, pending = len(data), b""
            except UnicodeDecodeError as e:
                if chunk and e.reason == "unexpected end of data":  # split by the chunk's end
                    done, pending = e.start, data[e.start :]
                else:
                    line = lines + data[: e.start].count(b"\n")
                    raise DataError(
                        f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
                        f"{start + e.start} (line {line}) is not UTF-8 (Latin-1? binary?). "
                        f"Convert it, e.g. `iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}`."
                    ) from None
            lines += data[:done].count(b"\n")
            start += done
            if not chunk:
                return


def _text_column(ds, path: Path) -> list[str]:
    if "text" not in ds.column_names:
        raise DataError(
            f"{path}: no 'text' column (columns: {ds.column_names}); store each document's text in a 'text' field"
        )
    dtype = getattr(ds.features["text"], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"{path}: column 'text' holds {ds.features['text']}, not text; it must hold strings"
        )
    return [t for t in ds["text"] if t and t.strip()]


def _load_quietly(builder: str, path: Path, **kwargs) -> datasets.Dataset:
    """`datasets.load_dataset` of one local file, without its progress bars."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_txt(path: Path) -> list[str]:
    ds = _load_quietly("text", path, sample_by="document")
    whole = "\n".join(ds["text"])
    parts = EOT_LINE.split(whole) if EOT_LINE.search(whole) else re.split(r"\n\s*\n", whole)
    return [p.strip() for p in parts if p.strip()]


_read_json = lambda path: _text_column(_load_quietly("json", path), path)
FILE_READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_json,
    ".json": _read_json,
    ".parquet": lambda path: _text_column(_load_quietly("parquet", path), path),
}
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")  # read as text: checked to be UTF-8 first


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file {str(path)!r} not found; give an existing file, or --data stories"
        )
    return path


def read_documents(path: str | Path, split: str) -> list[str]:
    """A local file's documents of one split (validation: the VALIDATION_FRACTION of
    documents with the smallest text hashes, at least one)."""
    path = _existing_file(path)
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_READERS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; it must hold at least two documents")
    if path.suffix.lower() in TEXT_SUFFIXES:
        _check_utf8(path)
    try:
        docs = reader(path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path}: could not be read as {path.suffix} ({type(e).__name__}: {e})"
        ) from e
    refuse_mask_token(docs, str(path))
    if len(docs) < 2:
        raise DataError(
            f"{path}: found {len(docs)} document(s); need at least 2 (one is held out for validation)"
        )
    order = sorted(range(len(docs)), key=lambda i: (stories.text_hash(docs[i]), i))
    n_val = max(1, math.ceil(VALIDATION_FRACTION * len(docs)))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if (i in val) == (split == "validation")]


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # cache keys only: a changed file is hashed again
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
