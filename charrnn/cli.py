"""The ``charrnn`` command: a thin click layer over the Python API."""
import functools
import os
import signal
import sys

import click

from . import __version__
from .distributed import finish, launched_rank
from .errors import CharrnnError


def _one_line_errors(f):
    """User errors become ``error: ...`` on stderr and a non-zero exit; a
    traceback only with --debug."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return f(*args, **kwargs)
        except CharrnnError as e:
            if debug:
                raise
            if launched_rank() == 0:  # under mpiexec every rank stops, rank 0 alone says why
                click.echo(f"error: {e}", err=True)
            finish(getattr(e, "exit_code", 1))
            sys.exit(getattr(e, "exit_code", 1))
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            finish(130)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`charrnn sample run | head`): stop quietly
            _stdout_to_devnull()
            sys.exit(128 + signal.SIGPIPE)  # as a filter killed by SIGPIPE
        except Exception as e:  # a bug: say so in one line unless debugging
            if debug:
                raise
            click.echo(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                       err=True)
            finish(2)
            sys.exit(2)
    return wrapper


def _stdout_to_devnull():
    """Point stdout at /dev/null, so that Python's flush at exit does not
    hit the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charrnn")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug):
    """Character-level RNN/GRU/LSTM language models, Numba-accelerated.

    \b
      charrnn train corpus.txt
      charrnn sample run --temp 0.8 --prime "ROMEO:"
    """


# ------------------------------------------------------------------- train

_threads_option = click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                               help="CPU threads; 0 = all cores.")


class _OrAuto(click.ParamType):
    """A number, or "auto" (None: the training decides, sizing.py)."""

    def __init__(self, kind):
        self.kind, self.name = kind, f"{kind.__name__}|auto"

    def convert(self, value, param, ctx):
        if value is None or str(value).strip().lower() == "auto":
            return None
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a {'whole number' if self.kind is int else 'number'} or auto",
                      param, ctx)


