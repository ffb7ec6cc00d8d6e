"""A run folder's tokenizer opens with transformers' AutoTokenizer and equals jif's."""

import itertools
import os

from test_train import TINY
from transformers import AutoTokenizer

from jif import stories, train
from jif.checkpoint import load_for_inference

TEXTS = [
    'Once upon a time, a girl named Lily said "hi!" to her friend.',
    "<|endoftext|>Ünïcödé 🙂 and\ttabs\nnew lines, numbers 12345, a rare word: quixotically",
]


def test_run_folder_tokenizer_loads_with_auto_tokenizer(tmp_path):
    out = str(tmp_path / "run")
    train.run(train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=out))
    ours = load_for_inference(out).tokenizer
    theirs = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    texts = TEXTS + list(itertools.islice(stories.iter_stories(0, "train"), 5))
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert (theirs.eos_token_id, theirs.mask_token_id) == (ours.eot_id, ours.mask_id)
    assert len(theirs) == ours.vocab_size and theirs.model_max_length == TINY["seq_len"]
    other = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    other.add_tokens(["Lily"])  # a different tokenizer: the comparison above would fail
    assert other.encode(TEXTS[0], add_special_tokens=False) != ours.encode(TEXTS[0])
