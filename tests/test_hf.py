"""Hugging Face interop: a run folder's tokenizer opens with AutoTokenizer and equals jif's,
for the trimmed GPT-2 default and for a second tokenizer that a run is trained with from a
local folder (train, sample, evaluate and the app from the checkpoint alone, offline)."""

import itertools
import os
import shutil
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from test_train import TINY
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import app
from jif import data, genppl, hf, sample, stories, train
from jif import eval as jif_eval
from jif import tokenizer as tok_lib
from jif.checkpoint import load_for_inference

TEXTS = [
    'Once upon a time, a girl named Lily said "hi!" to her friend.',
    "<|endoftext|>Ünïcödé 🙂 and\ttabs\nnew lines, numbers 12345, a rare word: quixotically",
]


def story_texts(n: int) -> list[str]:
    return list(itertools.islice(stories.iter_stories(0, "train"), n))


def assert_same_as_auto_tokenizer(ours, folder: str, texts: list[str]) -> None:
    """AutoTokenizer.from_pretrained(folder) gives jif's ids and decodes jif's text."""
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs.decode(ids) == ours.decode(ids), text
    assert (theirs.eos_token_id, theirs.mask_token_id) == (ours.eot_id, ours.mask_id)
    assert len(theirs) == ours.vocab_size


def test_run_folder_tokenizer_loads_with_auto_tokenizer(tmp_path):
    out = str(tmp_path / "run")
    train.run(train.configure(**TINY, steps=1, eval_every=0, ckpt_every=1, out=out))
    ours = load_for_inference(out).tokenizer
    assert ours == hf.load_tokenizer("gpt2", n_bpe=2048) == tok_lib.load_tokenizer(2048)
    full = hf.load_tokenizer("gpt2", n_bpe=50256)  # GPT-2's own ids: the default is unchanged
    assert full.encode("Once upon a time,") == [7454, 2402, 257, 640, 11]
    folder = os.path.join(out, "tokenizer")
    texts = TEXTS + story_texts(5)
    assert_same_as_auto_tokenizer(ours, folder, texts)
    for text in texts:
        assert ours.decode(ours.encode(text)) == text
    assert AutoTokenizer.from_pretrained(folder).model_max_length == TINY["seq_len"]
    other = AutoTokenizer.from_pretrained(folder)
    other.add_tokens(["Lily"])  # a different tokenizer: the comparison above would fail
    assert other.encode(TEXTS[0], add_special_tokens=False) != ours.encode(TEXTS[0])


# ----------------------------------------------------------------------------- a second tokenizer


