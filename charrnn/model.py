"""Model: parameters in one flat buffer with PyTorch-named views, and the
orchestration of the kernels for a forward pass and truncated BPTT."""
import numpy as np

from . import checkpoint, explain, generate, parallel
from .errors import CharrnnError
from .kernels import backend
from .kernels import cpu as K
from .kernels.cells import cell_id, gates, saved_width
from .layout import check_memory, model_config, named_views, param_shapes


class Model:
    """A character-level language model: (embedding or one-hot) -> stacked
    RNN/GRU/LSTM -> linear decoder -> softmax.

    Parameters (``state_dict`` names and shapes are PyTorch's, so weights move
    to and from ``torch.nn.LSTM/GRU/RNN`` + ``nn.Linear``):

    - ``vocab_size`` V; ``cell``: "lstm", "gru" or "rnn"; ``hidden`` H;
      ``layers`` L;
    - ``embed``: None or 0 for one-hot input, else the embedding size E;
    - ``nonlinearity``: "tanh" or "relu" (``cell="rnn"`` only);
    - regularisers, in training passes only (inverted: kept values are
      scaled by 1/(1-p), so inference needs no change):
      ``dropout`` on each layer's output but the top one (PyTorch's
      ``nn.LSTM(dropout=...)``), ``output_dropout`` on the top layer's output
      (before the decoder), ``weight_drop`` on the entries of each W_hh
      (DropConnect, one mask per window, as AWD-LSTM), ``embed_dropout``
      on whole characters (rows of the embedding, or of W_ih0^T with
      one-hot input: one mask per window); ``locked_dropout``: the dropout
      masks hold for every time step of a window (one per stream and unit,
      "variational" dropout) instead of one per step; ``zoneout`` (LSTM
      only): in training each unit's cell keeps its previous value with this
      probability at each step, instead of taking the new one (Krueger et
      al. 2017); inference takes the expected share, 1 - zoneout, of each
      new value (the cell equations are in the README);
    - ``layer_norm`` (LSTM only): each gate block's pre-activation and the
      cell normalised over the units, with a gain and a bias each
      (``rnn.layer_norm_l{k}`` [2, 5H]; Ba, Kiros & Hinton 2016);
    - ``multiplicative``: the recurrent product of each layer reads
      m = (W_mx x + b_mx) * (W_mh h) instead of h, a transition that
      depends on the input (the multiplicative LSTM, Krause et al. 2016);
      W_mx and b_mx are the last H rows of ``rnn.weight_ih_l{k}`` and
      ``rnn.bias_ih_l{k}``, W_mh is ``rnn.weight_mh_l{k}`` [H, H];
    - ``seed``: initialisation (PyTorch's: uniform +-1/sqrt(H), embedding N(0,1))
      and dropout masks;
    - ``dtype``: float32; float64 exists for gradient checks (CPU only);
    - ``device``: "cpu", "cuda" or "auto"; weights and buffers live there.

    >>> m = Model(65, cell="lstm", hidden=32, layers=2)
    >>> logits, state = m.forward(np.zeros((4, 10), dtype=np.int32))
    >>> logits.shape
    (4, 10, 65)
    """

    def __init__(self, vocab_size, cell="lstm", hidden=256, layers=2, embed=None,
                 dropout=0.0, seed=0, nonlinearity="tanh", dtype=np.float32, device="cpu",
                 output_dropout=0.0, weight_drop=0.0, embed_dropout=0.0, locked_dropout=False,
                 layer_norm=False, zoneout=0.0, multiplicative=False):
        self.config = model_config(vocab_size, cell, hidden, layers, embed, dropout, nonlinearity,
                                   output_dropout, weight_drop, embed_dropout, locked_dropout,
                                   layer_norm, zoneout, multiplicative)
        self.dtype = np.dtype(dtype)
        self.backend = backend(device)
        self.device = "cpu" if self.backend is K else "cuda"
        if self.device == "cuda" and self.dtype != np.float32:
            raise CharrnnError("the CUDA backend computes in float32 only")
        self.cell_id = cell_id(cell, self.config["nonlinearity"], layer_norm)
        self.shapes = param_shapes(self.config)  # name -> shape, in the flat buffer's order
        n = sum(int(np.prod(s)) for s in self.shapes.values())
        # weights, gradients and two optimizer slots
        check_memory(4 * n * self.dtype.itemsize, f"training a model of {n:,} parameters")
        self.params = self.backend.zeros(n, dtype=self.dtype)  # every weight, one buffer
        self.grads = self.backend.zeros(n, dtype=self.dtype)   # their gradients, same layout
        self.weights = named_views(self.shapes, self.params)
        self.gradients = named_views(self.shapes, self.grads)
        self._rng = np.random.default_rng(seed)      # init, then dropout masks
        self._init_weights()
        # the LSTM's share of each new cell value at inference (kernels' ``update``)
        self.inference_update = self.backend.zeros((1, 1, 1), self.dtype)
        self.backend.put(self.inference_update, 1.0 - self.config["zoneout"])
        self._workspaces = {}
        self._transposed_weights = None  # the recurrent weights transposed, for BPTT
        self._dropped = {}     # name -> (mask, weights with the mask applied): weight_drop, embed_dropout
        self.vocab = None  # a Vocab, set by training or loading: the text methods need it

    # ------------------------------------------------------------ layout
    @property
    def offsets(self):
        """name -> where the parameter starts in ``params`` (and ``grads``)."""
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        return dict(zip(self.shapes, np.cumsum([0] + sizes[:-1]).tolist()))

    def _init_weights(self):
        bound = 1.0 / np.sqrt(self.config["hidden"])
        host = np.zeros(self.params.shape, self.dtype)
        for name, w in named_views(self.shapes, host).items():
            if name == "encoder.weight":
                w[...] = self._rng.standard_normal(w.shape)
            elif name.startswith("rnn.layer_norm"):  # gains 1, biases 0, as nn.LayerNorm
                w[0], w[1] = 1, 0
            else:
                w[...] = self._rng.uniform(-bound, bound, w.shape)
        self.backend.put(self.params, host)

    @property
    def num_params(self):
        return self.params.size

    @property
    def rng_state(self):
        """The state of the generator that draws the dropout masks (a
        checkpoint stores it, so that a resumed run draws the same masks).
        Each training pass draws, for the whole batch, in this order, each
        regulariser that is on: ``dropout``, one mask [T, B, H] per layer
        below the top, in layer order; ``output_dropout``, one [T, B, H];
        ``weight_drop``, one [G*H, H] per layer; ``embed_dropout``, one
        [V, 1]; ``zoneout``, one [T, B, H] per layer, in layer order. With
        ``locked_dropout`` the dropout masks are [1, B, H]. Each mask takes
        one key, ``integers(2**64, dtype=uint64)``, and is drawn from it by
        the kernel ``bernoulli_mask``: kept entries scaled by 1/(1-p)
        (zoneout's not scaled: 1 takes the new cell value, 0 keeps the
        old)."""
        return self._rng.bit_generator.state

    @rng_state.setter
    def rng_state(self, state):
        self._rng.bit_generator.state = state

    def state_dict(self):
        """Copies of the weights, keyed by PyTorch's parameter names."""
        return {name: np.array(self.backend.get(w)) for name, w in self.weights.items()}

    def load_state_dict(self, state):
        """Load weights by name; every name must be present with its shape."""
        missing = [n for n in self.shapes if n not in state]
        extra = [n for n in state if n not in self.shapes]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected {', '.join(extra)}"] if extra else [])
            raise CharrnnError("state_dict does not match the model: " + "; ".join(parts))
        for name, shape in self.shapes.items():
            w = np.asarray(state[name])
            if w.shape != shape:
                raise CharrnnError(f"{name} has shape {w.shape}, the model expects {shape}")
            if not np.all(np.isfinite(w)):
                raise CharrnnError(f"{name} holds non-finite values")
            self.backend.put(self.weights[name], w)

    # ------------------------------------------------------------ passes
    def initial_state(self, batch):
        """The zero state for ``batch`` streams: (h, c) for LSTM, (h,) else,
        each [layers, batch, hidden]."""
        L, H = self.config["layers"], self.config["hidden"]
        n = 2 if self.config["cell"] == "lstm" else 1
        return tuple(np.zeros((L, batch, H), dtype=self.dtype) for _ in range(n))

    def forward(self, x, state=None):
        """Logits [B,T,V] for ids ``x`` [B,T], and the state after the window.
        Inference: no dropout."""
        ids = self._ids(x)
        T, B = ids.shape
        ws = self._workspace(B, T, 0)
        self._feed(ws, ids, self._check_state(state, B))
        self._run_forward(ws, _NOISELESS)
        logits = self.backend.get(ws.logits).reshape(ws.T, ws.B, -1).transpose(1, 0, 2)
        return np.ascontiguousarray(logits), self._state_out(ws)

    def trace(self, x, state=None):
        """Inference over ids ``x`` [B,T], keeping what happens inside: a dict
        of host arrays ``logits`` [B,T,V], ``h`` [B,T,L,H] (each layer's
        output after each character), ``c`` [B,T,L,H] (LSTM cell states),
        ``gates`` [B,T,L,G*H] (LSTM i, f, g, o; GRU r, z, n; no RNN entry)
        and ``state``, the state to carry on. No dropout."""
        ids = self._ids(x)
        T, B = ids.shape
        ws = self._workspace(B, T, 0)
        self._feed(ws, ids, self._check_state(state, B))
        self._run_forward(ws, _NOISELESS)
        get = self.backend.get

        def batch_first(arrays):  # per layer [T,B,X] -> [B,T,L,X]
            return np.ascontiguousarray(np.stack([get(a) for a in arrays], axis=2).transpose(1, 0, 2, 3))
        out = {"logits": np.ascontiguousarray(get(ws.logits).reshape(T, B, -1).transpose(1, 0, 2)),
               "h": batch_first([lay.hs[1:] for lay in ws.layers]), "state": self._state_out(ws)}
        if self.config["cell"] == "lstm":
            out["c"] = batch_first([lay.cs[1:] for lay in ws.layers])
        if self.config["cell"] != "rnn":
            out["gates"] = batch_first([lay.gates for lay in ws.layers])
        return out

    def input_gradients(self, x, y, weights, state=None):
        """The gradient of sum(weights * loss) with respect to each input
        character, by the model's own BPTT: ids ``x``, targets ``y`` and
        ``weights`` [B,T] (loss[b,t] is the cross-entropy of y[b,t]); the
        incoming ``state`` is detached, as in training. Returns [B,T,D], D
        the embedding size, or V with one-hot input (the gradient with
        respect to the one-hot vector). No dropout; ``grads`` is untouched."""
        ids, targets = self._ids(x), self._ids(y, "y")
        if targets.shape != ids.shape or np.shape(weights) != x.shape:
            raise CharrnnError("x, y and weights must have the same [batch, time] shape")
        T, B = ids.shape
        K, get = self.backend, self.backend.get
        ws = self._workspace(B, T, 0)
        self._feed(ws, ids, self._check_state(state, B))
        K.put(ws.targets, targets.reshape(-1))
        self._run_forward(ws, _NOISELESS)
        K.softmax_cross_entropy(ws.dlogits, ws.logits, ws.targets, 1.0)
        w = np.asarray(weights, self.dtype).T.reshape(-1, 1)  # time-major rows
        K.put(ws.dlogits, get(ws.dlogits) * w)
        self._run_backward(ws, ws.grads(self), _NOISELESS, self._transposed(_NOISELESS))
        if self.config["embed"]:
            d = get(ws.demb).reshape(T, B, -1)
        else:  # layer 0's input projection is W_ih0 x: chain through it
            d = (get(ws.dxp).reshape(T * B, -1) @ get(self.weights["rnn.weight_ih_l0"])).reshape(T, B, -1)
        return np.ascontiguousarray(d.transpose(1, 0, 2))

    def loss(self, x, y, state=None):
        """Mean cross-entropy (nats) of targets ``y`` given ``x``, both [B,T],
        and the next state. Inference: no dropout, no gradients."""
        total, state = self.window(x, y, state)
        return total / np.size(x), state

    def loss_and_grads(self, x, y, state=None):
        """One training pass over a window: mean cross-entropy over B*T,
        gradients, and the next state.

        ``grads`` maps each ``state_dict`` name to a view of ``self.grads``
        (a host copy for a GPU model); the next call overwrites the views.
        Dropout, if any, applies here, with
        the same mask in the forward and backward pass.
        """
        loss, state = self.train_pass(x, y, state)
        return loss, {name: self.backend.get(g) for name, g in self.gradients.items()}, state

    def train_pass(self, x, y, state=None, regularise=True):
        """loss_and_grads without handing out the gradients: they stay in
        ``self.grads`` (on the device, for a GPU model) for the optimizer.
        ``regularise`` False: the gradients of the inference loss (no
        dropout, zoneout's expected share), as dynamic evaluation needs."""
        total, state = self.window(x, y, state, train=True, regularise=regularise)
        return total / np.size(x), state

    def window(self, x, y, state=None, train=False, part=None, regularise=True):
        """The summed cross-entropy of a window's targets ``y`` given ``x``
        (both [B,T]) and the next state; with ``train`` the gradients of the
        batch's mean loss land in ``self.grads``, and the regularisers
        (dropout, zoneout) are on unless ``regularise`` is False.

        ``part`` = (first, batch): these B streams are streams first ..
        first+B-1 of a batch of ``batch`` (the others on other MPI ranks):
        the gradients are then those of the whole batch's mean, and dropout
        uses the masks the whole batch draws, sliced to these streams
        (``rng_state`` says which).

        On the CPU the streams are cut into shards, one per thread
        (parallel.shard_cuts), each run by its own thread with a one-thread
        BLAS, and the shards' gradients summed in a fixed order.
        """
        ids, targets = self._ids(x), self._ids(y, "y")
        if targets.shape != ids.shape:
            raise CharrnnError(f"y has shape {targets.shape[::-1]}, x has {ids.shape[::-1]}")
        T, B = ids.shape
        first, batch = part or (0, B)
        if not 0 <= first <= first + B <= batch:
            raise CharrnnError(f"streams {first}..{first + B - 1} are not part of a batch of {batch}")
        state = self._check_state(state, B)
        noise = self._draw_noise(T, batch, slice(first, first + B)) if train and regularise \
            else _NOISELESS
        scale = 1.0 / (batch * T) if train else 0.0
        transposed = self._transposed(noise) if train else None  # BPTT reads W_hh transposed
        cuts = parallel.shard_cuts(B, None if self.device == "cpu" else 1)
        jobs = []
        for s in range(len(cuts) - 1):
            b = slice(cuts[s], cuts[s + 1])
            ws = self._workspace(b.stop - b.start, T, s)
            grads = self.gradients if s == 0 else ws.grads(self)
            part = None if state is None else tuple(a[:, b] for a in state)
            jobs.append((ws, ids[:, b], targets[:, b], part, noise.streams(b), grads,
                         scale, train, transposed))
        total = sum(parallel.run_shards(self._shard_pass, jobs))
        if train:
            for job in jobs[1:]:
                self.grads += job[0].grad_flat
        states = [self._state_out(job[0]) for job in jobs]
        return total, tuple(np.concatenate(parts, axis=1) for parts in zip(*states))

    def _shard_pass(self, ws, ids, targets, state, noise, grads, scale, train, transposed):
        self._feed(ws, ids, state)
        self.backend.put(ws.targets, targets.reshape(-1))
        self._run_forward(ws, noise)
        total = self.backend.softmax_cross_entropy(ws.dlogits, ws.logits, ws.targets, scale)
        if train:
            self._run_backward(ws, grads, noise, transposed)
        return total

    def _transposed(self, noise):
        """The recurrent weights of every layer, W_hh (weight-dropped, if
        ``noise`` drops them) and W_mh (multiplicative; else a stand-in),
        transposed, refreshed (shared by the shards): [(w_hh_t, w_mh_t)]."""
        c, K = self.config, self.backend
        if self._transposed_weights is None:
            H, L = c["hidden"], c["layers"]
            GH = gates(c["cell"], c["nonlinearity"]) * H
            MH = H if c["multiplicative"] else 1
            self._transposed_weights = [(K.zeros((H, GH), self.dtype), K.zeros((MH, MH), self.dtype))
                                        for _ in range(L)]
        for k, (w_hh_t, w_mh_t) in enumerate(self._transposed_weights):
            K.transpose(w_hh_t, noise.weight(self.weights, f"rnn.weight_hh_l{k}"))
            if c["multiplicative"]:
                K.transpose(w_mh_t, self.weights[f"rnn.weight_mh_l{k}"])
        return self._transposed_weights

    def _draw_noise(self, T, batch, streams):
        """The regularisers' masks for a training window of ``batch``
        streams (drawn for the whole batch, in ``rng_state``'s order, so that
        neither threads nor ranks change them), cut to ``streams``; the
        weights they drop are applied here, once for every shard."""
        c, K = self.config, self.backend
        L, H = c["layers"], c["hidden"]
        steps = 1 if c["locked_dropout"] else T
        between = [self._dropout_mask((steps, batch, H), c["dropout"])[:, streams]
                   for _ in range(L - 1)] if c["dropout"] else None
        top = self._dropout_mask((steps, batch, H), c["output_dropout"])[:, streams] \
            if c["output_dropout"] else None
        dropped = {}
        if c["weight_drop"]:
            for k in range(L):
                name = f"rnn.weight_hh_l{k}"
                dropped[name] = self._dropout_mask(self.shapes[name], c["weight_drop"])
        if c["embed_dropout"]:  # whole characters: rows of the table the ids pick
            name = "encoder.weight" if c["embed"] else "rnn.weight_ih_l0"
            rows = self._dropout_mask((c["vocab_size"], 1), c["embed_dropout"])
            dropped[name] = rows if c["embed"] else rows.T  # W_ih0 is [G*H, V]: columns
        updates = [self._mask((T, batch, H), c["zoneout"], 1.0)[:, streams]
                   for _ in range(L)] if c["zoneout"] else None
        for name, mask in dropped.items():
            if name not in self._dropped:
                shape = self.shapes[name]
                self._dropped[name] = (K.zeros(shape, self.dtype), K.zeros(shape, self.dtype))
            mask_buf, weights = self._dropped[name]
            K.put(mask_buf, mask)  # broadcast to the weights' shape
            K.apply_dropout(weights, self.weights[name], mask_buf)
        return _Noise(between, top, {name: self._dropped[name] for name in dropped}, updates)

    # ------------------------------------------------------------ text and files
    def sample(self, length, temperature=1.0, prime="", top_k=None, top_p=None, seed=None):
        """``length`` new characters after ``prime`` (the result starts with
        ``prime``). ``temperature`` 0 is argmax; ``top_k`` / ``top_p``
        restrict the draw to the k most likely / the nucleus of mass p; the
        same ``seed`` gives the same text."""
        return generate.sample(self, length, temperature, prime, top_k, top_p, seed)[0]

    def generate(self, length, temperature=1.0, prime="", top_k=None, top_p=None, seed=None):
        """``sample`` as an iterator of characters, produced as it runs."""
        for pieces in generate.generate(self, length, temperature, prime, top_k, top_p, seed):
            yield from pieces[0]

    def evaluate(self, text):
        """Bits per character of ``text``, the state carried over all of it."""
        return generate.score(self, text)["bpc"]

    def explain(self, text, skip_unknown=False):
        """The numbers behind ``charrnn explain`` for ``text``: surprisal,
        top guesses, activations [N, layers, H], gates, their saturation,
        the gradient's reach and the units worth a look, as NumPy arrays
        (``charrnn.explain.Explanation``)."""
        return explain.explain(self, text, skip_unknown)

    def save(self, path):
        """Write a checkpoint holding this model and its vocabulary."""
        if self.vocab is None:
            raise CharrnnError("this model has no vocabulary to save with it")
        checkpoint.save(path, checkpoint.Checkpoint(
            {"model": self.config, "vocab": self.vocab.to_dict()}, self.state_dict()))

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        """The model of a loaded ``checkpoint.Checkpoint`` on ``device``,
        with ``vocab`` set."""
        model = cls(**ckpt.meta["model"], device=device)
        model.load_state_dict(ckpt.params)
        model.vocab = ckpt.vocab
        if len(model.vocab) != model.config["vocab_size"]:
            raise CharrnnError("checkpoint's vocabulary does not match its model")
        return model

    # ------------------------------------------------------------ internals
    def _workspace(self, B, T, shard):
        ws = self._workspaces.get((B, T, shard))
        if ws is None:
            # room for training + validation shapes, a shard per thread each
            if len(self._workspaces) >= 4 * parallel.threads():
                self._workspaces.clear()
            ws = self._workspaces[B, T, shard] = _Workspace(self, B, T)
        return ws

    def _ids(self, x, name="x"):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise CharrnnError(f"{name} must be a non-empty [batch, time] array, not shape {x.shape}")
        if not np.issubdtype(x.dtype, np.integer):
            raise CharrnnError(f"{name} must hold integer ids, not {x.dtype}")
        V = self.config["vocab_size"]
        if x.min() < 0 or x.max() >= V:
            raise CharrnnError(f"{name} holds ids outside [0, {V})")
        return np.ascontiguousarray(x.T, dtype=np.int32)  # time-major [T, B]

    def _dropped_output(self, ws, k, mask):
        """Layer k's output [T*B, H], through ``mask`` (or as it is, for None)."""
        out = ws.layers[k].hs[1:].reshape(ws.T * ws.B, -1)
        if mask is None:
            return out
        lay = ws.layers[k]
        self.backend.put(lay.mask, mask)  # broadcast over the steps when locked
        self.backend.apply_dropout(lay.dropped, out, lay.mask)
        return lay.dropped

    def _run_forward(self, ws, noise):
        """Forward through ``ws`` (ids and state in place), with the
        regularisers of ``noise`` (a ``_Noise``)."""
        c, p, K = self.config, self.weights, self.backend
        L, T, B = c["layers"], ws.T, ws.B
        for k in range(L):
            lay = ws.layers[k]
            xp2 = lay.xp.reshape(T * B, -1)
            if k == 0 and not c["embed"]:
                # one-hot input: the projection is a row gather of W_ih^T
                K.transpose(ws.w_ih0_t, noise.weight(p, "rnn.weight_ih_l0"))
                K.embedding_forward(xp2, ws.w_ih0_t, ws.ids, p["rnn.bias_ih_l0"])
            else:
                if k == 0:
                    K.embedding_forward(ws.emb, noise.weight(p, "encoder.weight"), ws.ids, ws.zero_e)
                    inp = ws.emb
                else:
                    inp = self._dropped_output(ws, k - 1, noise.mask(k - 1, L))
                lay.inp = inp
                K.linear_forward(xp2, inp, p[f"rnn.weight_ih_l{k}"], p[f"rnn.bias_ih_l{k}"])
            if noise.updates is not None:  # zoneout's draws for this window
                K.put(lay.update, noise.updates[k])
            mult = (p.get(f"rnn.weight_mh_l{k}", ws.no_mult), lay.mhs, lay.ms)
            K.recurrent_forward(self.cell_id, lay.xp, noise.weight(p, f"rnn.weight_hh_l{k}"),
                                p[f"rnn.bias_hh_l{k}"], p.get(f"rnn.layer_norm_l{k}", ws.no_norm),
                                self._update(lay, noise), mult, lay.hs, lay.cs, lay.gates,
                                lay.saved, ws.gh)
        ws.top = self._dropped_output(ws, L - 1, noise.mask(L - 1, L))
        K.linear_forward(ws.logits, ws.top, p["decoder.weight"], p["decoder.bias"])

    def _run_backward(self, ws, g, noise, transposed):
        """BPTT through ``ws``, writing the gradients into the views ``g``;
        ``noise``: the forward pass's regularisers; ``transposed[k]``: layer
        k's recurrent weights (as the forward pass used them) transposed,
        W_hh and W_mh (a stand-in when not multiplicative)."""
        c, p, K = self.config, self.weights, self.backend
        L, H, T, B = c["layers"], c["hidden"], ws.T, ws.B
        dh = ws.dh_out.reshape(T * B, H)
        top_mask = noise.mask(L - 1, L)
        K.linear_backward(ws.ddropped if top_mask is not None else dh, g["decoder.weight"],
                          g["decoder.bias"], ws.dlogits, ws.top, p["decoder.weight"])
        if top_mask is not None:  # through the output dropout's mask
            K.apply_dropout(dh, ws.ddropped, ws.layers[L - 1].mask)
        for k in range(L - 1, -1, -1):
            lay = ws.layers[k]
            norm = f"rnn.layer_norm_l{k}"
            w_hh_t, w_mh_t = transposed[k]
            mult = (w_mh_t, lay.mhs, lay.ms, ws.dmhs, ws.dm, g.get(f"rnn.weight_mh_l{k}", ws.dno_mult))
            K.recurrent_backward(self.cell_id, ws.dh_out, w_hh_t, p.get(norm, ws.no_norm),
                                 self._update(lay, noise), mult, lay.xp, lay.hs, lay.cs, lay.gates,
                                 lay.saved, ws.dxp, ws.dgh, ws.dh_rec, ws.carry,
                                 g[f"rnn.weight_hh_l{k}"], g[f"rnn.bias_hh_l{k}"],
                                 g.get(norm, ws.dno_norm))
            noise.chain(K, g, f"rnn.weight_hh_l{k}")
            dxp2 = ws.dxp.reshape(T * B, -1)
            if k == 0 and not c["embed"]:
                K.embedding_backward(ws.w_ih0_t, g["rnn.bias_ih_l0"], dxp2, ws.ids)
                K.transpose(g["rnn.weight_ih_l0"], ws.w_ih0_t)
                noise.chain(K, g, "rnn.weight_ih_l0")
                continue
            mask = noise.mask(k - 1, L) if k else None
            dinp = ws.demb if k == 0 else ws.ddropped if mask is not None else dh
            K.linear_backward(dinp, g[f"rnn.weight_ih_l{k}"], g[f"rnn.bias_ih_l{k}"],
                              dxp2, lay.inp, p[f"rnn.weight_ih_l{k}"])
            if k == 0:
                K.embedding_backward(g["encoder.weight"], ws.dzero_e, ws.demb, ws.ids)
                noise.chain(K, g, "encoder.weight")
            elif mask is not None:  # the layer below gets the gradient through its mask
                K.apply_dropout(dh, ws.ddropped, ws.layers[k - 1].mask)

    def _update(self, lay, noise):
        """The kernels' ``update`` for layer buffers ``lay``: zoneout's draws
        (put there by the forward pass) when ``noise`` has them, else the
        inference share."""
        return self.inference_update if noise.updates is None else lay.update

    def _dropout_mask(self, shape, p):
        return self._mask(shape, p, 1.0 / (1.0 - p))

    def _mask(self, shape, p, value):
        """A new mask: ``value`` with probability 1 - ``p``, else 0, drawn
        from a key the generator gives (``rng_state``)."""
        mask = np.empty(shape, self.dtype)
        K.bernoulli_mask(mask, self._rng.integers(2**64, dtype=np.uint64), p, value)
        return mask

    def _check_state(self, state, B):
        """``state`` as a tuple of host arrays fit for ``B`` streams (or None)."""
        if state is None:
            return None
        want = self.initial_state(B)
        if not isinstance(state, (tuple, list)) or len(state) != len(want):
            raise CharrnnError(f"state must be a tuple of {len(want)} arrays "
                               f"[layers, batch, hidden] for a {self.config['cell']} model")
        state = tuple(np.asarray(s) for s in state)
        for s, w in zip(state, want):
            if s.shape != w.shape:
                raise CharrnnError(f"state has shape {s.shape} but this batch needs {w.shape} "
                                   "(a state from a different batch size or model?)")
        return state

    def _feed(self, ws, ids, state):
        """Time-major ids [T, B] and the incoming state (or None) into ``ws``."""
        self.backend.put(ws.ids, ids.reshape(-1))
        self._set_state_in(ws, state)

    def _set_state_in(self, ws, state):
        if state is None:
            for lay in ws.layers:
                self.backend.put(lay.hs[0], 0)
                self.backend.put(lay.cs[0], 0)
            return
        for k, lay in enumerate(ws.layers):
            self.backend.put(lay.hs[0], state[0][k])
            if len(state) == 2:
                self.backend.put(lay.cs[0], state[1][k])

    def _state_out(self, ws):
        get = self.backend.get
        h = np.stack([get(lay.hs[-1]) for lay in ws.layers])
        if self.config["cell"] == "lstm":
            return h, np.stack([get(lay.cs[-1]) for lay in ws.layers])
        return (h,)


