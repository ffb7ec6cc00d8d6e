"""The PyTorch side-by-side: MDLM's loss computed independently, the reference step learns,
and the driver runs end to end. torch is optional: without it only the message is tested."""

import importlib.metadata
import math

import numpy as np
import pytest

from jif.bench import pytorch as pt_bench
from jif.bench import train as train_bench

TINY = pt_bench.PyTorchBench(
    d_model=32, n_layers=2, n_heads=2, cond_dim=16, batch_size=4, seq_len=16, steps=1,
    rounds=1, compile=False, out="",
)  # fmt: skip


def test_run_without_torch_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pt_bench.importlib.metadata, "version", missing)
    with pytest.raises(ValueError, match="pip install torch"):
        pt_bench.run(TINY)


def test_subs_loss_at_a_zero_output_layer_is_log_vocab_times_mdlm_weight():
    """The reference's output layer starts at zero, so every non-mask token has log-prob
    -log(V - 1): the loss is that times dsigma / expm1(sigma) at the masked positions,
    recomputed here in numpy from the same uniform draws."""
    torch = pytest.importorskip("torch")
    vocab, mask_id, eps = train_bench.VOCAB_SIZE, train_bench.MASK_ID, 1e-3
    model = pt_bench.build_reference(TINY, vocab)
    x0 = torch.randint(0, vocab - 2, (TINY.batch_size, TINY.seq_len))
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    torch.manual_seed(7)
    loss = pt_bench.subs_loss(model, x0, t, mask_id, eps).item()
    torch.manual_seed(7)
    u = torch.rand(x0.shape).numpy()
    tn = t.numpy().astype(np.float64)
    masked = u < (1 - eps) * tn[:, None]  # 1 - exp(-sigma) = (1 - eps) t
    sigma = -np.log1p(-(1 - eps) * tn)
    weight = ((1 - eps) / (1 - (1 - eps) * tn)) / np.expm1(sigma)
    expected = np.mean(masked * weight[:, None] * math.log(vocab - 1))
    assert masked.any() and not masked.all()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_reference_step_overfits_its_fixed_batch():
    pytest.importorskip("torch")
    step = pt_bench.reference_step(TINY, compile=False, lr=1e-2)
    first = np.mean([step() for _ in range(10)])
    for _ in range(100):
        step()
    last = np.mean([step() for _ in range(10)])
    assert last < 0.7 * first


def test_cli_times_jif_and_torch_side_by_side(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "pt.json"
    argv = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--cond-dim", "16"]
    argv += ["--batch-size", "4", "--seq-len", "16", "--steps", "1", "--rounds", "2"]
    result = pt_bench.main([*argv, "--no-compile", "--out", str(out)])
    assert set(result["step_s"]) == {"jif", "torch_eager"}
    assert all(len(r["rounds"]) == 2 and r["median"] > 0 for r in result["step_s"].values())
    assert result["jif_speedup"]["torch_eager"] > 0
    assert result["machine"]["processor"] and out.exists()
