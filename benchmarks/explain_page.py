"""How long the explain page takes, and how big it is, for a text and a
model of the issue's size (20,000 characters, a 2x256 LSTM):

    python benchmarks/explain_page.py [CORPUS] [--chars 20000] [--hidden 256]

The model is untrained (the numbers' cost does not depend on the weights);
the text is the corpus's first characters (default: Tiny Shakespeare from
../shared, else the README). Prints seconds for the numbers (explain) and
for the whole page, and the page's size.
"""
import argparse
import tempfile
import time
from pathlib import Path

import charrnn
from charrnn import explain as E

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("corpus", nargs="?", default=None)
    p.add_argument("--chars", type=int, default=20_000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args()
    shared = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
    corpus = Path(a.corpus) if a.corpus else (shared if shared.exists() else ROOT / "README.md")
    text = corpus.read_text(encoding="utf-8")[:a.chars]
    model = charrnn.Model(len(charrnn.Vocab(text)), hidden=a.hidden, layers=a.layers)
    model.vocab = charrnn.Vocab(text)
    model.explain(text[:2000])  # compile, so that what is timed is the work
    t0 = time.perf_counter()
    model.explain(text)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "page.html"
        E.page(model, text, out)
        t2 = time.perf_counter()
        size = out.stat().st_size
    print(f"{corpus.name}: {len(text):,} characters, lstm {a.layers}x{a.hidden}: explain {t1 - t0:.2f} s, "
          f"page {t2 - t1:.2f} s, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