class _Layer:
    """Per-layer buffers of one window, kept for the backward pass."""

    def __init__(self, zeros, cell, B, T, H, G, dtype, layer_norm, zoneout, multiplicative):
        z = lambda *s: zeros(s, dtype=dtype)  # noqa: E731
        self.xp = z(T, B, G * H + (H if multiplicative else 0))  # W_mx x + b_mx last
        self.hs = z(T + 1, B, H)
        # a cell's unused buffers are stand-ins with one per step (cpu.recurrent_forward)
        self.cs = z(T + 1, B, H) if cell == "lstm" else z(T + 1, 1, 1)
        S = saved_width(cell, H, layer_norm)
        self.saved = z(T, B, S) if S else z(T, 1, 1)
        self.gates = z(T, B, G * H) if cell != "rnn" else z(T, 1, 1)
        self.mask = z(T, B, H)      # dropout on this layer's output (between layers, or the top's)
        self.dropped = z(T * B, H)
        self.update = z(T, B, H) if zoneout else None  # zoneout's draws (recurrent_forward)
        # a multiplicative layer's h W_mh^T and m of each step (recurrent_forward)
        self.mhs = z(T, B, H) if multiplicative else z(T, 1, 1)
        self.ms = z(T, B, H) if multiplicative else z(T, 1, 1)
        self.inp = None