def _train_options(f):
    from .optim import OPTIMIZERS, SCHEDULES
    from .train import ADAMW_DECAY, TrainConfig as D  # the defaults live there, once
    opts = [
        click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), default=D.cell, show_default=True),
        click.option("--hidden", type=_OrAuto(int), default="auto", show_default=True,
                     help="Units per layer; auto: from the corpus and the budget."),
        click.option("--layers", type=_OrAuto(int), default="auto", show_default=True, help="auto: 2, or 3 when wide."),
        click.option("--embed", type=int, default=D.embed, show_default=True, help="Embedding size; 0 = one-hot input."),
        click.option("--dropout", type=_OrAuto(float), default="auto", show_default=True,
                     help="Between layers; auto: from the passes over the data the budget allows "
                          "(1.3 times the rate from 8 to 32 passes, README)."),
        click.option("--nonlinearity", type=click.Choice(["tanh", "relu"]), default=D.nonlinearity,
                     show_default=True, help="For --cell rnn."),
        click.option("--output-dropout", type=_OrAuto(float), default="auto", show_default=True,
                     help="On the top layer's output; auto: the dropout, from 8 passes over the data."),
        click.option("--weight-drop", type=_OrAuto(float), default="auto", show_default=True,
                     help="DropConnect on the recurrent weights, one mask per window; auto: from 8 "
                          "passes over the data, 0.4 of the rate below 32 passes, the rate from there."),
        click.option("--embed-dropout", type=float, default=D.embed_dropout, show_default=True,
                     help="Drops whole input characters, one mask per window."),
        click.option("--locked-dropout/--no-locked-dropout", default=D.locked_dropout, show_default=True,
                     help="One dropout mask per stream for all the steps of a window."),
        click.option("--layer-norm/--no-layer-norm", default=None,
                     help="Layer normalisation of the gate blocks and the cell (LSTM only); "
                          "default: on for the LSTM of 4 units or more."),
        click.option("--multiplicative/--no-multiplicative", default=D.multiplicative, show_default=True,
                     help="Each layer's recurrent product reads (W_mx x + b_mx) * (W_mh h) instead "
                          "of h: a transition that depends on the input character (the "
                          "multiplicative LSTM, Krause et al. 2016)."),
        click.option("--zoneout", type=float, default=D.zoneout, show_default=True,
                     help="LSTM: at each training step each unit's cell keeps its previous value "
                          "with this probability (Krueger et al. 2017); inference takes the "
                          "expected share of each new value."),
        click.option("--epoch-shift/--no-epoch-shift", default=D.epoch_shift, show_default=True,
                     help="Each epoch after the first starts the streams at a random place in the "
                          "text (seeded), so the windows' cuts and batch-mates change."),
        click.option("--average", type=float, default=D.average, show_default=True,
                     help="Decay of the weights' moving average, which is evaluated and saved as "
                          "best; 0 = off."),
        click.option("--seq-len", type=int, default=D.seq_len, show_default=True, help="T: characters per window (BPTT)."),
        click.option("--batch", type=int, default=D.batch, show_default=True, help="B: parallel streams."),
        click.option("--lr", type=float, default=D.lr, show_default=True, help="Learning rate."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=D.optimizer, show_default=True),
        click.option("--momentum", type=float, default=D.momentum, show_default=True, help="For rmsprop and sgd."),
        click.option("--beta2", type=float, default=D.beta2, show_default=True,
                     help="For adam and adamw: the decay of the squared gradients' average."),
        click.option("--weight-decay", type=_OrAuto(float), default="auto", show_default=True,
                     help="AdamW: the weights shrink by lr x this each step; the others: L2 added "
                          f"to the gradient. auto: {ADAMW_DECAY:g} with adamw, else 0."),
        click.option("--clip", type=float, default=D.clip, show_default=True, help="Global gradient-norm clip; 0 = off."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=D.schedule, show_default=True),
        click.option("--warmup", type=int, default=D.warmup, show_default=True, help="Steps of linear warm-up."),
        click.option("--decay", type=float, default=D.decay, show_default=True, help="Step schedule: factor..."),
        click.option("--decay-every", type=int, default=D.decay_every, show_default=True,
                     help="...every N steps (0: a third of the budget)."),
        click.option("--decay-start", type=float, default=D.decay_start, show_default=True,
                     help="Cosine and linear schedules: the share of the budget (steps, epochs or "
                          "minutes) at the full rate before the decay."),
        click.option("--lr-end", type=float, default=D.lr_end, show_default=True,
                     help="Cosine and linear schedules: the rate at the budget's end, as a share of --lr."),
        click.option("--steps", type=int, default=D.steps, help="Budget: updates (counted from step 0 of the run)."),
        click.option("--epochs", type=float, default=D.epochs, help="Budget: passes over the training split."),
        click.option("--minutes", type=float, default=D.minutes,
                     help="Budget: wall-clock minutes. Whichever budget comes first; none given: 10 minutes."),
        click.option("--val-frac", type=float, default=D.val_frac, show_default=True, help="Tail share for validation."),
        click.option("--val-chars", type=click.IntRange(min=0), default=D.val_chars, show_default=True,
                     help="Characters of that tail each validation scores (its start); 0 = all."),
        click.option("--eval-every", default=D.eval_every, show_default=True,
                     help="Validations and checkpoints: every N steps, Ns / Nm (seconds, minutes), "
                          "Ne (epochs), or auto (20 over the budget)."),
        click.option("--patience", type=int, default=D.patience, show_default=True,
                     help="Stop after N evaluations without improvement; 0 = never."),
        click.option("--out", type=click.Path(file_okay=False), default=D.out, show_default=True,
                     help="Run directory (last.ckpt, best.ckpt, metrics.jsonl)."),
        click.option("--resume", type=click.Path(), default=None,
                     help="Continue a run exactly (run directory or checkpoint)."),
        click.option("--overwrite", is_flag=True,
                     help="Start afresh in an --out that holds a run, deleting that run."),
        click.option("--seed", type=int, default=D.seed, show_default=True),
        _threads_option,
        click.option("--bytes", "bytes_", is_flag=True, help="Byte vocabulary (any file, any encoding)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=D.device, show_default=True),
        click.option("--quiet", is_flag=True, help="Print nothing but errors."),
        click.option("--plot", is_flag=True,
                     help="Write curves.png into the run directory at each evaluation (charrnn[plot])."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@click.argument("corpus", nargs=-1, required=True)
@_train_options
@click.pass_context
@_one_line_errors
def train(ctx, corpus, resume, overwrite, **options):
    """Train a model on CORPUS: text files, a directory of them, `builtin`
    or a registry name (see `charrnn corpora list`)."""
    from .train import train as train_api
    options["bytes"] = options.pop("bytes_")
    if resume is not None:  # only what was given explicitly; the rest comes from the run
        source = click.core.ParameterSource.COMMANDLINE
        options = {k: v for k, v in options.items()
                   if ctx.get_parameter_source("bytes_" if k == "bytes" else k) == source}
    model = train_api(list(corpus), resume=resume, overwrite=overwrite, **options)
    if not options.get("quiet") and launched_rank() == 0:
        click.echo("--- a sample from the trained model (temperature 0.8) ---", err=True)
        _write(model.sample(300, temperature=0.8, seed=options.get("seed", 0)) + "\n")


# ---------------------------------------------------- sample / eval / info

def _load(path, device="cpu"):
    from .checkpoint import load
    from .model import Model
    return Model.from_checkpoint(load(path, prefer="best"), device)


_device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
                              show_default=True, help="Where the model runs.")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--temp", "temperature", type=float, default=1.0, show_default=True,
              help="Temperature; 0 = always the most likely character.")
