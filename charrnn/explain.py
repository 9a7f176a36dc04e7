"""Seeing inside a model: the numbers behind ``charrnn explain`` (``explain``)
and the self-contained page that shows them (``page``).

For a text, the model's surprisal at every character, its top guesses, the
activation of every unit after every character, its gates and their
saturation, the units that track simple features of the text (inside
quotes, position in the line, ...) and how far back the gradient of the loss
reaches (Karpathy, Johnson & Fei-Fei, "Visualizing and Understanding
Recurrent Networks", 2015).
"""
import base64
import dataclasses
import html
import json
import math
from pathlib import Path

import numpy as np

from .errors import CharrnnError
from .files import atomic_write
from .kernels.cells import gates as gates_per_cell

WINDOW = 1024          # characters per pass, the state carried (as ``score``)
TOP_K = 5
MAX_CHARS = 20_000     # what the page shows at most, by default
MAX_SERIES_CELLS = 20_000 * 1024  # characters x unit series the page holds (4 bits each)
FEATURES = ("inside quotes", "inside brackets", "position in line", "after a newline", "inside a word")
SIGMOID_GATES = {"lstm": (("input", 0), ("forget", 1), ("output", 3)),  # name, block in gates
                 "gru": (("reset", 0), ("update", 1))}


@dataclasses.dataclass
class Explanation:
    """What ``explain`` finds; every array is indexed by character n of ``text``.

    - ``surprisal`` [N]: bits of character n given those before it (n = 0: NaN,
      nothing predicts the first);
    - ``top_ids``, ``top_probs`` [N, k]: the model's k best guesses for
      character n and their probabilities (row 0: -1 and NaN);
    - ``h`` [N, L, H]: each layer's output after character n; ``c``: the
      LSTM cell states (else None); ``gates`` [N, L, G, H]: LSTM i, f, g, o
      or GRU r, z, n (None for RNN);
    - ``saturation``: {layer: {gate: [H, 2]}}, the share of characters at
      which each unit's gate is below 0.1 and above 0.9;
    - ``reach`` [K+1]: the mean over ``reach_positions`` positions t of
      ||d loss_t / d x_{t-k}||, for k = 0..K;
    - ``units``: units worth a look, best first: dicts with layer, kind
      (h or c), unit, feature and corr (its correlation with the feature).
    """
    text: str
    ids: np.ndarray
    surprisal: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    h: np.ndarray
    c: np.ndarray
    gates: np.ndarray
    saturation: dict
    reach: np.ndarray
    reach_positions: int
    units: list
    skipped: int

    @property
    def bpc(self):
        """Bits per character over the predicted characters (all but the first)."""
        return float(np.nanmean(self.surprisal)) if len(self.surprisal) > 1 else math.nan


