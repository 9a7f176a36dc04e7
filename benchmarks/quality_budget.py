"""Best validation loss within a wall-clock budget: charrnn's defaults beside
char-rnn's recipe on charrnn and on the PyTorch peer:

    python benchmarks/quality_budget.py CORPUS --minutes 10 \\
        [--torch-python /path/to/venv-with-torch/bin/python] [--threads N]

Four trainings, one after another (never two at once), each for --minutes of
wall clock, evaluation time included on both sides:

  charrnn-defaults        charrnn train with nothing but the protocol flags
  charrnn-charrnn-recipe  charrnn with CHARRNN_RECIPE (2x128 plain LSTM, no dropout,
                          Adam 2e-3 constant), evaluated every --eval-seconds
  peer-charrnn-recipe     the peer with PEER_CHARRNN_RECIPE, same cadence
  peer-defaults           the peer with charrnn's previous defaults (2x256, dropout 0.25)

Protocol on every run: --val-frac of the corpus's tail is the validation
split and all of it is scored (charrnn --val-chars 0). Prints, per run, one
JSON line on stdout (best val nats and bpc, the minute it came, steps, the
val-nats-versus-minutes curve), then a markdown table and charrnn-defaults
minus the better peer run, in nats. Progress goes to stderr.
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # charrnn from this checkout when it is not installed

from charrnn.checkpoint import load  # noqa: E402
from charrnn.corpora import builtin_names, builtin_path  # noqa: E402

# char-rnn's recipe on charrnn; "EVAL" becomes "<eval-seconds>s". Turn off here
# every regulariser, schedule or layer norm that charrnn's defaults switch on.
CHARRNN_RECIPE = ["--hidden", "128", "--layers", "2", "--no-layer-norm", "--dropout", "0",
                  "--weight-drop", "0", "--output-dropout", "0", "--schedule", "constant", "--lr", "0.002",
                  "--optimizer", "adam", "--weight-decay", "0", "--average", "0",
                  "--beta2", "0.999", "--batch", "50", "--seq-len", "50", "--eval-every", "EVAL"]
# The flags every charrnn run gets: the validation protocol (0 = score the whole tail).
CHARRNN_PROTOCOL = ["--val-chars", "0", "--quiet"]
PEER_CHARRNN_RECIPE = ["--hidden", "128", "--layers", "2", "--dropout", "0"]
PEER_PREVIOUS_DEFAULTS = ["--hidden", "256", "--layers", "2", "--dropout", "0.25"]
RUNS = ("charrnn-defaults", "charrnn-charrnn-recipe", "peer-charrnn-recipe", "peer-defaults")
ALIASES = {"charrnn": "charrnn-defaults"}


def log(msg):
    print(f"[quality_budget] {msg}", file=sys.stderr, flush=True)


def charrnn_command():
    """The charrnn CLI for this Python: its console script, else the checkout's cli.py."""
    script = Path(sys.executable).parent / "charrnn"
    return [str(script)] if script.exists() else [sys.executable, str(ROOT / "cli.py")]


def has_torch(python):
    return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0


def summarise(name, curve, steps, chars_per_s, cmd, model=None):
    """curve: [(minutes, val_nats)] -> the run's JSON row (with ``model``,
    the size and regularisers a charrnn run chose, when known)."""
    best_min, best = min(curve, key=lambda p: p[1])
    return {"run": name, "best_val_nats": round(best, 4), "best_val_bpc": round(best / math.log(2), 4),
            "best_at_minutes": best_min, "steps": steps, "chars_per_s": chars_per_s,
            **({"model": model} if model else {}),
            "curve_minutes_val_nats": curve, "command": " ".join(cmd)}


def run_charrnn(name, a, extra):
    with tempfile.TemporaryDirectory(prefix="charrnn-budget-") as tmp:
        out = Path(a.keep) / name if a.keep else Path(tmp) / "run"
        cmd = charrnn_command() + ["train", a.corpus, "--minutes", str(a.minutes), "--val-frac",
                                   str(a.val_frac), *CHARRNN_PROTOCOL, "--out", str(out), "--overwrite",
                                   *extra]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        c = load(out, prefer="last").meta["model"]  # what auto-sizing chose
    model = (f"{c['layers']}x{c['hidden']}, dropout {c['dropout']:g}, weight drop {c['weight_drop']:g}, "
             f"output dropout {c['output_dropout']:g}")
    curve = [(round(r["elapsed_s"] / 60, 3), round(r["val_loss"], 4)) for r in rows]
    return summarise(name, curve, rows[-1]["step"], round(rows[-1].get("chars_per_s") or 0), cmd, model)


