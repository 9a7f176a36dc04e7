"""Training: budgets, metrics, checkpoints, exact resume, interruption and
bad input. Tiny models so that the whole file runs in seconds."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
from charrnn import checkpoint, parallel
from charrnn.cli import main
from charrnn.errors import CharrnnError
from charrnn.train import TrainingStopped, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=16, layers=2, batch=4, seq_len=8, eval_every=5, quiet=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = ["the", "king", "queen", "of", "and", "to", "my", "lord", "shall", "thou", "ROMEO:",
             "JULIET:", "love", "night", "day", "hath", "be", "not", "is", "it"]
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), 1500)) + "\n"
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def test_training_lowers_the_validation_loss(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=60, **TINY)
    rows = losses(tmp_path)
    assert rows[-1][2] < rows[0][2] - 0.3


def test_metrics_lines_carry_every_field(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=10, **TINY)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"step", "epoch", "train_loss", "val_loss", "val_bpc", "lr",
                        "chars_per_s", "elapsed_s"}
    assert row["val_bpc"] == pytest.approx(row["val_loss"] / np.log(2))


def held_out_loss(model, corpus, chars):
    """The loss of the first ``chars`` of the held-out tail, each stream
    scored after reading the window of text before it."""
    from charrnn.data import Windows, split
    head, tail = split(model.vocab.encode(corpus.read_text(encoding="utf-8")), 0.05)
    windows = Windows(tail[:chars], TINY["batch"], TINY["seq_len"])
    _, state = model.loss(*windows.lead_in(head))
    (x, y), = windows
    return model.loss(x, y, state)[0]


def test_validation_scores_the_first_val_chars_of_the_held_out_tail_after_the_text_before_each_stream(corpus, tmp_path):
    one_window = TINY["batch"] * TINY["seq_len"] + 1
    train(corpus, out=tmp_path, steps=5, val_chars=one_window, average=0.0, **TINY)
    model = charrnn.load(tmp_path / "last.ckpt")  # the model as the step-5 evaluation saw it
    assert losses(tmp_path)[0][2] == pytest.approx(held_out_loss(model, corpus, one_window), rel=1e-6)


def test_same_seed_gives_the_same_losses(corpus, tmp_path):
    train(corpus, out=tmp_path / "a", steps=15, dropout=0.2, **TINY)
    train(corpus, out=tmp_path / "b", steps=15, dropout=0.2, **TINY)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_resume_continues_bit_identically(corpus, tmp_path, optimizer):
    # dropout exercises the RNG state; 40 steps cross an epoch border; the step
    # schedule has a fixed period (a cosine spans the budget, which resuming extends)
    opts = dict(TINY, dropout=0.2, weight_drop=0.0, output_dropout=0.0, optimizer=optimizer,
                momentum=0.5 if optimizer == "rmsprop" else 0.0, schedule="step", decay_every=7, warmup=3)
    train(corpus, out=tmp_path / "whole", steps=40, **opts)
    train(corpus, out=tmp_path / "split", steps=20, **opts)
    train(corpus, resume=tmp_path / "split", steps=40, quiet=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    whole = checkpoint.load(tmp_path / "whole", prefer="last")
    split = checkpoint.load(tmp_path / "split", prefer="last")
    assert all(np.array_equal(whole.params[k], split.params[k]) for k in whole.params)



REGULARISED = dict(dropout=0.2, output_dropout=0.2, weight_drop=0.3, embed_dropout=0.1,
                   locked_dropout=True, zoneout=0.2, average=0.99, embed=8, multiplicative=True)


def test_same_seed_gives_the_same_losses_with_every_regulariser_and_the_average(corpus, tmp_path):
    train(corpus, out=tmp_path / "a", steps=15, **REGULARISED, **TINY)
    train(corpus, out=tmp_path / "b", steps=15, **REGULARISED, **TINY)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_with_every_regulariser_and_the_average_continues_bit_identically(corpus, tmp_path):
    opts = dict(TINY, **REGULARISED, schedule="step", decay_every=7)
    train(corpus, out=tmp_path / "whole", steps=40, **opts)
    train(corpus, out=tmp_path / "split", steps=20, **opts)
    train(corpus, resume=tmp_path / "split", steps=40, quiet=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    whole = checkpoint.load(tmp_path / "whole", prefer="last", training=True)
    split = checkpoint.load(tmp_path / "split", prefer="last", training=True)
    for part in ("params", "optim"):
        a, b = getattr(whole, part), getattr(split, part)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), part
    assert "average" in whole.optim


def test_the_best_checkpoint_and_the_returned_model_hold_the_averaged_weights(corpus, tmp_path):
    model = train(corpus, out=tmp_path, steps=20, average=0.9, **TINY)
    last = checkpoint.load(tmp_path, prefer="last", training=True)
    best = checkpoint.load(tmp_path, prefer="best")
    average = last.optim["average"]
    assert np.array_equal(model.params, average)
    assert not np.array_equal(np.concatenate([w.ravel() for w in last.params.values()]), average)
    if best.meta["progress"]["step"] == last.meta["progress"]["step"]:  # the last evaluation was the best
        assert np.array_equal(np.concatenate([w.ravel() for w in best.params.values()]), average)


def test_validation_scores_the_averaged_weights(corpus, tmp_path):
    from charrnn.layout import named_views
    one_window = TINY["batch"] * TINY["seq_len"] + 1
    train(corpus, out=tmp_path, steps=5, val_chars=one_window, average=0.9, **TINY)
    model = charrnn.load(tmp_path / "last.ckpt")
    average = checkpoint.load(tmp_path, prefer="last", training=True).optim["average"]
    model.load_state_dict(named_views(model.shapes, average))
    assert losses(tmp_path)[0][2] == pytest.approx(held_out_loss(model, corpus, one_window), rel=1e-6)


@pytest.mark.parametrize("spec,steps", [(7, [7, 14, 21]), ("7", [7, 14, 21]), ("0.05e", None)])
def test_eval_every_counts_steps_or_epochs(corpus, tmp_path, spec, steps):
    opts = dict(TINY, eval_every=spec)
    train(corpus, out=tmp_path, steps=21, **opts)
    per_epoch = len(charrnn.data.Windows(np.zeros(int(len(corpus.read_text()) * 0.95)), 4, 8))
    want = steps or list(range(round(per_epoch / 20), 22, round(per_epoch / 20)))
    assert [s for s, _, _ in losses(tmp_path)] == want + ([] if want[-1] == 21 else [21])


def test_eval_every_seconds_follows_the_clock(corpus, tmp_path):
    train(corpus, out=tmp_path, minutes=0.05, **dict(TINY, eval_every="1s"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    gaps = np.diff([r["elapsed_s"] for r in rows[:-1]])
    assert len(rows) >= 3 and (gaps >= 0.9).all()  # the clock is read before each step, the row after it


def test_auto_cadence_validates_twenty_times_over_a_step_budget(corpus, tmp_path):
    opts = dict(TINY)
    del opts["eval_every"]
    train(corpus, out=tmp_path, steps=60, **opts)
    assert [s for s, _, _ in losses(tmp_path)] == list(range(3, 61, 3))


def test_a_time_budget_decays_the_learning_rate_with_the_clock_to_lr_end(corpus, tmp_path):
    train(corpus, out=tmp_path, minutes=0.05, schedule="linear", lr=2e-3, decay_start=0.0,
          lr_end=0.25, **dict(TINY, eval_every="0.5s"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # the rate each row saw: linear in the share of the three seconds spent
        assert r["lr"] == pytest.approx(2e-3 * (1 - 0.75 * min(1, r["elapsed_s"] / 3.0)), abs=2e-4)
    assert rows[-1]["lr"] < 7e-4


def test_a_run_saved_before_beta2_lr_end_epoch_shift_layer_norm_zoneout_multiplicative_and_average_resumes_as_it_ran(
        corpus, tmp_path):
    opts = dict(TINY, schedule="step", decay_every=7, beta2=0.999, lr_end=0.1, epoch_shift=False,
                layer_norm=False, zoneout=0.0, multiplicative=False, average=0.0)
    train(corpus, out=tmp_path / "whole", steps=20, **opts)
    train(corpus, out=tmp_path / "old", steps=10, **opts)
    for name in ("last", "best"):  # as an older charrnn wrote them: without the seven options
        path = tmp_path / "old" / f"{name}.ckpt"
        old = checkpoint.load(path, training=True)
        for key in ("beta2", "lr_end", "epoch_shift", "layer_norm", "zoneout", "multiplicative", "average"):
            del old.meta["train"][key]
        for key in ("layer_norm", "zoneout", "multiplicative"):
            del old.meta["model"][key]
        checkpoint.save(path, old)
    train(corpus, resume=tmp_path / "old", steps=20, quiet=True)
    assert losses(tmp_path / "old") == losses(tmp_path / "whole")
    kept = checkpoint.load(tmp_path / "old", prefer="last").meta
    assert (kept["train"]["beta2"], kept["train"]["lr_end"], kept["train"]["epoch_shift"],
            kept["train"]["layer_norm"], kept["model"]["layer_norm"], kept["train"]["zoneout"],
            kept["model"]["zoneout"], kept["train"]["multiplicative"], kept["model"]["multiplicative"],
            kept["train"]["average"]) == (0.999, 0.1, False, False, False, 0.0, 0.0, False, False, 0.0)


@pytest.mark.parametrize("average,said", [(0.999, True), (0.0, False)])
def test_the_first_lines_say_whether_validation_scores_the_weights_average(corpus, tmp_path, capsys,
                                                                           average, said):
    train(corpus, out=tmp_path, steps=2, average=average, **dict(TINY, quiet=False))
    err = capsys.readouterr().err
    assert ("validating the weights' moving average (--average 0.999)" in err) is said


def test_the_weights_average_is_kept_by_default_and_handed_back(corpus, tmp_path):
    model = train(corpus, out=tmp_path, steps=20, **TINY)
    last = checkpoint.load(tmp_path, prefer="last", training=True)
    assert last.meta["train"]["average"] == 0.999
    assert np.array_equal(model.params, last.optim["average"])


@pytest.mark.parametrize("cell,on", [("lstm", True), ("gru", False), ("rnn", False)])
def test_layer_norm_is_on_by_default_for_the_lstm_only(corpus, tmp_path, cell, on):
    m = train(corpus, out=tmp_path / "run", steps=2, cell=cell, **TINY)
    assert m.config["layer_norm"] is on
    assert checkpoint.load(tmp_path / "run", prefer="last").meta["train"]["layer_norm"] is on


@pytest.mark.parametrize("optimizer,decay", [(None, 0.05), ("adamw", 0.05), ("adam", 0.0), ("sgd", 0.0)])
def test_weight_decay_is_adamws_by_default_and_off_for_the_other_optimizers(corpus, tmp_path, optimizer,
                                                                            decay):
    opts = dict(TINY) if optimizer is None else dict(TINY, optimizer=optimizer)
    train(corpus, out=tmp_path / "run", steps=2, **opts)
    kept = checkpoint.load(tmp_path / "run", prefer="last").meta["train"]
    assert (kept["optimizer"], kept["weight_decay"]) == (optimizer or "adamw", decay)


def test_layer_norm_is_off_by_default_for_an_lstm_too_narrow_to_normalise(corpus, tmp_path):
    m = train(corpus, out=tmp_path / "run", steps=2, **dict(TINY, hidden=3))
    assert m.config["layer_norm"] is False


# windows of 16x32 characters: an epoch of the corpus's first 80% is 10 steps
SHIFTED = dict(TINY, batch=16, seq_len=32, val_frac=0.2, eval_every=5, epoch_shift=True)


def test_an_epoch_shift_keeps_the_first_epoch_and_changes_the_later_ones(corpus, tmp_path):
    train(corpus, out=tmp_path / "shifted", steps=20, **SHIFTED)
    train(corpus, out=tmp_path / "aligned", steps=20, **dict(SHIFTED, epoch_shift=False))
    shifted, aligned = losses(tmp_path / "shifted"), losses(tmp_path / "aligned")
    assert shifted[:2] == aligned[:2] and shifted[2:] != aligned[2:]


def test_same_seed_gives_the_same_losses_with_an_epoch_shift(corpus, tmp_path):
    train(corpus, out=tmp_path / "a", steps=20, **SHIFTED)
    train(corpus, out=tmp_path / "b", steps=20, **SHIFTED)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_with_an_epoch_shift_continues_bit_identically(corpus, tmp_path):
    opts = dict(SHIFTED, schedule="constant", dropout=0.2)
    train(corpus, out=tmp_path / "whole", steps=30, **opts)
    train(corpus, out=tmp_path / "split", steps=15, **opts)  # halfway through the second epoch
    train(corpus, resume=tmp_path / "split", steps=30, quiet=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.parametrize("option,value", [("beta2", 1.0), ("beta2", -0.1), ("lr_end", 1.5),
                                          ("lr_end", float("nan"))])
def test_an_adam_beta2_or_lr_end_out_of_range_is_refused(corpus, tmp_path, option, value):
    with pytest.raises(CharrnnError, match=option.replace("_", "-")):
        train(corpus, out=tmp_path, steps=2, **{**TINY, option: value})


def test_sharded_training_resumes_bit_identically(corpus, tmp_path):
    # a constant rate: a linear or cosine schedule spans the budget, which resuming extends
    opts = dict(TINY, batch=8, threads=2, dropout=0.2, weight_drop=0.0, output_dropout=0.0,
                schedule="constant")
    train(corpus, out=tmp_path / "whole", steps=30, **opts)
    with parallel.thread_limit(2):
        assert parallel.shard_cuts(opts["batch"]) == [0, 4, 8]  # two shards ran
    train(corpus, out=tmp_path / "split", steps=15, **opts)
    train(corpus, resume=tmp_path / "split", steps=30, quiet=True, threads=2)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_best_checkpoint_holds_the_lowest_validation_loss(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=30, **TINY)
    best = checkpoint.load(tmp_path, prefer="best")
    assert best.meta["progress"]["best_val"] == min(v for _, _, v in losses(tmp_path))


def test_patience_stops_early(corpus, tmp_path):
    # an lr too small to change a float32 weight: validation never improves
    train(corpus, out=tmp_path, steps=400, patience=2, lr=1e-12, **TINY)
    assert [step for step, _, _ in losses(tmp_path)] == [5, 10, 15]


def test_epochs_budget_counts_passes_over_the_training_split(corpus, tmp_path):
    train(corpus, out=tmp_path, epochs=1, **TINY)
    assert losses(tmp_path)[-1][0] == len(charrnn.data.Windows(
        np.zeros(int(len(corpus.read_text()) * 0.95)), 4, 8))


def test_divergence_stops_with_a_hint_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    before = (tmp_path / "last.ckpt").read_bytes()
    with pytest.raises(TrainingStopped, match=r"diverged.*--lr"):
        train(corpus, resume=tmp_path, steps=500, lr=1e4, quiet=True)
    assert (tmp_path / "last.ckpt").read_bytes() == before


def test_resume_refuses_a_different_model_option(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    with pytest.raises(CharrnnError, match="--hidden 32 differs"):
        train(corpus, resume=tmp_path, hidden=32)


def test_resume_refuses_a_corpus_outside_the_vocabulary(corpus, tmp_path):
    train(corpus, out=tmp_path / "run", steps=5, **TINY)
    other = tmp_path / "other.txt"
    other.write_text("zzz ☃ xyz " * 500)
    with pytest.raises(CharrnnError, match="vocabulary"):
        train(other, resume=tmp_path / "run", steps=10)


def test_a_directory_corpus_is_its_files_in_sorted_order(corpus, tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    text = corpus.read_text()
    (d / "b.txt").write_text(text[len(text) // 2:])
    (d / "a.txt").write_text(text[:len(text) // 2])
    train(d, out=tmp_path / "dir", steps=5, **TINY)
    train(corpus, out=tmp_path / "file", steps=5, **TINY)
    assert losses(tmp_path / "dir") == losses(tmp_path / "file")


# ------------------------------------------------------------ checkpoints

def test_checkpoint_loads_without_pickle_and_carries_a_version(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    with np.load(tmp_path / "last.ckpt", allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["format"] == "charrnn-checkpoint" and meta["version"] == checkpoint.VERSION
    assert {"model", "vocab", "train", "progress", "metrics"} <= set(meta)


def test_truncated_checkpoint_is_a_clear_error(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CharrnnError, match="not a readable charrnn checkpoint"):
        checkpoint.load(tmp_path / "cut.ckpt")


def test_foreign_npz_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(CharrnnError, match="not a readable charrnn checkpoint"):
        checkpoint.load(tmp_path / "x.npz")


def test_newer_checkpoint_version_asks_for_an_upgrade(corpus, tmp_path, monkeypatch):
    train(corpus, out=tmp_path, steps=5, **TINY)
    ck = checkpoint.load(tmp_path)
    monkeypatch.setattr(checkpoint, "VERSION", 99)
    checkpoint.save(tmp_path / "new.ckpt", ck)
    monkeypatch.undo()
    with pytest.raises(CharrnnError, match="upgrade"):
        checkpoint.load(tmp_path / "new.ckpt")


def test_failed_write_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    train(corpus, out=tmp_path, steps=5, **TINY)
    before = (tmp_path / "last.ckpt").read_bytes()

    def disk_full(f, **arrays):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(CharrnnError, match="disk is full"):
        checkpoint.save(tmp_path / "last.ckpt", checkpoint.load(tmp_path))
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "best.ckpt", "last.ckpt", "metrics.jsonl"]


# -------------------------------------------------------------------- CLI

def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("make,args,match", [
    (lambda d: None, [], "no such file|neither a file"),
    (lambda d: (d / "c.txt").write_text(""), [], "empty"),
    (lambda d: (d / "c.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), [], "--bytes"),
    (lambda d: (d / "c.txt").write_text("short text"), [], "too few"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--lr", "-1"], "--lr must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--hidden", "0"], "--hidden must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--val-frac", "1.5"], "--val-frac"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--val-chars", "100"], "--val-chars"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--eval-every", "10x"], "--eval-every must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--weight-drop", "1"], "--weight-drop must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--average", "-0.5"], "--average must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--weight-decay", "-1"], "--weight-decay must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--cell", "gru", "--layer-norm"],
     "--layer-norm is for --cell lstm"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--hidden", "2", "--layer-norm"],
     "--layer-norm needs --hidden 4 or more"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--cell", "gru", "--zoneout", "0.2"],
     "--zoneout is for --cell lstm"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--zoneout", "1"], "--zoneout must be"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--resume", "nowhere"], "no such checkpoint"),
    (lambda d: (d / "c.txt").write_text("x" * 9000), ["--device", "cuda"], "--device cuda: .*(CUDA|cuda)"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, make, args, match):
    import re
    make(tmp_path)
    r = run_cli("train", tmp_path / "c.txt", "--out", tmp_path / "run", *args)
    assert r.exit_code == 1
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert re.search(match, r.output), r.output


def test_unwritable_output_directory_is_an_error(corpus, tmp_path):
    (tmp_path / "file").write_text("")
    r = run_cli("train", corpus, "--out", tmp_path / "file" / "run", "--steps", 3, "--hidden", 8)
    assert r.exit_code == 1 and "cannot write to the output directory" in r.output


def test_quiet_prints_nothing(corpus, tmp_path):
    r = run_cli("train", corpus, "--out", tmp_path, "--steps", 5, "--hidden", 8, "--batch", 4,
                "--seq-len", 8, "--quiet")
    assert r.exit_code == 0 and r.output == ""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_and_resume_matches_an_uninterrupted_run(corpus, tmp_path, sig, code):
    # a constant rate and set regularisers: the resume extends the budget they would follow
    args = ["--hidden", 16, "--batch", 4, "--seq-len", 8, "--eval-every", 5, "--dropout", 0.2,
            "--weight-drop", 0, "--output-dropout", 0, "--schedule", "constant"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", str(corpus), "--out",
                             str(tmp_path / "run"), "--steps", "100000", *map(str, args)],
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "--resume" in err.strip().splitlines()[-1]
    stopped_at = checkpoint.load(tmp_path / "run", prefer="last").meta["progress"]["step"]
    total = stopped_at + 7
    r = run_cli("train", corpus, "--resume", tmp_path / "run", "--steps", total, "--quiet")
    assert r.exit_code == 0, r.output
    r = run_cli("train", corpus, "--out", tmp_path / "whole", "--steps", total, "--quiet", *args)
    assert r.exit_code == 0, r.output
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")


def test_a_cold_kernel_cache_gives_the_losses_of_a_warm_one(corpus, tmp_path):
    """The first run after an install compiles the kernels; later ones load
    them from the cache. Both must compute the same numbers (IR-inlined
    closures once made them differ by ~1e-10)."""
    env = dict(os.environ, CHARRNN_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    for run in ("cold", "warm"):
        subprocess.run([sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out",
                        str(tmp_path / run), "--steps", "10", "--hidden", "16", "--batch", "4",
                        "--seq-len", "8", "--eval-every", "5", "--dropout", "0.2", "--quiet"],
                       env=env, check=True, timeout=600)
    assert losses(tmp_path / "cold") == losses(tmp_path / "warm")
