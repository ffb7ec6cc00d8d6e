"""Hugging Face interop: any `transformers` tokenizer in, a run's tokenizer out.

    tok = load_tokenizer("gpt2", n_bpe=2048)        # the default: trimmed GPT-2, offline
    tok = load_tokenizer("path/to/hf-folder")        # any tokenizer saved with save_pretrained
    tok = load_tokenizer("HuggingFaceTB/SmolLM-135M")  # a hub id (fails fast offline)

A tokenizer other than the default is loaded with `AutoTokenizer` and becomes a
`jif.tokenizer.Tokenizer` holding its `tokenizers` definition: its own ids, its eos token as
jif's end-of-text token (BOS, separator, padding) or an added "<|endoftext|>" where it has no
eos, and an added "<|mask|>" (diffusion's absorbing state) unless it has that token already.
Truncation and padding settings are dropped; no BOS/EOS is added when encoding.

Every run folder holds `<run>/tokenizer/` in Hugging Face's format (`save`), so that

    AutoTokenizer.from_pretrained("runs/cpu-stories/tokenizer")

gives exactly jif's ids for any text and decodes them to the same text (the end-of-text id is
its BOS, EOS and padding token, the mask id its mask token).
"""

from __future__ import annotations

import os

import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jif import hub
from jif import tokenizer as tok_lib
from jif.tokenizer import DEFAULT, EOT_TOKEN, MASK_TOKEN, Tokenizer


def to_transformers(tokenizer: Tokenizer, *, context: int | None = None) -> PreTrainedTokenizerFast:
    """The same tokenizer (its `tokenizers` definition) with its special tokens named;
    `context` becomes model_max_length."""
    extra = {} if context is None else {"model_max_length": context}
    eot = tokenizer.eot_text
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.definition),
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,  # decode exactly as jif does
        **extra,
    )


def save(tokenizer: Tokenizer, folder: str, *, context: int | None = None) -> None:
    """Writes `folder/tokenizer.json` and `folder/tokenizer_config.json`."""
    to_transformers(tokenizer, context=context).save_pretrained(folder)


def from_transformers(hf_tokenizer, *, name: str, source: str = "folder") -> Tokenizer:
    """A jif Tokenizer from a fast `transformers` tokenizer: eot is its eos token (an added
    "<|endoftext|>" where it has none), mask an added "<|mask|>" (its own, if present)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"--tokenizer {name}: {type(hf_tokenizer).__name__} is a slow (Python) tokenizer; "
            "jif needs a fast one with a tokenizer.json (convert it with transformers, e.g. "
            "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder))"
        )
    tok = tokenizers.Tokenizer.from_str(backend.to_str())
    tok.no_truncation()
    tok.no_padding()
    special = lambda text: tokenizers.AddedToken(text, special=True, normalized=False)
    eos = hf_tokenizer.eos_token
    if eos is None or tok.token_to_id(str(eos)) is None:
        eos = EOT_TOKEN
        if tok.token_to_id(EOT_TOKEN) is None:
            tok.add_special_tokens([special(EOT_TOKEN)])
    if tok.token_to_id(MASK_TOKEN) is None:
        tok.add_special_tokens([special(MASK_TOKEN)])
    return Tokenizer(
        definition=tok.to_str(),
        eot_id=tok.token_to_id(str(eos)),
        mask_id=tok.token_to_id(MASK_TOKEN),
        name=name,
        source=source,
    )


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id ("name" or "owner/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _auto_tokenizer(name: str):
    """(AutoTokenizer.from_pretrained(name), "folder" | "hub"); ValueError saying why not."""
    if os.path.isdir(name):
        try:
            return AutoTokenizer.from_pretrained(name), "folder"
        except Exception as e:  # OSError, ValueError, JSON errors...
            raise ValueError(
                f"--tokenizer {name}: transformers.AutoTokenizer cannot load this folder ({e}); "
                "it should hold a tokenizer.json (write one with tokenizer.save_pretrained(folder))"
            ) from e
    if os.path.exists(name) or _looks_like_path(name):
        raise ValueError(
            f"--tokenizer {name}: no such folder; give a folder written by save_pretrained "
            f"(with tokenizer.json), a hub id, or {DEFAULT!r} (trimmed GPT-2, the default)"
        )
    why_not = hub.unavailable()  # then only the cache is read: no retries on a dead network
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=why_not is not None), "hub"
    except Exception as e:
        why = f"it is not cached and the hub cannot be used ({why_not})" if why_not else str(e)
        raise ValueError(
            f"--tokenizer {name!r}: no such local folder, and as a hub id {why}. Offline, use a "
            f"local folder: where the hub is reachable, run AutoTokenizer.from_pretrained("
            f"{name!r}).save_pretrained('path/to/folder'), then pass --tokenizer path/to/folder"
        ) from e


def load_tokenizer(name: str = DEFAULT, *, n_bpe: int = 2048) -> Tokenizer:
    """The run's tokenizer: "gpt2" is GPT-2's BPE trimmed to `n_bpe` ids (built offline,
    jif.tokenizer.load_tokenizer); anything else a local folder or hub id loaded with
    AutoTokenizer (`n_bpe` unused). ValueError naming the fix when it cannot be loaded."""
    if name == DEFAULT:
        return tok_lib.load_tokenizer(n_bpe)
    hf_tokenizer, source = _auto_tokenizer(name)
    return from_transformers(hf_tokenizer, name=name, source=source)