def run_peer(name, a, extra):
    cmd = [a.torch_python, a.peer, "train", a.corpus, "--minutes", str(a.minutes), "--val-frac",
           str(a.val_frac), "--eval-every", str(a.eval_seconds), *extra]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    curve = [(round(r["t"] / 60, 3), r["val_nats"]) for r in lines if "t" in r]
    final = lines[-1]
    return summarise(name, curve, final["steps"], final["chars_per_s"], cmd)


def plan(a):
    """The runs to do, as name -> (function, extra flags)."""
    recipe = [f"{a.eval_seconds:g}s" if x == "EVAL" else x for x in CHARRNN_RECIPE]
    runs = {"charrnn-defaults": (run_charrnn, []),
            "charrnn-charrnn-recipe": (run_charrnn, recipe),
            "peer-charrnn-recipe": (run_peer, PEER_CHARRNN_RECIPE),
            "peer-defaults": (run_peer, PEER_PREVIOUS_DEFAULTS)}
    wanted = [ALIASES.get(x, x) for x in a.only.split(",") if x] if a.only else list(RUNS)
    unknown = set(wanted) - set(RUNS)
    if unknown:
        sys.exit(f"unknown run(s) {sorted(unknown)}; choose from {', '.join(RUNS)}")
    if any(n.startswith("peer") for n in wanted) and not a.torch_python:
        log("skipping the peer runs: no Python with torch (give --torch-python)")
        wanted = [n for n in wanted if not n.startswith("peer")]
    return {n: runs[n] for n in RUNS if n in wanted}


def print_table(results, minutes):
    print(f"\n{minutes:g} minutes per run:\n")
    print("| run | best val nats | best val bpc | at minute | steps | chars/s |")
    print("|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['run']} | {r['best_val_nats']:.4f} | {r['best_val_bpc']:.4f} | "
              f"{r['best_at_minutes']:.2f} | {r['steps']} | {r['chars_per_s']} |")
    peers = [r["best_val_nats"] for n, r in results.items() if n.startswith("peer")]
    if "charrnn-defaults" in results and peers:
        diff = results["charrnn-defaults"]["best_val_nats"] - min(peers)
        print(f"\ncharrnn defaults minus the better peer run: {diff:+.4f} nats")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="a text file, or a built-in corpus name (builtin, pystdlib-small)")
    p.add_argument("--minutes", type=float, required=True, help="wall clock per run")
    p.add_argument("--torch-python", default=None,
                   help="a Python with torch, for the peer (default: this one, if it has torch)")
    p.add_argument("--peer", default=str(ROOT.parent / "shared" / "peers" / "torch_charlm.py"))
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(RUNS)}")
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--eval-seconds", type=float, default=None,
                   help="evaluation cadence of the recipe and peer runs (default: minutes*60/20, at least 10)")
    p.add_argument("--json", default=None, help="also append each run's JSON line to this file")
    p.add_argument("--keep", default=None,
                   help="keep charrnn's run directories in this directory (KEEP/<run name>), "
                        "for charrnn plot, sample or eval")
    p.add_argument("--threads", type=int, default=0, help="passed to both (0: their defaults)")
    a = p.parse_args()
    if a.eval_seconds is None:
        a.eval_seconds = max(10.0, a.minutes * 60 / 20)
    if a.corpus in builtin_names():  # the peer reads files: give both the assembled text
        a.corpus = str(builtin_path(a.corpus))
    if a.torch_python is None and has_torch(sys.executable):
        a.torch_python = sys.executable
    results = {}
    for name, (fn, extra) in plan(a).items():
        log(f"{name}: starting, {a.minutes:g} min")
        try:
            r = fn(name, a, extra)
        except subprocess.CalledProcessError as e:
            log(f"{name}: failed (exit {e.returncode}):\n{(e.stderr or '')[-2000:]}")
            continue
        results[name] = r
        log(f"{name}: done, best {r['best_val_nats']:.4f} nats ({r['best_val_bpc']:.4f} bpc) "
            f"at {r['best_at_minutes']:.2f} min, {r['steps']} steps")
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    if results:
        print_table(results, a.minutes)


if __name__ == "__main__":
    main()
