"""jif's train step against MDLM's PyTorch DiT, side by side in one run.

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # optional
    python -m jif.bench.pytorch                       # d256 L4, 4 heads, 32 x 128, float32
    python -m jif.bench.pytorch --rounds 7 --no-compile

The reference is the DiT of MDLM (kuleshov-group/mdlm, models/dit.py) rebuilt here in plain
PyTorch at jif's shape: adaLN-modulated pre-norm blocks (LayerNorm without bias, fused qkv
projection, rotary embedding on q and k, gated residuals, MLP with tanh GELU), the
sinusoidal noise embedding, the zero-initialised modulated output layer, and MDLM's SUBS
loss under the log-linear schedule (logits over every position, the mask logit at -inf,
-log p(x0) times dsigma / expm1(sigma) at masked positions), AdamW and an EMA of the
weights, as MDLM trains. Two substitutions make it run on a CPU: attention is
torch's scaled_dot_product_attention (its CPU flash kernel) instead of the flash_attn CUDA
package, and dropout is 0 (jif has none). It is timed eager and under torch.compile.

Each implementation runs in its own process with its runtime's defaults (XLA's and OpenMP's
thread pools would otherwise compete for the two cores after every hand-over); the driver
alternates them, every round timing each once after one untimed step, the order rotated,
by wall time or by the worker's CPU time. The report is the median over rounds and jif's
speed over each PyTorch step, so a busy machine slows all of them alike. The JSON record
names the processor. torch is not a dependency of jif: only the workers import it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import multiprocessing
import os
import statistics
import sys
import time

import jax

from jif import flops, hostmem
from jif.bench import train as train_bench
from jif.bench.attention import interleaved, jax_timer, time_steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyTorchBench:
    """What `python -m jif.bench.pytorch` measures."""

    d_model: int = 256
    """Width."""
    n_layers: int = 4
    """Depth."""
    n_heads: int = 4
    """Attention heads."""
    cond_dim: int = 128
    """Width of the noise conditioning (jif's default and MDLM's)."""
    batch_size: int = 32
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    steps: int = 3
    """Timed steps per implementation per round."""
    rounds: int = 5
    """Rounds; each times every implementation once, the order rotated."""
    compile: bool = True
    """Also time the PyTorch step under torch.compile (its first call compiles: 35-50 s on a
    2-core CPU with inductor's cache empty)."""
    clock: str = "wall"
    """Which clock the ratios use: wall, or cpu (the CPU seconds of the worker process)."""
    out: str = "runs/bench/pytorch-{time}.json"
    """JSON output path ({time} becomes a UTC timestamp; empty: do not write)."""


def build_reference(cfg: PyTorchBench, vocab_size: int):
    """The MDLM DiT (see the module docstring) as a torch.nn.Module: (indices, sigma) -> logits."""
    import torch

    nn, F = torch.nn, torch.nn.functional
    d, h = cfg.d_model, cfg.d_model // cfg.n_heads

    class Norm(nn.Module):  # LayerNorm in float32 with a gain and no bias
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return F.layer_norm(x.float(), [d]) * self.weight

    def modulate(x, shift, scale):
        return x * (1 + scale[:, None]) + shift[:, None]

    def rotate(x, cos, sin):  # rotate-half RoPE on [batch, seq, heads, head]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = Norm(), Norm()
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.out = nn.Linear(d, d, bias=False)
            self.mlp = nn.Sequential(
                nn.Linear(d, 4 * d),
                nn.GELU(approximate="tanh"),
                nn.Linear(4 * d, d),
            )
            self.ada = nn.Linear(cfg.cond_dim, 6 * d)
            nn.init.zeros_(self.ada.weight)
            nn.init.zeros_(self.ada.bias)

        def forward(self, x, cos, sin, c):
            b, t, _ = x.shape
            sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
            q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(b, t, 3, -1, h).unbind(2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            a = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)))
            x = x + g1[:, None] * self.out(a.transpose(1, 2).reshape(b, t, d))
            return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Parameter(torch.empty(vocab_size, d))
            nn.init.kaiming_uniform_(self.embed, a=math.sqrt(5))
            self.sigma_map = nn.Sequential(
                nn.Linear(256, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
            )
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.norm = Norm()
            self.ada = nn.Linear(cfg.cond_dim, 2 * d)
            self.head = nn.Linear(d, vocab_size)
            for p in (*self.ada.parameters(), *self.head.parameters()):
                nn.init.zeros_(p)
            inv = 1.0 / 10_000 ** (torch.arange(0, h, 2).float() / h)
            freqs = torch.outer(torch.arange(cfg.seq_len).float(), inv)
            emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

        def forward(self, indices, sigma):
            half = 128  # the 256-wide sinusoidal embedding of sigma
            f = torch.exp(-math.log(10_000) * torch.arange(half).float() / half)
            arg = sigma[:, None] * f
            c = F.silu(self.sigma_map(torch.cat((arg.cos(), arg.sin()), dim=-1)))
            x = self.embed[indices]
            for block in self.blocks:
                x = block(x, self.cos, self.sin, c)
            sh, sc = self.ada(c).chunk(2, dim=-1)
            return self.head(modulate(self.norm(x), sh, sc))

    return DiT()


def subs_loss(model, x0, t, mask_id: int, eps: float = 1e-3):
    """MDLM's SUBS loss (log-linear noise) of token batch x0 at mask rates t ~ U(eps, 1)."""
    import torch

    sigma = -torch.log1p(-(1 - eps) * t)  # total noise; the mask probability is 1 - e^-sigma
    dsigma = (1 - eps) / (1 - (1 - eps) * t)
    move = -torch.expm1(-sigma)
    masked = torch.rand(x0.shape) < move[:, None]
    xt = torch.where(masked, mask_id, x0)
    logits = model(xt, sigma)
    logits[..., mask_id] = -torch.inf  # SUBS: the model never predicts the mask
    logp = logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
    weight = (dsigma / torch.expm1(sigma))[:, None]
    return (-logp * weight * masked).mean()


def reference_step(cfg: PyTorchBench, compile: bool, lr: float = 3e-4):
    """A callable running one PyTorch train step (forward, backward, AdamW, EMA) on a fixed
    random batch; it returns when the step is done (CPU tensors are synchronous)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    vocab, mask_id = train_bench.VOCAB_SIZE, train_bench.MASK_ID
    model = build_reference(cfg, vocab)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    loss_fn = torch.compile(subs_loss) if compile else subs_loss
    x0 = torch.randint(0, train_bench.N_BPE, (cfg.batch_size, cfg.seq_len))
    x0[:, 0] = train_bench.N_BPE

    def step():
        t = torch.rand(cfg.batch_size) * (1 - 1e-3) + 1e-3
        loss = loss_fn(model, x0, t, mask_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.995)
        return loss.item()

    return step


def jif_timer(cfg: PyTorchBench):
    """A timer (see jif.bench.attention.interleaved) of jif's train step at cfg's shape."""
    bench = train_bench.TrainBench(batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype="float32")
    shape = dict(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    compiled, state, batch, _, _ = train_bench.build_step(
        bench, cond_dim=cfg.cond_dim, adaln=True, **shape
    )  # adaLN on, as MDLM's blocks have it
    return jax_timer(compiled, state, batch)


IMPLEMENTATIONS = ("jif", "torch_eager", "torch_compile")


def _worker(conn, name: str, cfg: PyTorchBench) -> None:
    """One implementation in its own process: builds its step, then times `steps` steps per
    request until it receives None. Each runtime keeps its own thread pool and defaults."""
    if name == "jif":
        hostmem.reuse_freed_memory()
        timer = jif_timer(cfg)
    else:
        step = reference_step(cfg, compile=name == "torch_compile")
        timer = lambda steps: time_steps(step, steps)
    t0 = time.perf_counter()
    timer(1)  # compiles
    conn.send(time.perf_counter() - t0)
    while (steps := conn.recv()) is not None:
        conn.send(timer(steps))


def _check_torch() -> str:
    """torch's version, without importing it here (only the workers do)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            "PyTorch is not installed; this optional benchmark needs it: "
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
        ) from None


