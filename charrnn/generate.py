"""Sampling, beam search and evaluation in bits per character."""
import codecs
import math

import numpy as np

from . import parallel
from .errors import CharrnnError
from .kernels import cpu as K
from .kernels.cells import gates, saved_width

CHARS_PER_CALL = 256  # characters per Numba call while streaming


def _check_sampling(length, temperature, top_k, top_p):
    if not isinstance(length, (int, np.integer)) or length < 0:
        raise CharrnnError(f"length must be a whole number >= 0, not {length!r}")
    if not temperature >= 0 or not math.isfinite(temperature):
        raise CharrnnError(f"temperature must be >= 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise CharrnnError(f"top-k must be >= 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise CharrnnError(f"top-p must be in (0, 1], not {top_p}")


def _vocab(model):
    if model.vocab is None:
        raise CharrnnError("this model has no vocabulary: load it from a checkpoint or train it")
    return model.vocab


def streams_for(model, S):
    """Stepping S streams: one Numba call per thread and chunk on the CPU, a
    step at a time through the model's own passes on a GPU."""
    return Streams(model, S) if model.device == "cpu" else DeviceStreams(model, S)


class Streams:
    """The buffers for stepping S streams one character at a time (CPU),
    split by hidden units over ``ranks`` threads (cpu.model_step; default:
    parallel.sampling_ranks). ``logits`` [S,V] predicts each stream's next
    character; ``hs``, ``cs`` [L,S,H] hold the state."""

    def __init__(self, model, S, ranks=None):
        c, dt = model.config, model.dtype
        H, L = c["hidden"], c["layers"]
        # the LN-LSTM normalises over all H units of a layer, and a multiplicative
        # layer's product reads all of m: one rank
        R = 1 if c["layer_norm"] or c["multiplicative"] else \
            min(ranks or parallel.sampling_ranks(H), H)
        self.model, self.S, self.R = model, S, R
        # the state is shared by the ranks, each writing its own hidden units
        shared = parallel.cache_aligned(hs=((L, 2, S, H), dt), cs=((L, 2, S, H), dt),
                                        flags=((K.barrier_flags_size(R),), np.int64))
        self._state, self._flags = (shared["hs"], shared["cs"]), shared["flags"]
        cuts = parallel.rank_cuts(H, R, dt.itemsize)
        self._ranks = [self._rank(model, S, r, cuts[r], cuts[r + 1]) for r in range(R)]

    @property
    def logits(self):
        return self._ranks[0]["scratch"][0]

    @property
    def hs(self):
        return self._state[0][:, 0]

    @property
    def cs(self):
        return self._state[1][:, 0]

    def _rank(self, model, S, r, j0, j1):
        """Rank r's weights (the rows of hidden units j0:j1), its buffers
        and its arguments to the kernels (cpu.model_step)."""
        c, dt, p = model.config, model.dtype, model.weights
        V, H, E, G = c["vocab_size"], c["hidden"], c["embed"] or 0, gates(c["cell"], c["nonlinearity"])
        rows = (np.arange(G)[:, None] * H + np.arange(j0, j1)).ravel()
        M = c["multiplicative"]  # one rank: its W_ih and b_ih rows are all of them
        in_rows = slice(None) if M else rows
        pieces = []
        for k in range(c["layers"]):
            w_ih = p[f"rnn.weight_ih_l{k}"][in_rows]
            norm = p[f"rnn.layer_norm_l{k}"] if c["layer_norm"] else np.zeros(2, dt)
            w_mh = p[f"rnn.weight_mh_l{k}"] if M else np.zeros(1, dt)
            pieces += [w_ih.T if k == 0 and not E else w_ih, p[f"rnn.weight_hh_l{k}"][rows],
                       p[f"rnn.bias_ih_l{k}"][in_rows], p[f"rnn.bias_hh_l{k}"][rows], norm, w_mh]
        starts = np.cumsum([0] + [x.size for x in pieces])
        GHr, E1 = G * (j1 - j0), max(E, 1)
        XPr, MS = (GHr + H, S) if M else (GHr, 1)  # xp's columns; mh and m's rows
        saved = max(1, saved_width(c["cell"], j1 - j0, c["layer_norm"]))
        a = parallel.cache_aligned(rparams=((starts[-1],), dt), logits=((S, V), dt),
                                   probs=((S, V), dt), ids=((S,), np.int32), xp=((S, XPr), dt),
                                   gates=((S, GHr), dt), gh=((S, GHr), dt), saved=((S, saved), dt),
                                   emb=((S, E1), dt), zero_e=((E1,), dt),
                                   mh=((MS, H if M else 1), dt), m=((MS, H if M else 1), dt))
        np.concatenate([np.ravel(x) for x in pieces], out=a["rparams"])
        off = model.offsets
        return {"net": (a["rparams"], starts[:-1].reshape(-1, 6).astype(np.int64), model.params,
                        model.inference_update[0]),
                "dims": (int(off.get("encoder.weight", -1)), int(off["decoder.weight"]), V, E, j0),
                "scratch": (a["logits"], a["xp"], a["gates"], a["gh"], a["saved"], a["emb"],
                            a["zero_e"], a["mh"], a["m"]),
                "sync": (self._flags, r, self.R), "ids": a["ids"], "probs": a["probs"]}

    def _run(self, kernel, *args):
        """kernel(cell, net, dims, state, scratch, sync, *args(rank)) on
        every rank at once (parallel.run_ranks)."""
        self._flags[:] = 0
        cell = self.model.cell_id

        def rank_call(n):
            r = self._ranks[n]
            kernel(cell, r["net"], r["dims"], self._state, r["scratch"], r["sync"],
                   *(a(r) if callable(a) else a for a in args))
        parallel.run_ranks(rank_call, self.R, lambda: K.release_barriers(self._flags))

    def _settle(self, steps):
        """After ``steps`` steps the state is in [:, steps % 2]: move it to [:, 0]."""
        if steps % 2:
            for a in self._state:
                a[:, 0] = a[:, 1]

    def feed(self, prime_ids):
        """Run the prime through the model (one batched pass); afterwards
        ``logits`` predicts the character after it. No prime: uniform."""
        for r in self._ranks:
            r["scratch"][0][:] = 0
        if len(prime_ids) == 0:
            return
        x = np.tile(np.asarray(prime_ids, dtype=np.int32), (self.S, 1))
        logits, state = self.model.forward(x)
        for r in self._ranks:
            r["scratch"][0][:] = logits[:, -1]
        for a, s in zip(self._state, state):
            a[:, 0] = s

    def step(self, ids):
        for r in self._ranks:
            r["ids"][:] = ids
        self._run(K.model_step, lambda r: r["ids"], 0, 0)
        self._settle(1)

    def reorder(self, parents):
        """Stream s continues from stream parents[s] (beam search)."""
        for a in self._state:
            a[:, 0] = a[:, 0][:, parents]

    def sample(self, n, uniforms, temperature, top_k, top_p):
        """Draw n characters per stream with ``uniforms`` [n, S]: [n, S] ids."""
        out = np.zeros((n, self.S), np.int32)
        rule = (float(temperature), int(top_k or 0), float(1.0 if top_p is None else top_p))
        self._run(K.generate, rule, uniforms, lambda r: r["ids"], lambda r: r["probs"], out)
        self._settle(n)
        return out


class DeviceStreams:
    """The same interface on a GPU model: each step is a one-character
    window of the model's forward pass, each draw one launch of the CUDA
    twin of pick_token."""

    def __init__(self, model, S):
        self.model, self.S = model, S
        self.state = None
        self.logits = np.zeros((S, model.config["vocab_size"]), np.float32)

    def feed(self, prime_ids):
        if len(prime_ids):
            logits, self.state = self.model.forward(np.tile(np.asarray(prime_ids), (self.S, 1)))
            self.logits = logits[:, -1]

    def step(self, ids):
        logits, self.state = self.model.forward(np.asarray(ids)[:, None], self.state)
        self.logits = logits[:, 0]

    def reorder(self, parents):
        self.state = tuple(s[:, parents] for s in self.state)

    def sample(self, n, uniforms, temperature, top_k, top_p):
        Kd = self.model.backend
        out = np.zeros((n, self.S), np.int32)
        ids, logits, u = Kd.zeros(self.S, np.int32), Kd.zeros(self.logits.shape), Kd.zeros(self.S, np.float64)
        for i in range(n):
            Kd.put(logits, self.logits)
            Kd.put(u, uniforms[i])
            Kd.pick_tokens(ids, logits, float(temperature), int(top_k or 0),
                           float(1.0 if top_p is None else top_p), u)
            out[i] = Kd.get(ids)
            self.step(out[i])
        return out


def _prime_ids(vocab, prime):
    if not prime:
        return np.zeros(0, np.int32)
    try:
        return vocab.encode(prime)
    except CharrnnError as e:
        raise CharrnnError(f"the prime has {str(e)[0].lower()}{str(e)[1:]}") from None


def generate(model, length, temperature=1.0, prime="", top_k=None, top_p=None, seed=None,
             num=1, stop=None):
    """Yield, chunk by chunk, a list of ``num`` text pieces (one per sample).

    The first pieces are the prime itself, as char-rnn prints it. A sample
    that produced ``stop`` ends there (its later pieces are empty); all end
    when every sample has stopped or reached ``length`` new characters.
    Bytes-mode models give text decoded as UTF-8, invalid bytes replaced.
    """
    _check_sampling(length, temperature, top_k, top_p)
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise CharrnnError(f"num must be a whole number >= 1, not {num!r}")
    vocab = _vocab(model)
    streams = streams_for(model, num)
    prime_ids = _prime_ids(vocab, prime)
    streams.feed(prime_ids)
    rng = np.random.default_rng(seed)
    decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(num)]
    text = lambda s, ids: (decoders[s].decode(vocab.decode(ids)) if vocab.mode == "bytes"  # noqa: E731
                           else vocab.decode(ids))
    tails = [""] * num  # the last len(stop)-1 characters, to find stop across chunks
    done = [False] * num
    if len(prime_ids):
        yield [text(s, prime_ids) for s in range(num)]
    left = length
    while left > 0 and not all(done):
        n = min(CHARS_PER_CALL, left)
        out = streams.sample(n, rng.random((n, num)), temperature, top_k, top_p)
        left -= n
        pieces = []
        for s in range(num):
            piece = "" if done[s] else text(s, out[:, s])
            if stop and piece:
                joined = tails[s] + piece
                hit = joined.find(stop)  # the tail holds no whole stop: it would have ended
                if hit >= 0:
                    piece = joined[len(tails[s]):hit + len(stop)]
                    done[s] = True
                tails[s] = joined[len(joined) - len(stop) + 1:]
            pieces.append(piece)
        yield pieces
    if vocab.mode == "bytes":
        yield [d.decode(b"", final=True) for d in decoders]


