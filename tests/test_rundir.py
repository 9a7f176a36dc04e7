"""A run directory belongs to one training at a time and is never clobbered."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.cli import main
from charrnn.train import train

TINY = dict(hidden=8, layers=1, batch=4, seq_len=8, eval_every=5, quiet=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = ["to", "be", "or", "not", "that", "is", "the", "question"]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 800)) + "\n")
    return path


def cli_train(corpus, out, *args):
    return CliRunner().invoke(main, ["train", str(corpus), "--out", str(out), "--hidden", "8",
                                     "--layers", "1", "--batch", "4", "--seq-len", "8",
                                     "--eval-every", "5", "--quiet", *map(str, args)])


def snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}


def test_training_into_a_directory_that_holds_a_run_is_refused_and_keeps_it(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=10, **TINY)
    before = snapshot(tmp_path)
    r = cli_train(corpus, tmp_path, "--steps", 5)
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert f"--resume {tmp_path}" in r.output and "--overwrite" in r.output
    assert snapshot(tmp_path) == before


def test_overwrite_starts_the_run_afresh(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=10, **TINY)
    r = cli_train(corpus, tmp_path, "--steps", 5, "--overwrite")
    assert r.exit_code == 0, r.output
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and '"step": 5' in steps[0]


def test_resuming_the_run_in_its_own_directory_is_allowed(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    r = CliRunner().invoke(main, ["train", str(corpus), "--resume", str(tmp_path), "--steps", "10",
                                  "--quiet"])
    assert r.exit_code == 0, r.output


def test_overwrite_with_resume_of_the_same_run_is_refused(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    r = CliRunner().invoke(main, ["train", str(corpus), "--resume", str(tmp_path), "--overwrite"])
    assert r.exit_code == 1 and "give one of them" in r.output


def _holder(run):
    """Another process that owns ``run`` until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from charrnn.rundir import RunDir
        with RunDir({str(run)!r}).claim():
            print("held", flush=True)
            time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_directory_in_use_by_another_process_is_refused_until_it_dies(corpus, tmp_path):
    holder = _holder(tmp_path)
    try:
        r = cli_train(corpus, tmp_path, "--steps", 5)
        assert r.exit_code == 1 and f"in use by another charrnn process (pid {holder.pid})" in r.output
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed owner leaves its lock file behind...
        holder.wait()
    assert (tmp_path / ".lock").exists()
    r = cli_train(corpus, tmp_path, "--steps", 5)  # ...which does not block the next run
    assert r.exit_code == 0, r.output


def test_sampling_into_a_closed_pipe_stops_quietly(corpus, tmp_path):
    train(corpus, out=tmp_path, steps=5, **TINY)
    p = subprocess.Popen([sys.executable, "-m", "charrnn.cli", "sample", str(tmp_path),
                          "--length", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()  # as `| head` does
    err = p.stderr.read()
    assert p.wait(timeout=60) == 128 + signal.SIGPIPE and err == b""
    assert os.path.exists(tmp_path / "best.ckpt")
