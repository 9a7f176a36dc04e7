"""The training loop: windows, validation, early stop, progress, metrics,
checkpoints, exact resume and clean interruption."""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from . import checkpoint as ckpt_io
from . import corpora, distributed, parallel, sizing
from .files import atomic_write
from .data import IdCache, Vocab, Windows, encode_files, split, worth_caching
from .errors import CharrnnError
from .kernels import backend
from .kernels.cells import MIN_NORMALISED_UNITS, NORMALISED
from .model import Model
from .paths import cache_dir
from .rundir import RunDir
from .optim import OPTIMIZERS, SCHEDULES, Optimizer, Schedule
from .plot import matplotlib_pyplot, plot_runs

LN2 = math.log(2)
DEFAULT_MINUTES = 10.0
EXPLODE_FACTOR = 3.0  # char-rnn stops when the loss passes 3x its first value
ADAMW_DECAY = 0.05    # --weight-decay auto with adamw: 0.01 faded with the rate in the decay (README)


@dataclasses.dataclass
class TrainConfig:
    """Every training option, with its default (chosen by measurement on Tiny
    Shakespeare, 2 CPU cores: see the README)."""
    cell: str = "lstm"            # lstm | gru | rnn
    hidden: int = None            # units per layer; None: auto (sizing.choose)
    layers: int = None            # None: auto
    embed: int = 0                # 0: one-hot input, else embedding size
    dropout: float = None         # between layers, training only; None: auto
    nonlinearity: str = "tanh"    # rnn only: tanh | relu
    output_dropout: float = None  # on the top layer's output; None: auto
    weight_drop: float = None     # DropConnect on W_hh, one mask per window; None: auto
    embed_dropout: float = 0.0    # whole characters of the input, one mask per window
    locked_dropout: bool = False  # one dropout mask per stream for all steps of a window
    layer_norm: bool = None       # LSTM: gate blocks and cell layer-normalised; None: auto (on for the LSTM)
    zoneout: float = 0.0          # LSTM: each unit's cell keeps its old value with this probability per step
    multiplicative: bool = False  # the recurrent product reads (W_mx x) * (W_mh h) (the mLSTM)
    epoch_shift: bool = False     # each epoch after the first starts the streams at a seeded random place
    average: float = 0.999        # decay of the weights' moving average (evaluated, saved as best), 0 = off;
                                  # warmed up, its horizon is ~t/9 updates to 9,000, then 1,000 (README)
    seq_len: int = 50             # T: characters per window (BPTT length)
    batch: int = 32               # B: parallel streams (32 beat 50 and 20 in 10 minutes: README)
    lr: float = 6e-3
    optimizer: str = "adamw"      # adamw | adam | rmsprop | adagrad | sgd
    beta2: float = 0.999          # adam and adamw: the decay of the squared gradients' average
    momentum: float = 0.0         # rmsprop and sgd
    weight_decay: float = None    # None: auto, ADAMW_DECAY with adamw (decoupled), else 0 (L2 for the others)
    clip: float = 5.0             # global gradient-norm clip, 0 = off
    schedule: str = "linear"      # constant | cosine | linear | step
    warmup: int = 0               # steps of linear warm-up
    decay: float = 0.5            # step schedule: factor ...
    decay_every: int = 0          # ... every this many steps (0: a third of the budget)
    decay_start: float = 0.5      # cosine and linear: the share of the budget at the full rate first
    lr_end: float = 0.1           # cosine and linear: the rate at the budget's end, a share of lr
    steps: int = None             # budget: whichever of steps/epochs/minutes comes first
    epochs: float = None
    minutes: float = None         # none of the three given: DEFAULT_MINUTES
    val_frac: float = 0.05        # tail share held out for validation
    val_chars: int = 262144       # ... of which each validation scores the first so many, 0 = all
    eval_every: object = "auto"   # validations and checkpoints: every N steps, "Ns", "Nm", "Ne" (epochs) or auto
    patience: int = 0             # stop after this many evals without improvement, 0 = off
    out: str = "run"              # run directory
    seed: int = 0
    threads: int = 0              # 0: all cores
    bytes: bool = False           # byte vocabulary instead of characters
    device: str = "cpu"
    quiet: bool = False
    plot: bool = False            # write curves.png into the run directory at each evaluation

    # a resumed run takes these from its checkpoint: they decide the numbers
    FIXED_ON_RESUME = ("cell", "hidden", "layers", "embed", "dropout", "nonlinearity",
                       "output_dropout", "weight_drop", "embed_dropout", "locked_dropout",
                       "layer_norm", "zoneout", "multiplicative", "average",
                       "epoch_shift", "seq_len", "batch", "optimizer", "val_frac", "val_chars",
                       "seed", "bytes")

    def __post_init__(self):
        self.out = os.fspath(self.out)  # a Path is welcome; checkpoints store JSON

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise CharrnnError(msg)
        for name in ("hidden", "layers", "seq_len", "batch"):
            v = getattr(self, name)
            need((v is None and name in ("hidden", "layers")) or isinstance(v, int) and v >= 1,
                 f"--{name.replace('_', '-')} must be a whole number >= 1, not {v!r}")
        for name in ("embed", "warmup", "patience", "threads", "decay_every", "seed", "val_chars"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"--{name.replace('_', '-')} must be a whole number >= 0, not {v!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, not {self.lr}")
        need(0 <= self.clip and math.isfinite(self.clip), f"--clip must be >= 0, not {self.clip}")
        need(0 < self.decay <= 1, f"--decay must be in (0, 1], not {self.decay}")
        need(0 <= self.decay_start < 1, f"--decay-start must be in [0, 1), not {self.decay_start}")
        need(0 <= self.lr_end <= 1, f"--lr-end must be in [0, 1], not {self.lr_end}")
        need(0 <= self.beta2 < 1, f"--beta2 must be in [0, 1), not {self.beta2}")
        need(self.weight_decay is None or 0 <= self.weight_decay < math.inf,
             f"--weight-decay must be >= 0, not {self.weight_decay}")
        for name in ("dropout", "output_dropout", "weight_drop", "embed_dropout", "zoneout", "average"):
            v = getattr(self, name)
            need((v is None and name not in ("zoneout", "average")) or isinstance(v, (int, float)) and 0 <= v < 1,
                 f"--{name.replace('_', '-')} must be in [0, 1), not {v!r}")
        Cadence.parse(self.eval_every)
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
        backend(self.device)  # a GPU asked for but missing: say so before reading data
        if self.plot:
            matplotlib_pyplot()  # missing: say so now, not at the first evaluation
        for name in ("steps", "epochs", "minutes"):
            v = getattr(self, name)
            need(v is None or v > 0, f"--{name} must be > 0, not {v}")
        need(0 < self.val_frac < 1, f"--val-frac must be in (0, 1), not {self.val_frac}")
        need(not self.zoneout or self.cell == "lstm", f"--zoneout is for --cell lstm, not {self.cell}")
        need(not self.layer_norm or self.cell in NORMALISED,
             f"--layer-norm is for --cell {' or '.join(NORMALISED)}, not {self.cell}")
        need(not self.layer_norm or self.hidden is None or self.hidden >= MIN_NORMALISED_UNITS,
             f"--layer-norm needs --hidden {MIN_NORMALISED_UNITS} or more (over one unit a layer "
             f"norm is its bias alone, over two a step), not {self.hidden}; or --no-layer-norm")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often a run validates and checkpoints: every ``every`` steps,
    seconds or epochs (``unit``); ``auto`` by the clock also waits ten
    times as long as the last validation took, so that validating costs
    at most a tenth of the budget."""
    every: float
    unit: str  # "steps" | "seconds" | "epochs"
    auto: bool = False

    UNITS = {"s": ("seconds", 1), "m": ("seconds", 60), "e": ("epochs", 1)}

    @classmethod
    def parse(cls, spec):
        """--eval-every: N (steps), "Ns" / "Nm" (seconds / minutes, the
        run's clock), "Ne" (epochs, may be a fraction), or "auto" (None:
        the run decides from its budget, ``for_budget``)."""
        if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
            return cls(spec, "steps")
        text = str(spec).strip().lower()
        if text == "auto":
            return None
        unit, factor = cls.UNITS.get(text[-1:], ("steps", 1))
        number = text[:-1] if text[-1:] in cls.UNITS else text
        try:
            every = float(number) * factor
        except ValueError:
            every = math.nan
        if not (every > 0 and math.isfinite(every)) or (unit == "steps" and every != int(every)):
            raise CharrnnError(f"--eval-every must be a whole number of steps, or a number followed "
                               f"by s, m or e (seconds, minutes, epochs), or auto; not {spec!r}")
        return cls(int(every) if unit == "steps" else every, unit)

    @classmethod
    def for_budget(cls, max_steps, minutes):
        """auto: twenty validations over the budget, by steps when it has a
        step count (the same checkpoints every run), else by the clock,
        at least every 5 seconds and at most every 5 minutes."""
        if max_steps:
            return cls(max(1, round(max_steps / 20)), "steps")
        return cls(min(300.0, max(5.0, minutes * 60 / 20)), "seconds", auto=True)

    def due(self, step, steps_per_epoch, clock, last_clock, last_cost=0.0):
        """Whether a validation is due after update number ``step`` (1-based),
        the run's clock at ``clock`` seconds, the last validation at
        ``last_clock``, having taken ``last_cost`` seconds."""
        if self.unit == "seconds":
            return clock - last_clock >= (max(self.every, 10 * last_cost) if self.auto else self.every)
        every = self.every if self.unit == "steps" else max(1, round(self.every * steps_per_epoch))
        return step % every == 0


@dataclasses.dataclass
class Progress:
    """Where a run stands: what its checkpoints store so that a resumed run
    continues exactly as if it had never stopped."""
    step: int = 0                 # updates done
    best_val: float = math.inf    # the lowest validation loss so far
    bad_evals: int = 0            # evaluations since it improved (--patience)
    first_loss: float = None      # the first training loss (divergence is 3x it)
    loss_sum: float = 0.0         # training losses since the last evaluation ...
    loss_count: int = 0           # ... and how many
    elapsed_s: float = 0.0        # training time before this process
    last_eval_s: float = 0.0      # the run's clock at the last validation (a cadence in seconds)
    corpus_chars: int = 0         # the corpus it was trained on, as a check on resume
    rng: dict = None              # the dropout masks' generator

    @classmethod
    def from_dict(cls, d):
        """A checkpoint's progress, each field checked for its type."""
        try:
            p = cls(**d)
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                     for v in (p.step, p.best_val, p.bad_evals, p.loss_sum, p.loss_count,
                               p.elapsed_s, p.last_eval_s, p.corpus_chars)) and isinstance(p.rng, dict)
        except TypeError:
            ok = False
        if not ok:
            raise CharrnnError("the checkpoint's training progress is not readable")
        return p


