"""Loss curves as pictures: ``charrnn plot RUN... -o curves.png`` and
``charrnn train --plot``. Needs matplotlib (``pip install "charrnn[plot]"``)."""
import json
import math
from pathlib import Path

from . import checkpoint
from .errors import CharrnnError
from .files import atomic_write

LN2 = math.log(2)


def matplotlib_pyplot():
    """matplotlib's pyplot on a file-only backend, or a one-line error naming the extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharrnnError('plotting needs matplotlib: pip install "charrnn[plot]"') from None
    return plt


def read_metrics(run):
    """The rows of a run's metrics.jsonl; a run still training may have a
    last line half written, which is left out."""
    path = Path(run) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def run_label(run):
    """A legend entry from the run's configuration (its last checkpoint's
    metadata), or its directory name while it has none."""
    try:
        meta = checkpoint.load(run, prefer="last").meta
    except CharrnnError:
        return Path(run).name
    m, t = meta["model"], meta.get("train", {})
    return (f"{Path(run).name}: {m['cell']} {m['layers']}x{m['hidden']}, dropout {m['dropout']:g}"
            + (f", lr {t['lr']:g}" if "lr" in t else ""))


def plot_runs(runs, out):
    """Training and validation bits per character of each run, against
    steps and against minutes, overlaid, written to ``out`` (.png or .svg)."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise CharrnnError(f"the plot goes to a .png or .svg file, not {out.name}")
    plt = matplotlib_pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(runs):
        rows = read_metrics(run)
        colour = f"C{i % 10}"
        label = run_label(run)
        for ax, x in ((by_step, [r["step"] for r in rows]), (by_time, [r["elapsed_s"] / 60 for r in rows])):
            ax.plot(x, [r["val_bpc"] for r in rows], "-", color=colour, label=f"{label} (validation)")
            train = [(xi, r["train_loss"] / LN2) for xi, r in zip(x, rows) if r.get("train_loss") is not None]
            if train:
                ax.plot(*zip(*train), "--", color=colour, alpha=0.6, label=f"{label} (training)")
    for ax, xlabel in ((by_step, "step"), (by_time, "minutes")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per character")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format=out.suffix[1:].lower(), dpi=110)
    plt.close(fig)