@click.option("--top-k", type=int, default=None, help="Draw only from the K most likely characters.")
@click.option("--top-p", type=float, default=None, help="Draw only from the nucleus of mass P.")
@click.option("--length", type=int, default=1000, show_default=True, help="Characters to generate.")
@click.option("--prime", default="", help="Text to start from (printed first).")
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
@click.option("--num", type=int, default=1, show_default=True, help="Independent samples, generated as one batch.")
@click.option("--stop", default=None, help="End a sample when it produces this string.")
@click.option("--beam", type=int, default=0, help="Beam search of this width for the most likely continuation.")
@_threads_option
@_device_option
@_one_line_errors
def sample(checkpoint, temperature, top_k, top_p, length, prime, seed, num, stop, beam, threads,
           device):
    """Generate text from CHECKPOINT (a .ckpt file, or a run directory: its best)."""
    from .parallel import thread_limit
    model = _load(checkpoint, device)
    with thread_limit(threads):
        _sample(model, temperature, top_k, top_p, length, prime, seed, num, stop, beam)


def _sample(model, temperature, top_k, top_p, length, prime, seed, num, stop, beam):
    from . import generate as G
    if beam:
        _write(G.beam_search(model, length, prime, beam) + "\n")
    elif num == 1:  # stream as it is produced
        for pieces in G.generate(model, length, temperature, prime, top_k, top_p, seed, 1, stop):
            _write(pieces[0])
        _write("\n")
    else:
        texts = G.sample(model, length, temperature, prime, top_k, top_p, seed, num, stop)
        _write(("\n" + "-" * 40 + "\n").join(texts) + "\n")


def _write(text):
    """UTF-8 on stdout whatever the locale, flushed: samples stream."""
    sys.stdout.buffer.write(text.encode("utf-8", "replace"))
    sys.stdout.flush()


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--skip-unknown", is_flag=True, help="Skip characters outside the vocabulary (counted).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--dynamic", is_flag=True,
              help="Dynamic evaluation: the model keeps learning from the text as it reads it.")
@click.option("--dynamic-lr", type=float, default=None, help="Its SGD learning rate (default 0.03).")
@click.option("--dynamic-decay", type=float, default=None,
              help="Its pull back toward the trained weights per update (default 0.001).")
