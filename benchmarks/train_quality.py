"""Validation loss after a fixed number of steps: charrnn beside the PyTorch peer.

    python benchmarks/train_quality.py ../shared/corpora/tinyshakespeare.txt \
        --torch-python /path/to/venv-with-torch/bin/python

Same settings on both sides (issue 3's figure): 2x128 LSTM, B=50, T=50, Adam
2e-3, clip 5, val_frac 0.1, 1000 steps, evaluated every 100 steps, seeds 0 1 2.
Prints one JSON line per run (with the val-bpc-versus-minutes curve) and a summary.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import charrnn  # noqa: E402


def run_charrnn(corpus, a, seed):
    out = Path(tempfile.mkdtemp(prefix="charrnn-quality-"))
    # the peer's model and recipe: none of the layer norm, regularisers or decay that
    # charrnn's defaults switch on
    charrnn.train(corpus, cell=a.cell, hidden=a.hidden, layers=a.layers, batch=a.batch,
                  layer_norm=False, dropout=0.0, weight_drop=0.0, output_dropout=0.0,
                  schedule="constant", optimizer="adam", weight_decay=0.0, seq_len=a.seq, lr=a.lr, clip=5.0, val_frac=a.val_frac, steps=a.steps,
                  eval_every=a.eval_every, seed=seed, out=out, quiet=True, threads=a.threads)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(round(r["elapsed_s"] / 60, 3), r["step"], round(r["val_bpc"], 4)) for r in rows]
    return rows[-1]["val_loss"], curve


def run_torch(corpus, a, seed):
    cmd = [a.torch_python, str(Path(a.peer)), "train", str(corpus), "--cell", a.cell,
           "--hidden", str(a.hidden), "--layers", str(a.layers), "--batch", str(a.batch),
           "--seq", str(a.seq), "--lr", str(a.lr), "--val-frac", str(a.val_frac),
           "--steps", str(a.steps), "--eval-steps", str(a.eval_every), "--seed", str(seed),
           "--minutes", "1000"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    lines = [json.loads(x) for x in subprocess.run(cmd, check=True, capture_output=True,
                                                   text=True).stdout.splitlines()]
    curve = [(round(r["t"] / 60, 3), r["step"], r["val_bpc"]) for r in lines if "t" in r]
    return lines[-1]["final_val_nats"], curve


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus")
    p.add_argument("--torch-python", default=None, help="a Python with torch, for the peer")
    p.add_argument("--peer", default=str(ROOT.parent / "shared" / "peers" / "torch_charlm.py"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cell", default="lstm")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seq", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    results = {"charrnn": [], "torch": []}
    for seed in a.seeds:
        for name, fn in (("charrnn", run_charrnn), ("torch", run_torch)):
            if name == "torch" and not a.torch_python:
                continue
            val, curve = fn(a.corpus, a, seed)
            results[name].append(val)
            print(json.dumps({"peer": name, "seed": seed, "final_val_nats": round(val, 4),
                              "final_val_bpc": round(val / math.log(2), 4),
                              "curve_minutes_step_bpc": curve}), flush=True)
    summary = {k: {"mean_val_nats": round(statistics.mean(v), 4),
                   "spread": round((max(v) - min(v)) / 2, 4)} for k, v in results.items() if v}
    if len(summary) == 2:
        summary["difference_nats"] = round(summary["charrnn"]["mean_val_nats"]
                                           - summary["torch"]["mean_val_nats"], 4)
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
