"""jif.checkpoint: listing, loading for inference, keep-last-K, partial and broken folders."""

import json
import os
import shutil

import numpy as np
import pytest

from jif import checkpoint, train
from jif import model as model_lib

TINY = dict(preset="tiny", batch_size=4, seq_len=16, eval_sequences=4, eval_times=2, n_samples=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step tiny run checkpointed every step, keeping the last 2."""
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    cfg = train.configure(**TINY, steps=3, eval_every=3, ckpt_every=1, keep=2, out=out)
    result = train.run(cfg, progress=False)
    return out, result


def test_list_keeps_last_k_newest_first(run_dir):
    out, _ = run_dir
    infos = checkpoint.list_checkpoints(out)
    assert [i.step for i in infos] == [3, 2]
    assert infos[0].run_dir == out and infos[0].data == "stories"
    assert infos[0].config["steps"] == 3 and infos[0].val_nelbo is not None
    assert infos[1].val_nelbo is None  # evaluated only at step 3
    # A folder of runs, the checkpoints folder and a step folder all list the same ones.
    assert [i.path for i in checkpoint.list_checkpoints(os.path.dirname(out))] == [
        i.path for i in infos
    ]
    assert len(checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))) == 2
    assert [i.step for i in checkpoint.list_checkpoints(infos[1].path)] == [2]
    assert checkpoint.list_checkpoints(os.path.join(out, "nothing-here")) == []


def test_load_for_inference_ema_and_raw(run_dir):
    out, result = run_dir
    raw = checkpoint.load_for_inference(out, ema=False)
    ema = checkpoint.load_for_inference(out)
    assert raw.step == ema.step == 3 and raw.path.endswith(os.path.join("checkpoints", "3"))
    assert raw.model_config == model_lib.make_config("tiny", vocab_size=raw.tokenizer.vocab_size)
    assert raw.val_nelbo == pytest.approx(result["val_nelbo"])
    for k, v in result["final_params"].items():
        np.testing.assert_array_equal(np.asarray(raw.params[k].data_array), v.data_array)
    # EMA after 3 steps from the same start: 0.995-weighted, so different from the raw weights.
    k = "dit/blocks/mlp/up"
    assert not np.array_equal(raw.params[k].data_array, ema.params[k].data_array)
    # denoise_fn == apply_logits on the bound model, mask rate = fraction of masks per row.
    tokens = np.array([[raw.tokenizer.eot_id, 5, raw.tokenizer.mask_id, 7]] * 2, np.int32)
    expected = model_lib.apply_logits(raw.model, tokens, np.full((2,), 0.25, np.float32))
    np.testing.assert_allclose(raw.denoise_fn(tokens), expected, rtol=1e-5, atol=1e-5)
    # A step folder loads that step.
    assert checkpoint.load_for_inference(os.path.join(out, "checkpoints", "2")).step == 2


def test_partial_checkpoint_is_never_picked(run_dir, tmp_path):
    out, _ = run_dir
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    # What a kill -9 during a save leaves: orbax's temporary folder, and a step folder
    # without its meta item.
    os.makedirs(os.path.join(copy, "checkpoints", "9.orbax-checkpoint-tmp-1234", "params"))
    os.makedirs(os.path.join(copy, "checkpoints", "7", "params"))
    assert [i.step for i in checkpoint.list_checkpoints(copy)] == [3, 2]
    assert checkpoint.load_for_inference(copy).step == 3


def test_errors_name_the_path_and_the_command(run_dir, tmp_path):
    out, _ = run_dir
    missing = str(tmp_path / "missing")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist") as e:
        checkpoint.load_for_inference(missing)
    assert missing in str(e.value) and "python -m jif.train" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found") as e:
        checkpoint.load_for_inference(str(empty))
    assert "python -m jif.train" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_corrupt_and_incompatible(run_dir, tmp_path):
    out, _ = run_dir
    step = os.path.join(out, "checkpoints", "3")
    corrupt = str(tmp_path / "3")
    shutil.copytree(step, corrupt)
    with open(os.path.join(corrupt, "meta", "metadata"), "w") as f:
        f.write("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt") as e:
        checkpoint.load_for_inference(corrupt)
    assert corrupt in str(e.value)

    # Meta claims a wider model than the stored arrays: restoring must fail clearly.
    wrong = str(tmp_path / "wrong" / "3")
    shutil.copytree(step, wrong)
    meta_path = os.path.join(wrong, "meta", "metadata")
    meta = json.load(open(meta_path))
    meta["model_config"]["d_model"] = 64
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="different model"):
        checkpoint.load_for_inference(wrong)

    meta["model_config"]["n_experts"] = 4
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="n_experts"):
        checkpoint.load_for_inference(wrong)

    # Missing array data (a truncated copy).
    truncated = str(tmp_path / "truncated" / "3")
    shutil.copytree(step, truncated)
    shutil.rmtree(os.path.join(truncated, "ema"))
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load_for_inference(truncated)