@_threads_option
@_device_option
@_one_line_errors
def eval_(checkpoint, file, skip_unknown, as_json, dynamic, dynamic_lr, dynamic_decay, threads,
          device):
    """Bits per character of FILE under CHECKPOINT, the state carried over the whole file."""
    import functools
    import json
    from . import dynamic as D
    from .generate import score_file
    from .parallel import thread_limit
    if not dynamic and (dynamic_lr is not None or dynamic_decay is not None):
        raise CharrnnError("--dynamic-lr and --dynamic-decay go with --dynamic")
    scorer = functools.partial(D.dynamic_score, lr=D.LR if dynamic_lr is None else dynamic_lr,
                               decay=D.DECAY if dynamic_decay is None else dynamic_decay) \
        if dynamic else None
    with thread_limit(threads):
        r = score_file(_load(checkpoint, device), file, skip_unknown=skip_unknown, scorer=scorer)
    if as_json:
        click.echo(json.dumps({"file": str(file), "dynamic": dynamic, **r}))
    else:
        skipped = f", {r['skipped']} unknown skipped" if skip_unknown else ""
        how = " (dynamic evaluation)" if dynamic else ""
        click.echo(f"{r['bpc']:.4f} bits/char, perplexity {r['perplexity']:.3f}, "
                   f"{r['nats']:.4f} nats/char over {r['chars']:,} characters{skipped}{how}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_one_line_errors
def info(checkpoint, as_json):
    """Describe CHECKPOINT: model, vocabulary, training progress, format."""
    import json
    from .checkpoint import describe, load
    d = describe(load(checkpoint, prefer="best"))
    d["path"] = str(checkpoint)
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo(f"{d['cell']} {d['layers']}x{d['hidden']}, "
               f"{'embedding ' + str(d['embed']) if d['embed'] else 'one-hot input'}, "
               f"dropout {d['dropout']}, {d['parameters']:,} parameters")
    click.echo(f"vocabulary: {d['vocab_size']} {d['vocab_mode']}: {d['vocab_preview']!r}")
    if d["step"] is not None:
        bpc = f"{d['best_val_bpc']:.4f}" if d["best_val_bpc"] is not None else "-"
        click.echo(f"training: step {d['step']}, best validation {bpc} bits/char")
    click.echo(f"checkpoint format version {d['format_version']}")


# ------------------------------------------------------------ plot / explain

@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="curves.png", show_default=True,
              help="The picture: .png or .svg.")
@_one_line_errors
def plot(runs, out):
    """Training and validation bits/char of RUNS against steps and minutes,
    overlaid (works on a run that is still training). Needs charrnn[plot]."""
    from .plot import plot_runs
    plot_runs(runs, out)
    click.echo(out)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("--text", default=None, help="Explain this text instead of a FILE.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="explain.html", show_default=True,
              help="The page: one self-contained HTML file.")
@click.option("--skip-unknown", is_flag=True, help="Skip characters outside the vocabulary.")
@click.option("--max-chars", type=click.IntRange(min=2), default=20_000, show_default=True,
              help="Explain at most this many characters (the page says what it left out).")
@_device_option
@_one_line_errors
def explain(checkpoint, file, text, out, skip_unknown, max_chars, device):
    """A page that shows what the model at CHECKPOINT sees in FILE (or
    --text): surprisal, its guesses, any neuron, gate saturation and how far
    back its gradient reaches."""
    from .explain import page
    from .generate import read_text
    if (file is None) == (text is None):
        raise CharrnnError("give a FILE or --text to explain (one of them)")
    model = _load(checkpoint, device)
    title = text[:40] if file is None else str(file)
    if file is not None:
        text = read_text(model, file)
    ex = page(model, text, out, title=title, skip_unknown=skip_unknown, max_chars=max_chars)
    click.echo(f"{out}: {len(ex.ids):,} characters, {ex.bpc:.3f} bits/char")


