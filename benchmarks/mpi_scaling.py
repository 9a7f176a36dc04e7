"""Training chars/s on this machine for three set-ups, interleaved over
rounds: one process with one thread, one process with two threads, and two
MPI ranks with one thread each (``mpiexec -n 2``), with the share of each
step spent in the gradient Allreduce:

    python benchmarks/mpi_scaling.py [--hidden 256] [--batch 50] [--rounds 3]

Needs ``pip install "charrnn[mpi]"``. Each measurement is a fresh process
(or pair of ranks) timing training steps of the LSTM (window, Allreduce of
the flat gradient buffer, loss sum, Adam) after two warm-up steps.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def worker(a):
    import numpy as np

    from charrnn import Model, distributed, parallel
    from charrnn.optim import Optimizer
    world = distributed.world()
    cuts = parallel.shard_cuts(a.batch, world.size)
    mine = slice(cuts[world.rank], cuts[world.rank + 1])
    with parallel.thread_limit(a.threads):
        m = Model(65, hidden=a.hidden, layers=2, dropout=0.25)
        opt = Optimizer.for_model(m, "adam")
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 65, (a.batch, 50)), rng.integers(0, 65, (a.batch, 50))
        state, reduce_s, steps = None, 0.0, 0
        t0 = None
        while True:
            if steps == 2:
                world.sum(0.0)  # start the clock together
                t0, reduce_s = time.perf_counter(), 0.0
            total, state = m.window(x[mine], y[mine], state, train=True, part=(mine.start, a.batch))
            r0 = time.perf_counter()
            world.sum_into(m.grads)
            world.sum(total)
            reduce_s += time.perf_counter() - r0
            opt.step(2e-3, 5.0)
            steps += 1
            done = t0 is not None and time.perf_counter() - t0 > a.seconds
            if world.sum(float(done))[0]:  # every rank stops at the same step
                break
        elapsed = time.perf_counter() - t0
    timed = steps - 2
    if world.rank == 0:
        print(json.dumps({"chars_per_s": timed * a.batch * 50 / elapsed,
                          "allreduce_share": reduce_s / elapsed,
                          "gradient_mb": m.grads.nbytes / 1e6, "step_ms": 1e3 * elapsed / timed}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    if mpiexec is None:
        sys.exit('needs mpiexec: pip install "charrnn[mpi]"')
    base = [sys.executable, __file__, "--worker", "--hidden", str(a.hidden), "--batch", str(a.batch),
            "--seconds", str(a.seconds)]
    setups = {"1 process, 1 thread": base + ["--threads", "1"],
              "1 process, 2 threads": base + ["--threads", "2"],
              "2 ranks, 1 thread each": [mpiexec, "-n", "2"] + base + ["--threads", "1"]}
    results = {name: [] for name in setups}
    for r in range(a.rounds):
        for name, cmd in setups.items():
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name}: {results[name][-1]}", flush=True)
    one = [x["chars_per_s"] for x in results["1 process, 1 thread"]]
    print(f"\nLSTM 2x{a.hidden}, B={a.batch}, T=50, {a.rounds} interleaved rounds:")
    for name, rows in results.items():
        rates = ", ".join(f"{x['chars_per_s'] / 1e3:.1f}k" for x in rows)
        share = ", ".join(f"{100 * x['allreduce_share']:.1f}%" for x in rows)
        eff = ", ".join(f"{100 * x['chars_per_s'] / (2 * o):.0f}%" for x, o in zip(rows, one))
        print(f"  {name}: {rates} chars/s; Allreduce {share} of each step; of twice one rank: {eff}")


if __name__ == "__main__":
    main()