class _Workspace:
    """Every buffer of a forward + backward pass for one (B, T), allocated once
    and reused: no allocation per step or per window."""

    def __init__(self, model, B, T):
        c, dt, zeros = model.config, model.dtype, model.backend.zeros
        V, H, E = c["vocab_size"], c["hidden"], c["embed"]
        G = gates(c["cell"], c["nonlinearity"])
        self.B, self.T = B, T
        M = c["multiplicative"]
        self.layers = [_Layer(zeros, c["cell"], B, T, H, G, dt, c["layer_norm"], c["zoneout"], M)
                       for _ in range(c["layers"])]
        self.no_norm = zeros((2, 1), dt)   # the stand-in for layer_norm's weights when off
        self.dno_norm = zeros((2, 1), dt)
        self.no_mult = zeros((1, 1), dt)   # the stand-in for W_mh when not multiplicative
        self.dno_mult = zeros((1, 1), dt)
        self.dmhs = zeros((T, B, H), dt) if M else zeros((T, 1, 1), dt)
        self.dm = zeros((B, H), dt) if M else zeros((1, 1), dt)
        self.gh = zeros((B, G * H), dt)
        self.logits = zeros((T * B, V), dt)
        self.dlogits = zeros((T * B, V), dt)
        self.dh_out = zeros((T, B, H), dt)
        self.dxp = zeros((T, B, G * H + (H if M else 0)), dt)
        # GRU's recurrent gradient differs from dxp; the other cells share
        # it, but for a multiplicative layer's, which holds W_mx x's too
        self.dgh = zeros((T, B, G * H), dt) if c["cell"] == "gru" or M else self.dxp
        self.dh_rec = zeros((B, H), dt)
        self.carry = zeros((B, H), dt)
        if E:
            self.emb = zeros((T * B, E), dt)
            self.demb = zeros((T * B, E), dt)
            self.zero_e = zeros(E, dt)   # the encoder has no bias
            self.dzero_e = zeros(E, dt)
        else:
            self.w_ih0_t = zeros((V, G * H + (H if M else 0)), dt)
        self.ddropped = zeros((T * B, H), dt) if c["dropout"] or c["output_dropout"] else None
        self.top = None  # the decoder's input: the top layer's output, through its dropout
        self.ids = zeros(T * B, np.int32)
        self.targets = zeros(T * B, np.int32)
        self.grad_flat = None

    def grads(self, model):
        """Gradient views of the shard's own (shards other than the first
        cannot write into the model's)."""
        if self.grad_flat is None:
            self.grad_flat = np.zeros_like(model.grads)
            self.grad_views = named_views(model.shapes, self.grad_flat)
        return self.grad_views