def sample(model, length, temperature=1.0, prime="", top_k=None, top_p=None, seed=None,
           num=1, stop=None):
    """``num`` samples as a list of str (each starting with ``prime``)."""
    texts = [""] * num
    for pieces in generate(model, length, temperature, prime, top_k, top_p, seed, num, stop):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts


def beam_search(model, length, prime="", width=8):
    """The most likely continuation of ``prime`` of ``length`` characters
    (approximately: beam search keeps the ``width`` best prefixes)."""
    _check_sampling(length, 1.0, None, None)
    if not isinstance(width, (int, np.integer)) or width < 1:
        raise CharrnnError(f"beam width must be a whole number >= 1, not {width!r}")
    vocab = _vocab(model)
    V = len(vocab)
    streams = streams_for(model, width)
    prime_ids = _prime_ids(vocab, prime)
    streams.feed(prime_ids)
    scores = np.full(width, -np.inf)
    scores[0] = 0.0  # all beams start identical: expand only one
    seqs = np.zeros((width, 0), np.int32)
    for n in range(length):
        z = streams.logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total = (scores[:, None] + logp).ravel()
        k = min(width, total.size)
        best = np.argpartition(-total, k - 1)[:k]
        best = best[np.lexsort((best, -total[best]))]  # by score, ties by index: deterministic
        parents, tokens = best // V, (best % V).astype(np.int32)
        scores = np.full(width, -np.inf)
        scores[:k] = total[best]
        seqs = np.concatenate([seqs[parents], tokens[:, None]], axis=1)
        if n < length - 1:
            streams.reorder(parents)
            streams.step(tokens)
    best = vocab.decode(seqs[0]) if length else vocab.decode([])
    head = vocab.decode(prime_ids)
    if vocab.mode == "bytes":
        return (head + best).decode("utf-8", "replace")
    return head + best


