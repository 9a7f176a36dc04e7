"""``charrnn bench``: training and sampling speed, side by side with PyTorch.

Each measurement runs in its own subprocess, so that peak memory is per
config and the two libraries' thread pools never meet.
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from .kernels.cells import gates

DEFAULT_CONFIGS = [("lstm", 128), ("lstm", 256), ("lstm", 512), ("gru", 256)]


def gemm_weights(cell, hidden, layers, vocab, embed):
    """Entries of the weight matrices that go through a GEMM for each
    character (a one-hot input projection is a gather and does not)."""
    G = gates(cell)
    n = layers * G * hidden * hidden + (layers - 1) * G * hidden * hidden + vocab * hidden
    return n + (G * hidden * embed if embed else 0)


def _timed(fn, seconds, warmup=2):
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_charrnn(cfg):
    """Training, single-stream and 64-stream sampling chars/s (worker side)."""
    from .data import Vocab
    from .generate import sample
    from .model import Model
    from .optim import Optimizer
    from .parallel import thread_limit
    V, B, T = cfg["vocab"], cfg["batch"], cfg["seq_len"]
    with thread_limit(cfg["threads"]):
        m = Model(V, cell=cfg["cell"], hidden=cfg["hidden"], layers=cfg["layers"],
                  embed=cfg["embed"] or None, device=cfg["device"])
        m.vocab = Vocab("".join(chr(0x100 + i) for i in range(V)))
        opt = Optimizer.for_model(m, "adam")
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
        state = [None]

        def step():
            _, state[0] = m.train_pass(x, y, state[0])
            opt.step(2e-3, 5.0)
        dt = _timed(step, cfg["seconds"])
        out = {"train_chars_per_s": B * T / dt}
        n = 2000
        dt = _timed(lambda: sample(m, n, 0.8, seed=0), cfg["seconds"] / 2, warmup=1)
        out["sample_chars_per_s"] = n / dt
        n = 200
        dt = _timed(lambda: sample(m, n, 0.8, seed=0, num=64), cfg["seconds"] / 2, warmup=1)
        out["batch_sample_chars_per_s"] = 64 * n / dt
        a = np.ones((2048, 2048), np.float32)
        dt = _timed(lambda: a @ a, 1.0, warmup=1)
        out["sgemm_gflops"] = 2 * 2048 ** 3 / dt / 1e9
        out["blas"] = _blas_info()
    out["peak_rss_mb"] = _rss_mb()
    return out


def _blas_info():
    """The library the kernels' GEMMs call, then every BLAS pool loaded
    (name, version, threads)."""
    from threadpoolctl import threadpool_info
    from .kernels.cpu import BLAS
    pools = sorted({f"{p.get('internal_api')} {p.get('version')} x{p.get('num_threads')}"
                    for p in threadpool_info() if p.get("user_api") == "blas"})
    return [f"kernels: {BLAS}"] + pools


def measure_torch(cfg):
    """The same model in PyTorch (nn.LSTM/GRU/RNN + nn.Linear, one-hot or
    embedding input, Adam, clipping), at 1 and 2 threads: the best of both;
    on the GPU (cuDNN) with ``device`` "cuda"."""
    import torch
    V, B, T, H, L = cfg["vocab"], cfg["batch"], cfg["seq_len"], cfg["hidden"], cfg["layers"]
    dev = torch.device(cfg["device"])
    best = {}
    for threads in sorted({1, cfg["threads"] or os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cfg["cell"]](
            cfg["embed"] or V, H, L, batch_first=True).to(dev)
        head = torch.nn.Linear(H, V).to(dev)
        emb = torch.nn.Embedding(V, cfg["embed"]).to(dev) if cfg["embed"] else None
        params = [*rnn.parameters(), *head.parameters(), *(emb.parameters() if emb else [])]
        opt = torch.optim.Adam(params, lr=2e-3)
        x = torch.randint(0, V, (B, T), device=dev)
        y = torch.randint(0, V, (B, T), device=dev)
        embed = (lambda ids: emb(ids)) if emb else (lambda ids: torch.nn.functional.one_hot(ids, V).float())
        state = [None]

        def step():
            out, s = rnn(embed(x), state[0])
            state[0] = tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach()
            loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, V), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()  # time the work, not its queueing

        @torch.no_grad()
        def sample_stream(n=200):
            ids, s = torch.zeros(1, 1, dtype=torch.long, device=dev), None
            for _ in range(n):
                out, s = rnn(embed(ids), s)
                p = torch.softmax(head(out[0, -1]) / 0.8, -1)
                ids = torch.multinomial(p, 1).view(1, 1)
        train = B * T / _timed(step, cfg["seconds"])
        samp = 200 / _timed(sample_stream, cfg["seconds"] / 2, warmup=1)
        if train > best.get("torch_train_chars_per_s", 0):
            best.update(torch_train_chars_per_s=train, torch_threads=threads)
        best["torch_sample_chars_per_s"] = max(samp, best.get("torch_sample_chars_per_s", 0))
    best["torch_peak_rss_mb"] = _rss_mb()
    return best


def _worker(kind, cfg):
    fn = measure_charrnn if kind == "charrnn" else measure_torch
    print(json.dumps(fn(cfg)))


def _run_worker(kind, cfg):
    env = dict(os.environ)
    if cfg["threads"]:  # fix the pools before the libraries load
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[var] = str(cfg["threads"])
    r = subprocess.run([sys.executable, "-m", "charrnn.bench", kind, json.dumps(cfg)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} benchmark failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def torch_available():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def run(configs, with_torch=True):
    """Yield one result dict per config: its settings, charrnn's figures,
    achieved GFLOP/s and, where torch is importable, torch's and the ratios."""
    for cfg in configs:
        r = dict(cfg)
        r.update(_run_worker("charrnn", cfg))
        flops = 6 * gemm_weights(cfg["cell"], cfg["hidden"], cfg["layers"], cfg["vocab"], cfg["embed"])
        r["gflops"] = flops * r["train_chars_per_s"] / 1e9
        r["gemm_efficiency"] = r["gflops"] / r["sgemm_gflops"]
        if with_torch:
            r.update(_run_worker("torch", cfg))
            r["train_speedup"] = r["train_chars_per_s"] / r["torch_train_chars_per_s"]
            r["sample_speedup"] = r["sample_chars_per_s"] / r["torch_sample_chars_per_s"]
        yield {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