class _Noise:
    """A training window's regularisers: dropout masks on the layers'
    outputs (``between``: one per layer below the top, ``top``: the top
    layer's; [T or 1, B, H] host arrays, or None when off), the weights
    they drop (``dropped``: name -> (mask, masked weights), backend
    arrays) and zoneout's draws (``updates``: one [T, B, H] host array per
    layer, or None when off)."""

    def __init__(self, between=None, top=None, dropped=None, updates=None):
        self.between, self.top, self.dropped = between, top, dropped or {}
        self.updates = updates

    def streams(self, b):
        """The same noise for the streams ``b`` of the batch (a shard)."""
        cut = lambda m: None if m is None else m[:, b]  # noqa: E731
        cut_all = lambda ms: None if ms is None else [cut(m) for m in ms]  # noqa: E731
        return _Noise(cut_all(self.between), cut(self.top), self.dropped, cut_all(self.updates))

    def mask(self, k, layers):
        """The dropout mask on layer k's output, or None."""
        if k == layers - 1:
            return self.top
        return None if self.between is None else self.between[k]

    def weight(self, weights, name):
        """The weights the pass uses for parameter ``name``: dropped, or as they are."""
        return self.dropped[name][1] if name in self.dropped else weights[name]

    def chain(self, K, grads, name):
        """The gradient of dropped weights, back to the weights: times the mask."""
        if name in self.dropped:
            K.apply_dropout(grads[name], grads[name], self.dropped[name][0])


_NOISELESS = _Noise()