def explain(model, text, skip_unknown=False, reach=100, reach_positions=64, top_k=TOP_K):
    """The numbers behind the explain page for ``text`` (see Explanation)."""
    vocab = model.vocab
    if vocab is None:
        raise CharrnnError("this model has no vocabulary: load it from a checkpoint or train it")
    if vocab.mode == "bytes" and isinstance(text, str):
        text = text.encode("utf-8")
    before = len(text)
    try:
        ids = vocab.encode(text, skip_unknown=skip_unknown).astype(np.int32)
    except CharrnnError as e:
        raise CharrnnError(f"the text has {str(e)[0].lower()}{str(e)[1:]} (--skip-unknown skips them)") from None
    if len(ids) < 2:
        raise CharrnnError("the text needs at least 2 known characters to be explained")
    shown = vocab.decode(ids)
    if isinstance(shown, bytes):
        shown = shown.decode("latin-1")  # one symbol per byte, as the model reads them
    N, c = len(ids), model.config
    L, H = c["layers"], c["hidden"]
    surprisal = np.full(N, np.nan)
    top_ids = np.full((N, top_k), -1, np.int32)
    top_probs = np.full((N, top_k), np.nan, np.float32)
    h = np.zeros((N, L, H), np.float32)
    cs = np.zeros((N, L, H), np.float32) if c["cell"] == "lstm" else None
    G = gates_per_cell(c["cell"], c["nonlinearity"]) if c["cell"] != "rnn" else None  # RNN keeps none
    gates = np.zeros((N, L, G, H), np.float32) if G else None
    state = None
    for j in range(0, N, WINDOW):
        x = ids[j:j + WINDOW]
        tr = model.trace(x[None, :], state)
        state = tr["state"]
        n = len(x)
        h[j:j + n] = tr["h"][0]
        if cs is not None:
            cs[j:j + n] = tr["c"][0]
        if gates is not None:
            gates[j:j + n] = tr["gates"][0].reshape(n, L, G, H)
        z = tr["logits"][0].astype(np.float64)  # logits after char j+t predict char j+t+1
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        m = min(n, N - 1 - j)  # predictions that have a next character
        targets = ids[j + 1:j + 1 + m]
        surprisal[j + 1:j + 1 + m] = -logp[np.arange(m), targets] / math.log(2)
        k = min(top_k, logp.shape[1])
        best = np.argsort(-logp[:m], axis=1, kind="stable")[:, :k]
        top_ids[j + 1:j + 1 + m, :k] = best
        top_probs[j + 1:j + 1 + m, :k] = np.exp(np.take_along_axis(logp[:m], best, axis=1))
    reach_curve, positions = _gradient_reach(model, ids, h, cs, reach, reach_positions)
    return Explanation(
        text=shown, ids=ids, surprisal=surprisal, top_ids=top_ids, top_probs=top_probs, h=h, c=cs,
        gates=gates, saturation=_saturation(c["cell"], gates),
        reach=reach_curve, reach_positions=positions,
        units=_ranked_units(shown, h, cs), skipped=before - len(ids))


def _saturation(cell, gates):
    """{layer: {gate: [H, 2]}}: the share of characters at which each
    unit's sigmoid gate is below 0.1 (left) and above 0.9 (right)."""
    if gates is None:
        return {}
    return {k: {name: np.stack([(gates[:, k, g] < 0.1).mean(0), (gates[:, k, g] > 0.9).mean(0)], 1)
                for name, g in SIGMOID_GATES[cell]}
            for k in range(gates.shape[1])}


def _gradient_reach(model, ids, h, cs, K, positions):
    """Mean over up to ``positions`` evenly spaced characters t of
    ||d loss_t / d x_{t-k}|| for k = 0..K, by the model's own BPTT: each t is
    one stream of the K+1 characters up to it, its state carried in from the
    full pass (and detached, as in training). Returns the curve and how many
    positions it averages."""
    N = len(ids)
    K = min(K, N - 2)
    ts = np.unique(np.linspace(K, N - 2, num=min(positions, N - 1 - K)).astype(int))
    x = np.stack([ids[t - K:t + 1] for t in ts])
    y = np.stack([ids[t - K + 1:t + 2] for t in ts])
    weights = np.zeros(x.shape)
    weights[:, -1] = 1.0  # the loss of predicting character t+1 from t
    start = ts - K - 1    # the state after this character goes in (none before 0)
    state = None
    if (start >= 0).all():
        state = tuple(np.ascontiguousarray(a[start].transpose(1, 0, 2)) for a in (h, cs) if a is not None)
    elif (start >= 0).any():  # some streams start at the text's beginning: zero state there
        state = tuple(np.ascontiguousarray(np.where((start >= 0)[:, None, None], a[np.maximum(start, 0)], 0)
                                           .transpose(1, 0, 2)) for a in (h, cs) if a is not None)
    grads = model.input_gradients(x, y, weights, state)
    norms = np.linalg.norm(grads.astype(np.float64), axis=2)  # [P, K+1], position K is t itself
    return norms[:, ::-1].mean(axis=0), len(ts)


def text_features(text):
    """[N, 5] float features of each character, in FEATURES order."""
    N = len(text)
    f = np.zeros((N, len(FEATURES)))
    quote = depth = col = 0
    prev = "\n"
    for n, ch in enumerate(text):
        if ch == '"':
            quote ^= 1
        depth = max(0, depth + (ch in "([{") - (ch in ")]}"))
        col = 0 if prev == "\n" else col + 1
        f[n] = (quote, depth > 0, col, prev == "\n", ch.isalnum())
        prev = ch
    return f


