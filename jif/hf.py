"""Hugging Face interop: a jif tokenizer as a `transformers` tokenizer.

Every run folder holds `<run>/tokenizer/` in Hugging Face's format, so that

    AutoTokenizer.from_pretrained("runs/cpu-stories/tokenizer")

gives exactly jif's ids for any text and decodes them to the same text (the end-of-text id is
its BOS, EOS and padding token, the mask id its mask token).
"""

from __future__ import annotations

import tokenizers
from transformers import PreTrainedTokenizerFast

from jif.tokenizer import EOT_TOKEN, MASK_TOKEN, Tokenizer


def to_transformers(tokenizer: Tokenizer, *, context: int | None = None) -> PreTrainedTokenizerFast:
    """The same tokenizer (its `tokenizers` definition) with its special tokens named;
    `context` becomes model_max_length."""
    extra = {} if context is None else {"model_max_length": context}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.definition),
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        mask_token=MASK_TOKEN,
        **extra,
    )


def save(tokenizer: Tokenizer, folder: str, *, context: int | None = None) -> None:
    """Writes `folder/tokenizer.json` and `folder/tokenizer_config.json`."""
    to_transformers(tokenizer, context=context).save_pretrained(folder)