def save_story_bpe(folder, *, eos: str | None = "</s>", vocab_size: int = 400) -> None:
    """A byte-level BPE trained on a few stories, saved as a Hugging Face folder (with an
    eos token "</s>" and a pad token, or with no special tokens at all)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", eos] if eos else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(story_texts(300), trainer)
    named = dict(eos_token=eos, pad_token="<pad>") if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, **named).save_pretrained(str(folder))


def test_a_folder_tokenizer_gets_mask_and_end_of_text(tmp_path):
    save_story_bpe(tmp_path / "eos")
    tok = hf.load_tokenizer(str(tmp_path / "eos"))
    original = AutoTokenizer.from_pretrained(str(tmp_path / "eos"))
    assert tok.n_bpe is None and tok.eot_text == "</s>" and tok.eot_id == original.eos_token_id
    assert tok.mask_id == len(original) and tok.vocab_size == len(original) + 1  # one added
    for text in story_texts(3) + TEXTS:  # its own ids, unchanged
        assert tok.encode(text) == original.encode(text, add_special_tokens=False)
    assert tok.encode("a <|mask|>") == tok.encode("a ") + [tok.mask_id]
    assert tok.decode([tok.mask_id, tok.eot_id]) == "[MASK]</s>"

    save_story_bpe(tmp_path / "none", eos=None)  # no eos: "<|endoftext|>" is added
    bare = hf.load_tokenizer(str(tmp_path / "none"))
    assert bare.eot_text == tok_lib.EOT_TOKEN and bare.vocab_size == 402
    assert (bare.eot_id, bare.mask_id) == (400, 401)
    assert tok_lib.Tokenizer.from_json(bare.to_json()) == bare
    assert bare != tok_lib.Tokenizer.from_json(tok.to_json())


def test_token_bytes_add_up_to_the_utf8_length(tmp_path):
    default = tok_lib.load_tokenizer(2048)
    save_story_bpe(tmp_path / "bpe")
    bpe = hf.load_tokenizer(str(tmp_path / "bpe"))
    for tok in (default, bpe):  # byte-level BPE: exact
        n = tok.token_bytes()
        assert n[tok.eot_id] == n[tok.mask_id] == 0
        for text in story_texts(3) + TEXTS[:1] + ["Ünïcödé 🙂 and\ttabs"]:
            assert n[tok.encode(text)].sum() == len(text.encode()), text
    unigram = tokenizers.Tokenizer(models.Unigram())  # another model: approximate, no error
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, show_progress=False, unk_token="<unk>")
    unigram.train_from_iterator(story_texts(200), trainer)
    PreTrainedTokenizerFast(tokenizer_object=unigram).save_pretrained(str(tmp_path / "uni"))
    tok = hf.load_tokenizer(str(tmp_path / "uni"))
    text = story_texts(1)[0]
    assert tok.token_bytes()[tok.encode(text)].sum() == len(text.encode()) + 1  # its "▁" first


def test_bad_tokenizer_names_say_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached there
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set.*local folder"):
        hf.load_tokenizer("someone/some-tokenizer")
    assert time.monotonic() - t0 < 30  # generous: network retries would take minutes
    with pytest.raises(ValueError, match="no such folder"):
        hf.load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer.json"):
        hf.load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="vocabulary holds 100"):
        tok_lib.load_tokenizer(2048).check_fits(100)


def test_train_cli_with_a_hub_tokenizer_offline_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        train.main(["--tokenizer", "someone/some-tokenizer", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "error: --tokenizer 'someone/some-tokenizer'" in capsys.readouterr().err


def test_data_state_names_the_tokenizer(tmp_path):
    save_story_bpe(tmp_path / "a")
    save_story_bpe(tmp_path / "b", vocab_size=380)
    args = dict(batch_size=2, seq_len=16)
    a = data.TokenBatches("stories", hf.load_tokenizer(str(tmp_path / "a")), **args)
    next(a)
    default = data.TokenBatches("stories", tok_lib.load_tokenizer(2048), **args)
    assert "tokenizer" not in default.state() and a.state()["n_bpe"] is None
    b = data.TokenBatches("stories", hf.load_tokenizer(str(tmp_path / "b")), **args)
    with pytest.raises(ValueError, match="same tokenizer"):
        b.restore(a.state())


def test_train_sample_eval_and_app_with_a_folder_tokenizer_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "story-bpe"
    save_story_bpe(folder)
    original = AutoTokenizer.from_pretrained(str(folder))
    out = str(tmp_path / "runs" / "bpe")
    settings = dict(TINY, n_samples=1, sample_steps=4, eval_every=2, ckpt_every=2)
    result = train.run(train.configure(**settings, steps=2, out=out, tokenizer=str(folder)))
    assert np.isfinite(result["val_nelbo"])
    shutil.rmtree(folder)  # from here on only the run folder holds the tokenizer

    loaded = load_for_inference(out)
    tok = loaded.tokenizer
    assert loaded.model_config.vocab_size == tok.vocab_size == len(original) + 1
    assert tok.name == str(folder) and tok.eot_text == "</s>"
    texts = story_texts(5) + TEXTS
    for text in texts:  # the folder's own ids for any text
        assert tok.encode(text) == original.encode(text, add_special_tokens=False)
    assert_same_as_auto_tokenizer(tok, os.path.join(out, "tokenizer"), texts)
    assert_same_as_auto_tokenizer(
        tok, os.path.join(out, "tokenizer"), [tok.decode(range(tok.mask_id))]
    )

    got = sample.run(sample.SampleConfig(checkpoint=out, num=2, steps=4, prompt="Once upon"))
    assert all(text.startswith("Once upon") for text in got["texts"])
    assert all(max(row) < tok.vocab_size for row in got["tokens"])
    measured = jif_eval.measure(
        jif_eval.MeasureConfig(checkpoint=out, sequences=4, batch_size=2, times=2)
    )
    assert np.isfinite(measured["nelbo"]) and measured["n_tokens"] == 4 * TINY["seq_len"]
    assert measured["bytes_per_token"] > 1  # byte-level BPE: every symbol is one byte

    handler = app.DiffusionApp(str(tmp_path / "runs"))  # what the page does on Generate
    step_dir = handler.initial_choice(handler.choices())
    template = "Once upon a time, [MASK:3] said."
    settings = ("confidence", 4, 16, 1.0, 1.0, 0, 0, 0, 1, 60, template)
    final = list(handler.generate(step_dir, *settings, False, "ddpm_cache", None, "confidence"))
    prompt, rest = final[-1][6][0].texts[0].split("Once upon a time,", 1)
    assert prompt == "</s>" and " said." in rest and "[MASK]" not in rest


# ----------------------------------------------------------------------------- the judge


def test_hf_judge_without_torch_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(genppl, "torch_installed", lambda: False)  # as in a plain install
    with pytest.raises(SystemExit) as e:  # before the checkpoint is even looked at
        jif_eval.main(["--checkpoint", "nowhere", "--judge", "gpt2-large"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --judge gpt2-large (no such folder: read as a hub id): a ")
    assert 'needs PyTorch, which is not installed: pip install -e ".[judge]"' in err


def test_hf_judge_matches_the_models_own_loss(tmp_path, capsys):
    """A tiny random GPT-2 in a local folder judges samples whose tokens are known (a fake
    denoiser that is certain of them); the NLL equals the one from the model's own loss
    (labels=...) on the same texts, retokenised through text and joined by the judge's eos."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = str(tmp_path / "judge")
    save_story_bpe(folder)
    judge_tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    eos = judge_tok.eos_token_id
    config = GPT2Config(vocab_size=len(judge_tok), n_positions=48, n_embd=32, n_layer=2, n_head=2)
    config.bos_token_id = config.eos_token_id = eos
    GPT2LMHeadModel(config).save_pretrained(folder)

    tok = tok_lib.load_tokenizer(2048)
    first, second = "Tom had a big red ball.", story_texts(1)[0]
    length = 40  # the samples' length; the judge's context is 48
    target = ([tok.eot_id] + tok.encode(first) + [tok.eot_id] + tok.encode(second))[:length]
    assert tok.eot_id in target[1:], "the premise: a story ends inside the sample"
    v = tok.vocab_size

    def denoise(tokens):
        logits = jnp.full((length, v), -1e4).at[jnp.arange(length), jnp.asarray(target)].set(0.0)
        return jnp.broadcast_to(logits, (tokens.shape[0], length, v))

    loaded = types.SimpleNamespace(
        tokenizer=tok, denoise_fn=denoise, config={"seq_len": length, "objective": "mdlm"}
    )
    g = genppl.generative_perplexity(
        loaded, folder, n_samples=3, batch_size=2, steps=8, method="confidence"
    )

    cut = target.index(tok.eot_id, 1)
    texts = [tok.decode(target[1:cut]), tok.decode(target[cut + 1 :])]
    ids = [eos] + judge_tok(texts[0])["input_ids"] + [eos] + judge_tok(texts[1])["input_ids"]
    ids = ids[:48]
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        mean = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert g["nll"] == pytest.approx(mean, rel=1e-5) and g["gen_ppl"] == pytest.approx(
        np.exp(mean), rel=1e-5
    )
    assert g["nll_ci95_halfwidth"] == pytest.approx(0.0, abs=1e-6)  # three identical samples
    assert g["judge"] == folder and g["judge_step"] is None
    assert g["texts"][0] == tok.decode(target[1:])
    jif_eval.print_report(dict(checkpoint="x", step=2, objective="mdlm", seconds=1, generative=g))
    printed = capsys.readouterr().out
    assert f"judged by {folder} (retokenised through text, as MDLM does" in printed
    assert f"gen PPL {np.exp(mean):.2f}" in printed