class TrainingStopped(CharrnnError):
    """Training ended early: interrupted (exit 130/143) or diverged (exit 1).
    ``model`` holds the model as it was at the last good step."""

    def __init__(self, message, exit_code, model=None):
        super().__init__(message)
        self.exit_code, self.model = exit_code, model


def train(corpus, resume=None, overwrite=False, **options):
    """Train a model on ``corpus`` and return it (with ``model.vocab`` set).

    ``corpus``: a path, a list of paths, a directory, a built-in corpus name
    or a registry name (see ``charrnn.corpora``). ``options``: the fields of
    ``TrainConfig``. ``resume``: a run directory or checkpoint to continue
    exactly (model, data and optimizer options then come from it; passing a
    different value for one of them is an error). The run directory
    (``out``) is this process's alone while it trains; one that already
    holds a run is refused unless it is the one resumed, or ``overwrite``
    is given (its run is then deleted).

    >>> model = charrnn.train("input.txt", hidden=128, steps=1000)  # doctest: +SKIP
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise CharrnnError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    world = distributed.world()
    source = ckpt_io.resolve(resume, prefer="last") if resume is not None else None
    run_dir = RunDir(options.get("out", source.parent if source else TrainConfig.out))
    resuming_here = source is not None and source.parent.resolve() == run_dir.path.resolve()
    if overwrite and resuming_here:
        raise CharrnnError("--overwrite deletes the run that --resume continues: give one of them")
    with _claimed(run_dir, world, resuming_here, overwrite):
        saved = ckpt_io.load(source, training=True) if source is not None else None
        cfg = _config({**options, "out": str(run_dir.path)}, saved)
        if world.size > 1:
            _check_ranks(cfg, run_dir, world)
        paths = [p for spec in ([corpus] if isinstance(corpus, (str, os.PathLike)) else corpus)
                 for p in corpora.resolve(str(spec))]
        with parallel.thread_limit(cfg.threads):
            return _Run(cfg, paths, saved, run_dir, world).loop()


@contextlib.contextmanager
def _claimed(run_dir, world, resuming, overwrite):
    """Rank 0 (the only process without MPI) owns the run directory for the
    block; every rank learns whether it could, and stops with it if not."""
    with contextlib.ExitStack() as stack:
        problem = None
        if world.rank == 0:
            try:
                stack.enter_context(run_dir.claim(resuming=resuming, overwrite=overwrite))
            except CharrnnError as e:
                problem = str(e)
        world.agree(problem)
        yield


def _check_ranks(cfg, run_dir, world):
    """Under mpiexec: every rank has the same options and a stream of its
    own, on the CPU, and sees the run directory rank 0 writes (one shared
    file system, else checkpoints could not be resumed from any host)."""
    world.agree(None if cfg.batch >= world.size else
                f"--batch {cfg.batch} has fewer streams than the {world.size} ranks")
    world.agree(None if cfg.device == "cpu" else "training over MPI runs on the CPU (--device cpu)")
    world.same_everywhere("options", json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    token = world.broadcast(os.urandom(8).hex())
    probe = run_dir.path / ".ranks"
    if world.rank == 0:
        with atomic_write(probe) as f:
            f.write(token.encode("ascii"))
    world.agree(None)  # rank 0 has written it
    try:
        seen = probe.read_text(encoding="ascii")
    except OSError:
        seen = None
    world.agree(None if seen == token else
                f"cannot see the run directory {run_dir.path} that rank 0 writes: it must be on "
                f"a file system every host shares")


def _config(options, saved):
    if saved is None:
        cfg = TrainConfig(**options)
    else:
        # runs saved before --val-chars scored all, before --beta2 and --lr-end had 0.999 and
        # 0.1, before --epoch-shift read every epoch alike, before --layer-norm, --zoneout, --average
        kept = {"val_chars": 0, "beta2": 0.999, "lr_end": 0.1, "epoch_shift": False,
                "layer_norm": False, "zoneout": 0.0, "multiplicative": False, "average": 0.0,
                **saved.meta.get("train", {})}
        for key in TrainConfig.FIXED_ON_RESUME:
            if key in options and options[key] != kept.get(key):
                raise CharrnnError(f"--{key.replace('_', '-')} {options[key]!r} differs from the "
                                   f"resumed run's {kept.get(key)!r}; leave it out when resuming")
        if {"steps", "epochs", "minutes"} & set(options):  # a new budget replaces the old
            kept = {k: v for k, v in kept.items() if k not in ("steps", "epochs", "minutes")}
        try:
            cfg = TrainConfig(**{**kept, **options})
        except TypeError as e:
            raise CharrnnError(f"the checkpoint's training options are not readable: {e}") from None
    if cfg.steps is None and cfg.epochs is None and cfg.minutes is None:
        cfg.minutes = DEFAULT_MINUTES
    if cfg.weight_decay is None:  # auto: AdamW's decoupled decay; L2 for the others stays off
        cfg.weight_decay = ADAMW_DECAY if cfg.optimizer == "adamw" else 0.0
    if cfg.layer_norm is None:  # auto: on for the LSTM wide enough to normalise
        cfg.layer_norm = cfg.cell in NORMALISED and (cfg.hidden is None or cfg.hidden >= MIN_NORMALISED_UNITS)
    cfg.validate()
    return cfg


def validation_loss(model, windows, lead_in=None, world=distributed.SINGLE, streams=slice(None),
                    part=None):
    """Mean loss (nats/char) over all windows, state carried, no updates;
    the streams start from the state ``lead_in`` leaves (Windows.lead_in:
    read, not scored), or from zeros without one. Under MPI each rank
    scores its ``streams`` (``part`` of the batch) and one collective sums
    the windows' totals."""
    state, totals = None, np.zeros(len(windows))
    if lead_in is not None:
        x, y = lead_in
        state = model.window(x[streams], y[streams], part=part)[1]
    for k in range(len(windows)):
        x, y = windows[k]
        totals[k], state = model.window(x[streams], y[streams], state, part=part)
    world.sum_into(totals)
    chars = windows[0][0].size
    total = 0.0
    for t in totals:
        total += t / chars
    return total / len(windows)


