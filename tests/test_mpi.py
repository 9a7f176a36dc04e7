"""Data-parallel training over MPI (``mpiexec -n N charrnn train``) equals
one process cutting the same streams. Skipped, with the reason, without
mpi4py and mpiexec (``pip install "charrnn[mpi]"``)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn import CharrnnError, checkpoint, distributed

MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(MPIEXEC is None or not HAVE_MPI4PY,
                               reason='needs mpi4py and mpiexec: pip install "charrnn[mpi]"')

# a constant rate and set regularisers: resuming extends the budget they would follow
OPTS = ["--hidden", "24", "--batch", "12", "--seq-len", "16", "--dropout", "0.3", "--weight-drop", "0.2",
        "--output-dropout", "0.1", "--zoneout", "0.2", "--schedule", "constant", "--eval-every", "10", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(5)
    words = ["the", "king", "of", "love", "and", "night", "ROMEO:", "JULIET:", "be", "not", "to"]
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(" ".join(words[i] for i in rng.integers(0, len(words), 9))
                              for _ in range(900)) + "\n")
    return path


def charrnn(*args, ranks=1, timeout=300, check=True):
    cmd = [sys.executable, "-m", "charrnn.cli", *map(str, args)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def val_losses(run):
    return [(row["step"], row["val_loss"]) for row in
            map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())]


@needs_mpi
def test_two_ranks_log_the_validation_losses_of_one_process_with_two_threads(corpus, tmp_path):
    charrnn("train", corpus, "--out", tmp_path / "one", "--threads", 2, "--steps", 60, *OPTS)
    charrnn("train", corpus, "--out", tmp_path / "two", "--threads", 1, "--steps", 60, *OPTS, ranks=2)
    assert val_losses(tmp_path / "two") == val_losses(tmp_path / "one")  # bit for bit
    assert len(val_losses(tmp_path / "one")) == 6


@needs_mpi
def test_three_ranks_match_one_process_cutting_the_same_streams(corpus, tmp_path):
    charrnn("train", corpus, "--out", tmp_path / "one", "--threads", 3, "--steps", 50, *OPTS)
    charrnn("train", corpus, "--out", tmp_path / "three", "--threads", 1, "--steps", 50, *OPTS,
            ranks=3)
    for (s1, a), (s3, b) in zip(val_losses(tmp_path / "one"), val_losses(tmp_path / "three")):
        assert s1 == s3 and b == pytest.approx(a, rel=1e-5)


@needs_mpi
def test_the_same_rank_count_reruns_bit_identically(corpus, tmp_path):
    for name in ("a", "b"):
        charrnn("train", corpus, "--out", tmp_path / name, "--threads", 1, "--steps", 30, *OPTS,
                ranks=2)
    assert val_losses(tmp_path / "a") == val_losses(tmp_path / "b")
    a, b = (checkpoint.load(tmp_path / n, prefer="last") for n in ("a", "b"))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


@needs_mpi
@pytest.mark.parametrize("ranks,threads", [(1, 2), (4, 1)])
def test_a_run_on_two_ranks_resumes_on_any_number_of_ranks(corpus, tmp_path, ranks, threads):
    charrnn("train", corpus, "--out", tmp_path / "whole", "--threads", 1, "--steps", 40, *OPTS,
            ranks=2)
    charrnn("train", corpus, "--out", tmp_path / "split", "--threads", 1, "--steps", 20, *OPTS,
            ranks=2)
    charrnn("train", corpus, "--resume", tmp_path / "split", "--steps", 40, "--threads", threads,
            "--quiet", ranks=ranks)
    for (s1, a), (s2, b) in zip(val_losses(tmp_path / "whole"), val_losses(tmp_path / "split")):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-6)


@needs_mpi
def test_two_ranks_shift_the_epochs_as_one_process_does(corpus, tmp_path):
    shifted = [*OPTS, "--epoch-shift", "--val-frac", "0.9", "--steps", 40]  # 19 steps an epoch
    charrnn("train", corpus, "--out", tmp_path / "one", "--threads", 2, *shifted)
    charrnn("train", corpus, "--out", tmp_path / "two", "--threads", 1, *shifted, ranks=2)
    assert val_losses(tmp_path / "two") == val_losses(tmp_path / "one")  # bit for bit


@needs_mpi
def test_two_ranks_as_two_hosts_log_the_losses_of_one_process(corpus, tmp_path):
    """Two "hosts" on this machine: Hydra's fork launcher with two loopback
    addresses (each rank sees itself alone on its node) and shared memory
    off, so the gradients cross MPI's network module."""
    charrnn("train", corpus, "--out", tmp_path / "one", "--threads", 2, "--steps", 30, *OPTS)
    probe = subprocess.run([MPIEXEC, "-launcher", "fork", "-hosts", "127.0.0.1,127.0.0.2", "-n", "2",
                            "-ppn", "1", "env", "MPIR_CVAR_NOLOCAL=1", sys.executable, "-c",
                            "import os; os.write(1, f\"{os.environ['PMI_HOSTNAME']} {os.environ['MPI_LOCALNRANKS']}\\n\".encode())"],
                           capture_output=True, text=True, timeout=120)
    assert sorted(probe.stdout.split()) == ["1", "1", "127.0.0.1", "127.0.0.2"], probe.stderr
    r = subprocess.run([MPIEXEC, "-launcher", "fork", "-hosts", "127.0.0.1,127.0.0.2", "-n", "2",
                        "-ppn", "1", "env", "MPIR_CVAR_NOLOCAL=1", sys.executable, "-m", "charrnn.cli",
                        "train", str(corpus), "--out", str(tmp_path / "two"), "--threads", "1",
                        "--steps", "30", *OPTS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert val_losses(tmp_path / "two") == val_losses(tmp_path / "one")


@needs_mpi
def test_more_ranks_than_streams_is_one_line_on_rank_0_and_every_rank_fails(corpus, tmp_path):
    r = charrnn("train", corpus, "--out", tmp_path, "--batch", 2, "--steps", 5, "--quiet",
                ranks=3, check=False)
    assert r.returncode != 0
    assert r.stderr.count("error:") == 1 and "fewer streams than the 3 ranks" in r.stderr


@needs_mpi
def test_ranks_that_see_different_corpora_stop_with_one_line(corpus, tmp_path):
    # rank 1 reads another file at the same path
    for d in ("r0", "r1"):
        (tmp_path / d).mkdir()
    shutil.copy(corpus, tmp_path / "r0" / "c.txt")
    (tmp_path / "r1" / "c.txt").write_text(corpus.read_text().replace("king", "kong"))
    r = per_rank_directories(tmp_path, "train", "c.txt", "--out", tmp_path / "run", "--steps", "5", *OPTS)
    assert r.returncode != 0 and r.stderr.count("error:") == 1
    assert "see different corpora from rank 0" in r.stderr


@needs_mpi
def test_ranks_given_different_options_stop_with_one_line(corpus, tmp_path):
    script = ("import os, sys; from charrnn.cli import main;"
              "sys.argv = sys.argv + (['--lr', '0.01'] if os.environ.get('PMI_RANK') == '1' else []); main()")
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", script, "train", corpus,
                        "--out", tmp_path / "run", "--steps", "5", *OPTS],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.count("error:") == 1
    assert "ranks 1 see different options from rank 0" in r.stderr


# rank 0 works in argv[1], the others in argv[2]; the rest is the charrnn command
PER_RANK_DIRECTORY = ("import os, sys; os.chdir(sys.argv[1] if os.environ.get('PMI_RANK') == '0' "
                      "else sys.argv[2]); from charrnn.cli import main; sys.argv = sys.argv[:1] + sys.argv[3:]; main()")


def per_rank_directories(tmp_path, *args):
    """mpiexec -n 2 charrnn ARGS, each rank in a directory of its own (r0, r1)."""
    return subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", PER_RANK_DIRECTORY, tmp_path / "r0",
                           tmp_path / "r1", *map(str, args)], capture_output=True, text=True, timeout=300)