def read_text(model, path):
    """The file at ``path`` as the model reads it: UTF-8 text for a
    character model, raw bytes for a bytes model."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None
    if _vocab(model).mode == "chars":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CharrnnError(f"{path} is not valid UTF-8 text (byte {e.start})") from None
    return raw


def score_file(model, path, skip_unknown=False, scorer=None):
    """``score`` (or ``scorer``, with the same arguments) of the file at
    ``path`` (read_text), with its name in any error."""
    raw = read_text(model, path)
    try:
        return (scorer or score)(model, raw, skip_unknown=skip_unknown)
    except CharrnnError as e:
        raise CharrnnError(f"{path}: {e}") from None


def ids_to_score(model, text, skip_unknown=False):
    """The ids of ``text`` in the model's vocabulary (UTF-8 bytes for a
    bytes model), and how many unknown characters were skipped; at least 2
    ids (one to predict)."""
    vocab = _vocab(model)
    if vocab.mode == "bytes" and isinstance(text, str):
        text = text.encode("utf-8")
    ids = vocab.encode(text, skip_unknown=skip_unknown)
    if len(ids) < 2:
        raise CharrnnError("the text needs at least 2 known characters to be scored")
    return ids, len(text) - len(ids)


def score(model, text, skip_unknown=False, window=1024):
    """Score ``text`` with the state carried over all of it (one stream).

    Returns ``{"bpc", "nats", "perplexity", "chars", "skipped"}``: bits and
    nats per character over the ``chars`` characters predicted (all but the
    first) and how many unknown characters were skipped.
    """
    ids, skipped = ids_to_score(model, text, skip_unknown)
    total, state = 0.0, None
    for j in range(0, len(ids) - 1, window):
        x = ids[j:j + window]
        y = ids[j + 1:j + 1 + window]
        x = x[:len(y)]
        loss, state = model.loss(x[None, :], y[None, :], state)
        total += loss * len(y)
    nats = total / (len(ids) - 1)
    return {"bpc": nats / math.log(2), "nats": nats, "perplexity": math.exp(nats),
            "chars": len(ids) - 1, "skipped": skipped}
