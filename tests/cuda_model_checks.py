"""Whole-model checks of the CUDA backend on numba-cuda's simulator.

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_model_checks.py [i/n]   (shard i of n)

Prints one JSON line first ({"ok": bool, "reason": ...}), then one per check:
{"check": name, "err": max relative error against the CPU backend} or
{"check": name, "same": bool}. Tiny shapes: the simulator is slow.
"""
import json
import os
import sys
import tempfile

import numpy as np

V, H, E, B, T = 7, 4, 3, 2, 4  # the simulator runs each GPU thread as a Python thread


def usable():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return "NUMBA_ENABLE_CUDASIM=1 is not set"
    try:
        from charrnn.kernels import backend
        backend("cuda")
    except Exception as e:  # numba-cuda missing, or its simulator broken
        return str(e).splitlines()[0]
    return None


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


def windows(seed=0):
    s = np.random.default_rng(seed).integers(0, V, size=(B, 2 * T + 1))
    return [(s[:, k * T:(k + 1) * T], s[:, k * T + 1:(k + 1) * T + 1]) for k in (0, 1)]


def model_pair(cell, nl, embed, dropout=0.0):
    from charrnn import Model, Vocab
    kw = dict(cell=cell, hidden=H, layers=2, embed=embed, nonlinearity=nl, seed=3, dropout=dropout)
    cpu, gpu = Model(V, **kw), Model(V, **kw, device="cuda")
    cpu.vocab = gpu.vocab = Vocab("abcdefg")
    return cpu, gpu


def check_training(cell, nl, embed):
    """Loss and every gradient over three windows, the state carried, with a
    clipped Adam step after each (so the later windows see updated weights)."""
    from charrnn.optim import Optimizer
    cpu, gpu = model_pair(cell, nl, embed, dropout=0.3)
    opts = [Optimizer.for_model(m, "adam") for m in (cpu, gpu)]
    errs, states = [], [None, None]
    for x, y in windows(0) + windows(1)[:1]:
        results = [m.loss_and_grads(x, y, st) for m, st in zip((cpu, gpu), states)]
        (lc, gc, sc), (lg, gg, sg) = results
        states = [sc, sg]
        errs.append(abs(lc - lg) / abs(lc))
        errs.extend(rel(gg[k], gc[k]) for k in gc)
        for opt in opts:
            opt.step(0.01, clip=1.0)
    params = rel(gpu.state_dict()["decoder.weight"], cpu.state_dict()["decoder.weight"])
    return {"err": max(errs + [params])}


def check_sampling(**kw):
    from charrnn.generate import sample
    cpu, gpu = model_pair("lstm", "tanh", None)
    a = sample(cpu, 8, seed=5, prime="ab", num=2, **kw)
    b = sample(gpu, 8, seed=5, prime="ab", num=2, **kw)
    return {"same": a == b, "cpu": a, "gpu": b}


def check_train_on_gpu_sample_on_cpu():
    import charrnn
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.txt")
        with open(path, "w") as f:
            f.write("abcabdabe " * 60)
        charrnn.train(path, device="cuda", hidden=H, batch=2, seq_len=4, steps=1, val_frac=0.02,
                      eval_every=1, out=os.path.join(d, "run"), quiet=True)
        cpu = charrnn.load(os.path.join(d, "run"))
        text = cpu.sample(20, seed=1)
        return {"same": cpu.device == "cpu" and len(text) == 20}


def main():
    reason = usable()
    print(json.dumps({"ok": reason is None, "reason": reason}), flush=True)
    if reason:
        return
    checks = {f"training_{c}_{nl}_{'emb' if e else 'onehot'}": (lambda c=c, nl=nl, e=e: check_training(c, nl, e))
              for c, nl, e in [("lstm", "tanh", None), ("gru", "tanh", E), ("rnn", "tanh", None),
                               ("rnn", "relu", E)]}
    checks.update({
        "sampling_argmax": lambda: check_sampling(temperature=0),
        "sampling_top_k_top_p": lambda: check_sampling(temperature=0.8, top_k=4, top_p=0.7),
        "train_on_gpu_sample_on_cpu": check_train_on_gpu_sample_on_cpu,
    })
    shard, shards = map(int, (sys.argv[1] if len(sys.argv) > 1 else "0/1").split("/"))
    for k, (name, fn) in enumerate(checks.items()):
        if k % shards == shard:
            print(json.dumps({"check": name, **fn()}), flush=True)


if __name__ == "__main__":
    main()