def _ranked_units(text, h, cs, most=24):
    """The units whose activation tracks a simple feature of the text best
    (absolute correlation), at most two per feature in the first rounds, so
    that every feature gets a look."""
    series = [("h", h)] + ([("c", np.tanh(cs))] if cs is not None else [])
    f = text_features(text)
    f = (f - f.mean(0)) / np.where(f.std(0) > 0, f.std(0), np.inf)
    found = []
    for kind, a in series:
        N, L, H = a.shape
        flat = a.reshape(N, L * H)
        sd = flat.std(0, dtype=np.float64)
        # with the features standardised, corr = a^T f / (N sd_a): no centred copy of a
        corr = (flat.T @ f.astype(np.float32)).astype(np.float64) / N / np.where(sd > 1e-6, sd, np.inf)[:, None]
        for u, k in zip(*np.nonzero(np.abs(corr) > 0)):
            found.append((abs(corr[u, k]), int(k), kind, int(u) // H, int(u) % H, float(corr[u, k])))
    found.sort(key=lambda r: -r[0])
    picked, per_feature = [], {}
    for score, k, kind, layer, unit, r in found:
        if len(picked) == most:
            break
        if per_feature.get(k, 0) >= max(2, most // len(FEATURES)) or score == 0:
            continue
        if any(p["layer"] == layer and p["kind"] == kind and p["unit"] == unit for p in picked):
            continue
        per_feature[k] = per_feature.get(k, 0) + 1
        picked.append({"layer": layer, "kind": kind, "unit": unit, "feature": FEATURES[k],
                       "corr": round(r, 3)})
    return picked


# ----------------------------------------------------------------- the page

def page(model, text, out, title="", skip_unknown=False, max_chars=MAX_CHARS):
    """Write the explain page for ``text`` to ``out`` (one self-contained
    HTML file: data, script and styles inline, nothing fetched). Longer
    texts are cut to ``max_chars`` and bigger models to the units that fit,
    and the page says so. Returns the Explanation."""
    if not text:
        raise CharrnnError("the text to explain is empty")
    if not Path(out).resolve().parent.is_dir():
        raise CharrnnError(f"cannot write {out}: no directory {Path(out).resolve().parent}")
    full = len(text)
    cut = text[:max_chars]
    ex = explain(model, cut, skip_unknown=skip_unknown)
    notes = []
    if full > len(cut):
        notes.append(f"showing the first {len(cut):,} of {full:,} characters (--max-chars)")
    data = _page_data(model, ex, notes)
    data["title"] = title
    body = _TEMPLATE.replace("/*DATA*/", json.dumps(data, separators=(",", ":")).replace("</", "<\\/"))
    body = body.replace("<!--TITLE-->", html.escape(f"charrnn explain: {title}"))
    with atomic_write(Path(out)) as f:
        f.write(body.encode("utf-8"))
    return ex


def _b64(a):
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _page_data(model, ex, notes):
    """The JSON the page's script reads: quantised arrays as base64."""
    c = model.config
    N, L, H = ex.h.shape
    series = [("h", ex.h)] + ([("c", np.tanh(ex.c))] if ex.c is not None else [])
    units = H
    if N * L * H * len(series) > MAX_SERIES_CELLS:  # keep the first units of each layer
        units = max(1, MAX_SERIES_CELLS // (N * L * len(series)))
        notes.append(f"neurons: showing units 0-{units - 1} of {H} in each layer (the page's size limit)")
    acts = {}
    for kind, a in series:
        q = np.clip(np.rint((a[:, :, :units] + 1.0) * 7.5), 0, 15).astype(np.uint8)  # 16 levels on [-1, 1]
        q = q.transpose(1, 2, 0).reshape(-1)  # layer, unit, character
        if q.size % 2:
            q = np.append(q, 0)
        acts[kind] = _b64((q[0::2] << 4) | q[1::2])
    ranked = [u for u in ex.units if u["unit"] < units]
    s = np.nan_to_num(ex.surprisal, nan=0.0)
    width = min(40, N)
    window_mean = np.convolve(s, np.ones(width) / width, mode="valid")
    worst = []
    for i in np.argsort(-window_mean, kind="stable"):
        if all(abs(int(i) - w["start"]) >= width for w in worst):
            worst.append({"start": int(i), "end": int(i) + width, "bpc": round(float(window_mean[i]), 3)})
        if len(worst) == 5:
            break
    symbols = model.vocab.symbols
    symbols = list(symbols) if isinstance(symbols, str) else [chr(b) for b in symbols]
    return {
        "model": f"{c['cell']} {c['layers']}x{c['hidden']}", "chars": N, "bpc": ex.bpc,
        "skipped": ex.skipped, "notes": notes, "text": ex.text, "symbols": symbols,
        "surprisal": _b64(np.clip(np.rint(s * 100), 0, 65535).astype(np.uint16)),  # centibits
        "top_ids": _b64(np.where(ex.top_ids < 0, 0, ex.top_ids).astype(np.uint32)),
        "top_probs": _b64(np.clip(np.rint(np.nan_to_num(ex.top_probs) * 255), 0, 255).astype(np.uint8)),
        "top_k": ex.top_ids.shape[1], "layers": L, "hidden": H, "units": units,
        "activations": acts, "ranked": ranked, "worst": worst,
        "saturation": {str(k): {g: np.round(v, 4).tolist() for g, v in gs.items()}
                       for k, gs in ex.saturation.items()},
        "reach": [float(r) for r in ex.reach], "reach_positions": ex.reach_positions,
    }


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title><!--TITLE--></title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header,section{padding:10px 18px}
h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:14px 0 6px}
.note{color:#a40;font-weight:600}
#text{font:15px/1.6 "Noto Sans Mono CJK SC","Noto Sans CJK SC",ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;background:#fff;border:1px solid #ddd;padding:10px;max-height:60vh;overflow:auto}
#text span{cursor:default}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #888;padding:6px 8px;font:12px ui-monospace,monospace;display:none;box-shadow:0 2px 6px #0003;z-index:9}
.legend{display:inline-block;height:12px;width:220px;vertical-align:middle;border:1px solid #ccc}
.controls label{margin-right:12px}
#ranked button{margin:2px;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:18px}
svg{background:#fff;border:1px solid #ddd}
table{border-collapse:collapse} td{padding:1px 8px}
</style></head><body>
<header><h1 id="title"></h1><div id="summary"></div><div id="notes"></div></header>
<section class="controls">
<label>colour by <select id="mode"><option value="surprisal">surprisal</option><option value="neuron">a neuron</option></select></label>
<label>layer <select id="layer"></select></label>
<label>state <select id="kind"></select></label>
<label>unit <input id="unit" type="number" min="0" value="0" style="width:5em"></label>
<span id="legend"></span>
<div id="ranked"></div>
</section>
<section><div id="text"></div></section>
<section><h2>Worst stretches</h2><table id="worst"></table></section>
<section class="charts"><div><h2>Gate saturation</h2><div id="gates"></div></div>
<div><h2>Gradient reach</h2><div id="reach"></div></div></section>
<div id="tip"></div>
<script id="data" type="application/json">/*DATA*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const u16 = s => new Uint16Array(bytes(s).buffer), u32 = s => new Uint32Array(bytes(s).buffer);
const N = D.chars, chars = Array.from(D.text);
const surprisal = u16(D.surprisal), topIds = u32(D.top_ids), topProbs = bytes(D.top_probs);
const packed = {}; for (const k in D.activations) packed[k] = bytes(D.activations[k]);
function act(kind, layer, unit, n) {  // in [-1, 1]
  const i = (layer * D.units + unit) * N + n, b = packed[kind][i >> 1];
  return (((i & 1) ? b & 15 : b >> 4) / 7.5) - 1;
}
const show = c => c === "\n" ? "\u21b5" : c === " " ? "\u2423" : c === "\t" ? "\u21e5" : c;
function heat(bits) {  // 0 bits white, 8+ bits deep red
  const t = Math.min(1, bits / 8);
  return `rgb(255,${Math.round(255 - 200 * t)},${Math.round(255 - 230 * t)})`;
}
function diverge(v) {  // -1 blue, 0 white, +1 red
  const a = Math.round(255 - 200 * Math.abs(v));
  return v >= 0 ? `rgb(255,${a},${a})` : `rgb(${a},${a},255)`;
}
document.getElementById("title").textContent = "charrnn explain" + (D.title ? ": " + D.title : "");
document.getElementById("summary").textContent =
  `${D.model}, ${N.toLocaleString()} characters, ${D.bpc.toFixed(3)} bits per character` +
  (D.skipped ? `, ${D.skipped} unknown characters skipped` : "");
document.getElementById("notes").innerHTML = D.notes.map(n => `<div class="note">${n}</div>`).join("");
const box = document.getElementById("text"), spans = [];
const frag = document.createDocumentFragment();
chars.forEach((c, n) => {
  const s = document.createElement("span");
  s.textContent = c; s.dataset.i = n; spans.push(s); frag.appendChild(s);
});
box.appendChild(frag);
const sel = id => document.getElementById(id);
for (let k = 0; k < D.layers; k++) sel("layer").add(new Option(String(k), k));
for (const k in packed) sel("kind").add(new Option(k === "c" ? "cell state c" : "output h", k));
sel("unit").max = D.units - 1;
function recolour() {
  const mode = sel("mode").value;
  if (mode === "surprisal") {
    spans.forEach((s, n) => { s.style.background = heat(surprisal[n] / 100); });  // n = 0: 0 bits
    sel("legend").innerHTML = 'surprisal: 0 <span class="legend" style="background:linear-gradient(90deg,' +
      heat(0) + "," + heat(8) + ')"></span> 8+ bits';
  } else {
    const L = +sel("layer").value, k = sel("kind").value, u = Math.min(+sel("unit").value, D.units - 1);
    spans.forEach((s, n) => { s.style.background = diverge(act(k, L, u, n)); });
    sel("legend").innerHTML = `layer ${L} ${k}[${u}]: -1 <span class="legend" style="background:linear-gradient(90deg,` +
      diverge(-1) + "," + diverge(0) + "," + diverge(1) + ')"></span> +1';
  }
}
function choose(layer, kind, unit) {
  if (!(kind in packed)) kind = "h";
  sel("mode").value = "neuron"; sel("layer").value = layer; sel("kind").value = kind; sel("unit").value = unit;
  recolour();
}
["mode", "layer", "kind", "unit"].forEach(id => sel(id).addEventListener("change", recolour));
sel("ranked").innerHTML = D.ranked.length ? "units worth a look: " : "";
D.ranked.forEach(r => {
  const b = document.createElement("button");
  b.textContent = `L${r.layer} ${r.kind}[${r.unit}] ${r.feature} (${r.corr > 0 ? "+" : ""}${r.corr})`;
  b.addEventListener("click", () => choose(r.layer, r.kind, r.unit));
  sel("ranked").appendChild(b);
});
const tip = sel("tip");
box.addEventListener("mousemove", e => {
  const n = +(e.target.dataset && e.target.dataset.i);
  if (e.target === box || isNaN(n)) { tip.style.display = "none"; return; }
  let h = `<b>${show(chars[n])}</b> `;
  if (n === 0) h += "(the first character: nothing predicts it)";
  else {
    h += `${(surprisal[n] / 100).toFixed(2)} bits<br>guesses:`;
    for (let k = 0; k < D.top_k; k++) {
      const id = topIds[n * D.top_k + k];
      h += `<br>${show(D.symbols[id])} ${(100 * topProbs[n * D.top_k + k] / 255).toFixed(1)}%`;
    }
  }
  if (sel("mode").value === "neuron")
    h += `<br>neuron: ${act(sel("kind").value, +sel("layer").value, +sel("unit").value, n).toFixed(2)}`;
  tip.innerHTML = h; tip.style.display = "block";
  tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px";
});
box.addEventListener("mouseleave", () => { tip.style.display = "none"; });
D.worst.forEach(w => {
  const tr = sel("worst").insertRow();
  tr.insertCell().textContent = w.bpc.toFixed(2) + " bits/char";
  tr.insertCell().textContent = chars.slice(w.start, w.end).map(show).join("");
  tr.style.cursor = "pointer";
  tr.addEventListener("click", () => spans[w.start].scrollIntoView({block: "center"}));
});
const NS = "http://www.w3.org/2000/svg";
function svg(w, h) { const s = document.createElementNS(NS, "svg"); s.setAttribute("width", w); s.setAttribute("height", h); return s; }
function el(parent, name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  parent.appendChild(e); return e;
}
const colours = {input: "#1f77b4", forget: "#d62728", output: "#2ca02c", reset: "#9467bd", update: "#ff7f0e"};
const layers = Object.keys(D.saturation);
if (!layers.length) sel("gates").textContent = "This cell has no gates.";
layers.forEach(k => {
  const s = svg(230, 250), P = 30, W = 190;
  el(s, "text", {x: 5, y: 14, "font-size": 12}, `layer ${k}`);
  el(s, "rect", {x: P, y: 20, width: W, height: W, fill: "none", stroke: "#999"});
  el(s, "line", {x1: P, y1: 20 + W, x2: P + W, y2: 20, stroke: "#ddd"});
  el(s, "text", {x: P, y: 20 + W + 26, "font-size": 10}, "fraction left-saturated (< 0.1) \u2192");
  el(s, "text", {x: 12, y: 20 + W, "font-size": 10, transform: `rotate(-90 12 ${20 + W})`}, "right-saturated (> 0.9) \u2192");
  for (const g in D.saturation[k]) D.saturation[k][g].forEach(([l, r]) =>
    el(s, "circle", {cx: P + l * W, cy: 20 + W - r * W, r: 2.2, fill: colours[g], "fill-opacity": 0.6}));
  let y = 34;
  for (const g in D.saturation[k]) { el(s, "text", {x: P + 6, y, "font-size": 10, fill: colours[g]}, g); y += 12; }
  sel("gates").appendChild(s);
});
(function reach() {
  const r = D.reach, s = svg(420, 250), P = 40, W = 360, Hh = 190;
  if (!r.length) { sel("reach").textContent = "The text is too short."; return; }
  const lo = Math.log10(Math.max(1e-12, Math.min(...r.filter(v => v > 0)))), hi = Math.log10(Math.max(...r));
  const X = k => P + W * k / Math.max(1, r.length - 1), Y = v => 20 + Hh - Hh * (Math.log10(Math.max(v, 1e-12)) - lo) / Math.max(1e-9, hi - lo);
  el(s, "rect", {x: P, y: 20, width: W, height: Hh, fill: "none", stroke: "#999"});
  el(s, "polyline", {points: r.map((v, k) => `${X(k)},${Y(v)}`).join(" "), fill: "none", stroke: "#1f77b4", "stroke-width": 1.6});
  el(s, "text", {x: P, y: 20 + Hh + 16, "font-size": 10}, "0");
  el(s, "text", {x: P + W - 20, y: 20 + Hh + 16, "font-size": 10}, String(r.length - 1));
  el(s, "text", {x: P + 90, y: 20 + Hh + 30, "font-size": 11}, "k: characters back");
  el(s, "text", {x: 2, y: 28, "font-size": 10}, hi.toFixed(1));
  el(s, "text", {x: 2, y: 20 + Hh, "font-size": 10}, lo.toFixed(1));
  el(s, "text", {x: P + 6, y: 34, "font-size": 11}, `log10 \u2016\u2202loss_t/\u2202x_(t\u2212k)\u2016, mean of ${D.reach_positions} positions`);
  sel("reach").appendChild(s);
})();
function fromHash() {  // #layer=0&kind=h&unit=5 chooses a neuron
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.has("unit")) choose(+(p.get("layer") || 0), p.get("kind") || "h", +p.get("unit"));
  else recolour();
}
window.addEventListener("hashchange", fromHash);
fromHash();
document.body.dataset.ready = "1";
</script></body></html>
"""