@needs_mpi
def test_a_run_directory_the_ranks_do_not_share_is_one_line(corpus, tmp_path):
    # --out relative: as two hosts without a shared disk
    for d in ("r0", "r1"):
        (tmp_path / d).mkdir()
    r = per_rank_directories(tmp_path, "train", corpus, "--out", "run", "--steps", "5", *OPTS)
    assert r.returncode != 0 and r.stderr.count("error:") == 1
    assert "must be on a file system every host shares" in r.stderr


def _training_in_background(corpus, out):
    """mpiexec -n 2 training (no end in sight), once it has written last.ckpt."""
    p = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "charrnn.cli", "train", str(corpus),
                          "--out", str(out), "--threads", "1", "--steps", "100000", *OPTS],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    return p


@needs_mpi
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_loads(corpus, tmp_path):
    p = _training_in_background(corpus, tmp_path)
    ranks = subprocess.run(["pgrep", "-f", f"charrnn.cli train {corpus}"], capture_output=True, text=True)
    pids = [int(x) for x in ranks.stdout.split()]
    assert len(pids) >= 2
    os.kill(max(pids), signal.SIGKILL)
    t0 = time.time()
    p.communicate(timeout=60)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert checkpoint.load(tmp_path, prefer="last").meta["progress"]["step"] >= 10


@needs_mpi
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_mpiexec_saves_last_and_exits_as_one_process_does(corpus, tmp_path, sig, code):
    p = _training_in_background(corpus, tmp_path)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and err.count("error:") == 1 and "--resume" in err
    assert checkpoint.load(tmp_path, prefer="last").meta["progress"]["step"] >= 10


def test_under_mpiexec_without_mpi4py_the_error_names_the_extra(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(CharrnnError, match=r'pip install "charrnn\[mpi\]"'):
        distributed.world()


def test_without_mpiexec_training_does_not_import_mpi4py(tmp_path):
    code = ("import sys, charrnn.cli, charrnn.train, charrnn.distributed as d;"
            "w = d.world(); assert w.size == 1 and 'mpi4py' not in sys.modules, sorted(sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


@needs_mpi
def test_a_rank_that_fails_alone_ends_the_ranks_waiting_for_it(tmp_path):
    """An error on one rank while the others wait in a collective ends the
    job (World.finish: MPI_Abort after a grace period) instead of hanging."""
    script = ("import numpy as np, charrnn.distributed as d; w = d.world();"
              "w.finish(3) if w.rank == 0 else w.sum_into(np.zeros(4))")
    t0 = time.time()
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3 and time.time() - t0 < 60