class _Stop:
    """Signal handlers that ask the loop to stop at the next step boundary, so
    that a checkpoint never holds half an update. A second Ctrl-C is a hard
    KeyboardInterrupt."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _Run:
    def __init__(self, cfg, paths, saved, run_dir, world):
        self.cfg, self.paths, self.run_dir, self.out = cfg, paths, run_dir, run_dir.path
        self.world, self.lead = world, world.rank == 0  # the lead rank prints and writes
        cuts = parallel.shard_cuts(cfg.batch, world.size)  # this rank's streams of the batch
        self.streams = slice(cuts[world.rank], cuts[world.rank + 1])
        self.part = (self.streams.start, cfg.batch)
        try:
            vocab, ids = self._corpus(saved.vocab if saved else None)
        except CharrnnError as e:
            if saved is None:
                raise
            raise CharrnnError(f"the corpus does not fit the resumed run's vocabulary: {e}") from None
        if saved and ids.size != Progress.from_dict(saved.meta.get("progress")).corpus_chars:
            raise CharrnnError(f"the corpus has {ids.size} characters, the resumed run was trained on "
                               f"{saved.meta['progress']['corpus_chars']}: resume needs the same corpus")
        self.corpus_chars = ids.size
        train_ids, val_ids = split(ids, cfg.val_frac)
        if cfg.val_chars:  # a fixed prefix: evaluations stay comparable, and cheap on big corpora
            val_ids = val_ids[:cfg.val_chars]
        self.train_windows = self._windows(train_ids, "training")
        self.val_windows = self._windows(val_ids, "validation")
        self.val_lead_in = self.val_windows.lead_in(train_ids)  # the training text precedes it

        n = len(self.train_windows)
        budget = [cfg.steps] if cfg.steps else []
        if cfg.epochs:
            budget.append(math.ceil(cfg.epochs * n))
        self.max_steps = min(budget) if budget else None
        self.progress = Progress.from_dict(saved.meta.get("progress")) if saved else \
            Progress(corpus_chars=self.corpus_chars)
        self.sizing = None
        if not saved and None in (cfg.hidden, cfg.layers, cfg.dropout, cfg.weight_drop,
                                  cfg.output_dropout):
            self._auto_size(len(vocab), train_ids.size)
        if saved:
            self.model = Model.from_checkpoint(saved, device=cfg.device)
        else:
            self.model = Model(len(vocab), cell=cfg.cell, hidden=cfg.hidden, layers=cfg.layers,
                               embed=cfg.embed, dropout=cfg.dropout, seed=cfg.seed,
                               nonlinearity=cfg.nonlinearity, device=cfg.device,
                               output_dropout=cfg.output_dropout, weight_drop=cfg.weight_drop,
                               embed_dropout=cfg.embed_dropout, locked_dropout=cfg.locked_dropout,
                               layer_norm=cfg.layer_norm, zoneout=cfg.zoneout,
                               multiplicative=cfg.multiplicative)
            self.model.vocab = vocab
        self.opt = Optimizer.for_model(self.model, cfg.optimizer, cfg.momentum, cfg.weight_decay,
                                       cfg.average, cfg.beta2)
        self.cadence = Cadence.parse(cfg.eval_every) or Cadence.for_budget(self.max_steps, cfg.minutes)
        self.schedule = Schedule(cfg.lr, cfg.schedule, cfg.warmup, cfg.decay_every, cfg.decay,
                                 cfg.lr_end, cfg.decay_start)
        self.elapsed0 = self.progress.elapsed_s
        self.eval_cost = 0.0  # seconds the last validation took
        self.metrics = saved.meta.get("metrics", []) if saved else []
        self.state = tuple(a[:, self.streams] for a in saved.state) or None if saved else None
        self.lr = self.schedule.get_lr(self.progress.step, self._spent(self.progress.elapsed_s))
        if saved:
            self.opt.load_state_dict(saved.optim)
            self.model.rng_state = self.progress.rng
        self.report = _Reporter(cfg.quiet or not self.lead, self.max_steps, cfg.minutes)
        self._on_lead(self._write_metrics_file)

    def _auto_size(self, vocab_size, train_chars):
        """Fill in --hidden, --layers, --dropout, --weight-drop and
        --output-dropout left to auto (sizing.py),
        on rank 0, for every rank. Measuring the throughput for a time budget
        (when the choice needs it) takes a second or two, counted in the
        run's minutes."""
        cfg, world = self.cfg, self.world
        start = time.perf_counter()
        choice = None
        if self.lead:
            def make(hidden, layers):
                return Model(vocab_size, cell=cfg.cell, hidden=hidden, layers=layers, embed=cfg.embed,
                             nonlinearity=cfg.nonlinearity, device=cfg.device,
                             layer_norm=cfg.layer_norm, zoneout=cfg.zoneout,
                             multiplicative=cfg.multiplicative)
            measured = []  # measured only if the choice needs it

            def chars_per_second(n):
                if not measured:
                    streams = self.streams.stop - self.streams.start
                    measured.append(sizing.measured_throughput(make, streams, cfg.seq_len))
                return world.size * measured[0](n)
            choice = sizing.choose(
                vocab_size, cfg.cell, train_chars, chars_per_second,
                seconds=cfg.minutes * 60 if cfg.minutes else None,
                budget_chars=self.max_steps * cfg.batch * cfg.seq_len if self.max_steps else None,
                embed=cfg.embed, nonlinearity=cfg.nonlinearity, layer_norm=cfg.layer_norm,
                multiplicative=cfg.multiplicative, hidden=cfg.hidden,
                layers=cfg.layers, dropout=cfg.dropout, weight_drop=cfg.weight_drop,
                output_dropout=cfg.output_dropout)
        choice = world.broadcast(dataclasses.asdict(choice) if choice else None)
        for name in ("hidden", "layers", "dropout", "weight_drop", "output_dropout"):
            setattr(cfg, name, choice[name])
        self.sizing = choice["why"]
        if cfg.minutes:  # the probe's seconds count; the first validation is a cadence away
            self.progress.elapsed_s += world.broadcast(time.perf_counter() - start)
            self.progress.last_eval_s = self.progress.elapsed_s

    def _corpus(self, vocab):
        """(vocab, ids) of the corpus: ``vocab`` if given (a resume), else the
        corpus's own. A big corpus, or any under MPI, goes through the id
        cache (data.IdCache): encoded once, by rank 0 first, then memory
        mapped by every rank; a small one is encoded in memory."""
        mode = "bytes" if self.cfg.bytes else "chars"
        world = self.world
        if world.size == 1 and not worth_caching(self.paths):
            vocab = vocab or Vocab.from_files(self.paths, mode)
            return vocab, encode_files(self.paths, vocab)
        cache = IdCache(cache_dir() / "ids", self.paths, mode)
        world.same_everywhere("corpora", cache.key.encode("ascii"))
        problem = None
        if world.rank == 0:
            try:
                vocab = vocab or cache.vocab()
                cache.build(vocab)
            except CharrnnError as e:
                problem = str(e)
        world.agree(problem)
        vocab = vocab or cache.vocab()
        cache.build(vocab)  # a host that does not share rank 0's cache directory builds its own
        return vocab, cache.ids(vocab)

    def _windows(self, ids, which):
        cfg = self.cfg
        try:
            return Windows(ids, cfg.batch, cfg.seq_len)
        except CharrnnError:
            fits = max(0, (len(ids) - 1) // cfg.seq_len)
            raise CharrnnError(
                f"the {which} split has {len(ids)} characters, too few for --batch {cfg.batch} x "
                f"--seq-len {cfg.seq_len} (needs {cfg.batch * cfg.seq_len + 1}); "
                f"at this --seq-len at most --batch {fits} fits, or use a longer corpus"
                + (" or a larger --val-frac or --val-chars" if which == "validation" else "")) from None

    # ------------------------------------------------------------- loop
    def loop(self):
        cfg, n = self.cfg, len(self.train_windows)
        self.t0 = time.perf_counter()
        self.mark = (self.t0, self.progress.step)
        self.report.start(self)
        with _Stop() as stop:
            while True:
                # every rank stops at the same step, when any is signalled or out of
                # budget, and goes by rank 0's clock and validation cadence
                p = self.progress
                clock = self.elapsed() if self.lead else 0.0
                due = self.lead and self.cadence.due(p.step + 1, n, clock, p.last_eval_s, self.eval_cost)
                interrupted, terminated, clock, due = self.world.sum(
                    stop.signum == signal.SIGINT, stop.signum == signal.SIGTERM, clock, due)
                if interrupted or terminated:
                    self._save("last")
                    code = 128 + (signal.SIGINT if interrupted else signal.SIGTERM)
                    raise TrainingStopped(
                        f"interrupted at step {self.progress.step}; continue with: charrnn train "
                        f"{' '.join(map(str, self.paths))} --resume {self.out}", code, self.model)
                if self._budget_spent(clock):
                    break
                epoch, k = divmod(self.progress.step, n)
                if k == 0:
                    self.state = None  # a new epoch starts each stream afresh
                offset = self.train_windows.epoch_offset(epoch, cfg.seed) if cfg.epoch_shift else 0
                x, y = self.train_windows.at(k, offset)
                total, state = self.model.window(x[self.streams], y[self.streams], self.state,
                                                 train=True, part=self.part)
                self.world.sum_into(self.model.grads)  # one collective over the flat buffer
                loss = self.world.sum(total)[0] / x.size
                self._check_loss(loss)
                lr = self.schedule.get_lr(self.progress.step, self._spent(clock))
                self.opt.step(lr, cfg.clip)
                self.state, self.lr = state, lr
                p.step += 1
                p.loss_sum += loss
                p.loss_count += 1
                if due:
                    self._eval(clock)
                self.report.tick(self, loss)
            if self.progress.loss_count:
                self._eval(clock)
        self.report.finish(self)
        self.opt.keep_average()  # the model handed back is the one evaluated
        return self.model

    def elapsed(self):
        return self.elapsed0 + time.perf_counter() - self.t0

    def _spent(self, clock):
        """The share of the budget used after ``clock`` seconds of the run:
        of its steps or minutes, whichever is nearer its end."""
        shares = [self.progress.step / self.max_steps] if self.max_steps else []
        if self.cfg.minutes is not None:
            shares.append(clock / (self.cfg.minutes * 60))
        return max(shares)

    def _budget_spent(self, clock):
        return self._spent(clock) >= 1 or \
            bool(self.cfg.patience) and self.progress.bad_evals >= self.cfg.patience

    def _check_loss(self, loss):
        if self.progress.first_loss is None:
            self.progress.first_loss = loss
        if not math.isfinite(loss) or loss > EXPLODE_FACTOR * self.progress.first_loss:
            last = self.run_dir.last
            kept = (f"the last good checkpoint is {last}" if last.exists()
                    else "no checkpoint was written yet")
            raise TrainingStopped(
                f"training diverged at step {self.progress.step}: loss {loss:.4g} (it started at "
                f"{self.progress.first_loss:.4g}); {kept}; try a lower --lr (now {self.cfg.lr:g}) "
                f"or a --clip (now {self.cfg.clip:g})", 1)

    def _eval(self, clock):
        p = self.progress
        now = time.perf_counter()  # the rate covers training, not evaluation
        rate = (p.step - self.mark[1]) * self.cfg.batch * self.cfg.seq_len / max(now - self.mark[0], 1e-9)
        with self.opt.averaged_weights():
            val = validation_loss(self.model, self.val_windows, self.val_lead_in, self.world,
                                  self.streams, self.part)
        self.eval_cost = time.perf_counter() - now
        p.last_eval_s = clock
        row = {"step": p.step, "epoch": round(p.step / len(self.train_windows), 4),
               "train_loss": p.loss_sum / p.loss_count if p.loss_count else None,
               "val_loss": val, "val_bpc": val / LN2, "lr": self.lr,
               "chars_per_s": round(rate, 1), "elapsed_s": round(self.elapsed(), 3)}
        self.metrics.append(row)
        p.loss_sum, p.loss_count = 0.0, 0
        improved = val < p.best_val
        if improved:
            p.best_val, p.bad_evals = val, 0
        else:
            p.bad_evals += 1
        self._on_lead(lambda: self._append_metrics(row))
        self._save("last")
        if improved:
            with self.opt.averaged_weights():  # best: the weights that scored it
                self._save("best")
        if self.cfg.plot:
            self._on_lead(lambda: plot_runs([self.out], self.run_dir.curves))
        self.report.eval(self, row, improved)
        self.mark = (time.perf_counter(), self.progress.step)

    def _on_lead(self, write):
        """``write()`` on the lead rank, which alone writes the run
        directory; if it fails, every rank stops with its one-line error."""
        problem = None
        if self.lead:
            try:
                write()
            except CharrnnError as e:
                problem = str(e)
        self.world.agree(problem)

    def _append_metrics(self, row):
        try:
            with open(self.run_dir.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise CharrnnError(f"cannot write {self.run_dir.metrics}: {e.strerror or e}; "
                               f"the last checkpoint is kept") from None

    def _write_metrics_file(self):
        """metrics.jsonl as the checkpoint knows it (a resume drops lines
        logged after the checkpoint it continues from)."""
        with atomic_write(self.run_dir.metrics) as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.metrics).encode("utf-8"))

    def _save(self, name):
        state = self.world.gather_streams(self.state) if self.state else ()  # every rank's streams
        self._on_lead(lambda: self._write_checkpoint(name, state))

    def _write_checkpoint(self, name, state):
        model, cfg = self.model, self.cfg
        progress = dataclasses.replace(self.progress, elapsed_s=self.elapsed(), rng=model.rng_state)
        train_cfg = {k: v for k, v in dataclasses.asdict(cfg).items()}
        meta = {"model": model.config, "vocab": model.vocab.to_dict(), "train": train_cfg,
                "progress": dataclasses.asdict(progress), "metrics": self.metrics}
        ckpt_io.save(self.out / f"{name}{ckpt_io.SUFFIX}",
                     ckpt_io.Checkpoint(meta, model.state_dict(), self.opt.state_dict(), state))