# ------------------------------------------------------------------- bench

@main.command()
@click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), default=None,
              help="Measure one config instead of the default list.")
@click.option("--hidden", type=int, default=None)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--batch", type=int, default=50, show_default=True)
@click.option("--seq-len", type=int, default=50, show_default=True)
@click.option("--embed", type=int, default=0, show_default=True)
@click.option("--vocab", type=int, default=65, show_default=True)
@_threads_option
@click.option("--seconds", type=float, default=5.0, show_default=True, help="Per measurement.")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch side even if it is installed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per config.")
@_device_option
@_one_line_errors
def bench(cell, hidden, layers, batch, seq_len, embed, vocab, threads, seconds, no_torch, as_json, device):
    """Training and sampling chars/s, GFLOP/s and memory, beside PyTorch if installed.

    By default: LSTM 2x128, 2x256, 2x512 and GRU 2x256 at B=50, T=50, V=65."""
    import json
    from . import bench as B
    from .kernels import backend, cpu
    device = "cpu" if backend(device) is cpu else "cuda"  # fails fast without a GPU
    base = dict(layers=layers, batch=batch, seq_len=seq_len, embed=embed, vocab=vocab,
                threads=threads, seconds=seconds, device=device)
    pairs = B.DEFAULT_CONFIGS if cell is None and hidden is None else [(cell or "lstm", hidden or 256)]
    for name, value in (("--batch", batch), ("--seq-len", seq_len), ("--vocab", vocab), ("--layers", layers)):
        if value < 1:
            raise CharrnnError(f"{name} must be >= 1, not {value}")
    with_torch = not no_torch and B.torch_available()
    for r in B.run([dict(base, cell=c, hidden=h) for c, h in pairs], with_torch):
        if as_json:
            click.echo(json.dumps(r))
            continue
        line = (f"{r['cell']} {r['layers']}x{r['hidden']} B={r['batch']} T={r['seq_len']}: "
                f"train {r['train_chars_per_s'] / 1e3:.1f}k chars/s ({r['gflops']:.0f} GFLOP/s, "
                f"{100 * r['gemm_efficiency']:.0f}% of sgemm {r['sgemm_gflops']:.0f}), "
                f"sample {r['sample_chars_per_s'] / 1e3:.1f}k, x64 {r['batch_sample_chars_per_s'] / 1e3:.1f}k "
                f"chars/s, peak RSS {r['peak_rss_mb']:.0f} MB")
        if with_torch:
            line += (f" | torch train {r['torch_train_chars_per_s'] / 1e3:.1f}k "
                     f"({r['train_speedup']:.2f}x), sample {r['torch_sample_chars_per_s'] / 1e3:.2f}k "
                     f"({r['sample_speedup']:.0f}x), peak RSS {r['torch_peak_rss_mb']:.0f} MB")
        click.echo(line)
    click.echo(f"BLAS: {', '.join(r['blas'])}", err=True)


# ----------------------------------------------------------------- corpora

@main.group()
def corpora():
    """Built-in corpora and the registry of public ones."""


@corpora.command("list")
@_one_line_errors
def corpora_list():
    """Show the built-in corpora and the registry."""
    from . import corpora as C
    for name in C.builtin_names():
        click.echo(f"{name:18} built-in    {C.builtin_description(name)}")
    for name, e in C.registry().items():
        size = f"{e['size'] / 1e6:.1f} MB"
        click.echo(f"{name:18} {size:>9}   {e['description']} [{e['licence']}]")


@corpora.command("fetch")
@click.argument("name")
@click.option("--dir", "dest", type=click.Path(file_okay=False), default=None,
              help="Where to put it (default: the cache directory).")
@_one_line_errors
def corpora_fetch(name, dest):
    """Download NAME, verify its sha256 and unpack it; print its path."""
    from . import corpora as C
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=f"fetching {name}", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        path = C.fetch(name, dest, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(str(path))


if __name__ == "__main__":
    main()