def run(cfg: PyTorchBench, log=print) -> dict:
    """Times jif and the PyTorch reference as configured, each in its own process, the
    driver alternating them; returns the JSON record."""
    version = _check_torch()
    if jax.default_backend() != "cpu":
        raise ValueError("the PyTorch side-by-side is a CPU benchmark; run it with JAX on CPU")
    names = IMPLEMENTATIONS if cfg.compile else IMPLEMENTATIONS[:2]
    ctx = multiprocessing.get_context("spawn")
    workers, timers, first_step = [], {}, {}
    try:
        for name in names:  # one at a time: building and compiling are timed too
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(there, name, cfg), daemon=True)
            proc.start()
            workers.append((proc, here))
            first_step[name] = here.recv()
            log(f"{name}: built, first step {first_step[name]:.1f} s", file=sys.stderr)
            timers[name] = lambda steps, conn=here: (conn.send(steps), conn.recv())[1]
        times = interleaved(timers, cfg.steps, cfg.rounds, cfg.clock, settle=1)
    finally:
        for proc, conn in workers:
            if proc.is_alive():
                conn.send(None)
                proc.join(30)
    tokens = cfg.batch_size * cfg.seq_len
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**train_bench.device_info(), "torch": version},
        "load_average": os.getloadavg(),
        "config": dataclasses.asdict(cfg),
        "first_step_s": first_step,
        "step_s": {name: {"median": m, "rounds": times[name]} for name, m in med.items()},
        "tokens_per_s": {name: tokens / m for name, m in med.items()},
        "jif_speedup": {name: m / med["jif"] for name, m in med.items() if name != "jif"},
    }
    log(f"{flops.processor()}, {cfg.clock} clock, median of {cfg.rounds} rounds:", file=sys.stderr)
    for name, m in med.items():
        ratio = f"  (jif {m / med['jif']:.2f}x)" if name != "jif" else ""
        log(f"  {name}: {m * 1e3:.0f} ms/step, {tokens / m:,.0f} tokens/s{ratio}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> dict:
    """The CLI (flags from PyTorchBench; see --help)."""
    return train_bench.cli_main(PyTorchBench, run, argv, __doc__)


if __name__ == "__main__":
    main()