def _fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Reporter:
    """What a person sees: a live status line on a terminal, plain lines at
    every evaluation otherwise, nothing with ``quiet``. Writes to stderr."""

    def __init__(self, quiet, max_steps, minutes):
        self.quiet, self.max_steps, self.minutes = quiet, max_steps, minutes
        self.live = not quiet and sys.stderr.isatty()
        self.last_draw = 0.0
        self.last_val = None

    def _print(self, line):
        if self.live:
            line = "\r\033[K" + line
        print(line, file=sys.stderr, flush=True)

    def start(self, run):
        if self.quiet:
            return
        m, c = run.model, run.cfg
        if run.sizing:
            self._print(f"auto-size: {c.layers}x{c.hidden}: {run.sizing}")
        self._print(f"charrnn: {c.cell} {c.layers}x{c.hidden}, {m.num_params:,} parameters, "
                    f"vocabulary {len(m.vocab)}, {run.corpus_chars:,} characters "
                    f"({len(run.train_windows)} windows of {c.batch}x{c.seq_len} per epoch), "
                    f"writing to {run.out}"
                    + (f"; validating the weights' moving average (--average {c.average:g})"
                       if c.average else ""))

    def _eta(self, run):
        left = []
        rate = (run.progress.step - run.mark[1]) / max(time.perf_counter() - run.mark[0], 1e-9)
        if self.max_steps and rate > 0:
            left.append((self.max_steps - run.progress.step) / rate)
        if self.minutes:
            left.append(self.minutes * 60 - run.elapsed())
        return f" | ETA {_fmt_time(max(0, min(left)))}" if left else ""

    def tick(self, run, loss):
        now = time.perf_counter()
        if not self.live or now - self.last_draw < 0.25:
            return
        self.last_draw = now
        steps = f"{run.progress.step}/{self.max_steps}" if self.max_steps else f"{run.progress.step}"
        val = f" | val {self.last_val:.4f} ({self.last_val / LN2:.3f} bpc)" if self.last_val else ""
        rate = (run.progress.step - run.mark[1]) * run.cfg.batch * run.cfg.seq_len / max(now - run.mark[0], 1e-9)
        print(f"\r\033[Kstep {steps} (epoch {run.progress.step / len(run.train_windows):.2f}) | "
              f"loss {loss:.4f}{val} | {rate / 1e3:.1f}k chars/s{self._eta(run)}",
              end="", file=sys.stderr, flush=True)

    def eval(self, run, row, improved):
        self.last_val = row["val_loss"]
        if self.quiet:
            return
        train = f"train {row['train_loss']:.4f}" if row["train_loss"] is not None else "train -"
        self._print(f"step {row['step']} (epoch {row['epoch']:.2f}) | {train} | val "
                    f"{row['val_loss']:.4f} nats, {row['val_bpc']:.3f} bpc{' *' if improved else ''} | "
                    f"{row['chars_per_s'] / 1e3:.1f}k chars/s | {_fmt_time(row['elapsed_s'])}")

    def finish(self, run):
        if not self.quiet:
            self._print(f"done: step {run.progress.step}, best val {run.progress.best_val:.4f} nats "
                        f"({run.progress.best_val / LN2:.3f} bpc); checkpoints in {run.out}")
