"""The CUDA kernels (charrnn.kernels.cuda) compute what their CPU twins do.

No GPU is needed: tests/cuda_kernel_checks.py runs every kernel on numba-cuda's
simulator, next to the CPU kernel on the same random inputs, and prints one
JSON result per check; each test here asserts one of them. The simulator must
be switched on before numba is imported (NUMBA_ENABLE_CUDASIM=1), and the rest
of the suite imports numba normally, so the checks run in subprocesses,
started once per module: two shards in parallel, since the simulator runs
every GPU thread as a Python thread and is slow.

A second subprocess compiles every kernel to PTX for a real GPU (sm_80), the
type checking that the simulator skips. Each group is skipped when its
subprocess reports that it cannot run here: the simulator without numba-cuda,
PTX without NVVM (``numba-cuda[cu13]`` or ``[cu12]`` provides it).

Errors are max |cuda - cpu| / max |cpu|.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "cuda_kernel_checks.py"
SIM_SHARDS = 2
TOL = 1e-5
# cpu.py compiles with fastmath 'reassoc', which lets LLVM regroup
# b2*v + (1-b2)*g*g: the CPU's moment buffers then stray ~2e-5 from exact
# float32 per step (CUDA's stay at ~1e-7), so optimizer state gets this.
STATE_TOL = 1e-4
CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def _start(mode, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if mode == "sim":
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.Popen([sys.executable, str(SCRIPT), mode, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc):
    """{check: record}, or a skip reason string if the target is unusable."""
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(proc.args)} failed:\n{err[-4000:]}")
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    usable = records[0]
    if not usable["ok"]:
        return usable["reason"]
    return {r["check"]: r for r in records[1:]}


@pytest.fixture(scope="module")
def runs():
    # all subprocesses at once: the simulator shards are single-threaded (GIL)
    procs = {"ptx": [_start("ptx")],
             "sim": [_start("sim", f"--shard={k}/{SIM_SHARDS}") for k in range(SIM_SHARDS)]}
    results = {}
    for mode, group in procs.items():
        parts = [_collect(p) for p in group]
        reasons = [p for p in parts if isinstance(p, str)]
        results[mode] = reasons[0] if reasons else {k: v for p in parts for k, v in p.items()}
    return results


def _mode(runs, mode):
    if isinstance(runs[mode], str):
        pytest.skip(f"CUDA {mode} not usable: {runs[mode]}")
    return runs[mode]


@pytest.fixture(scope="module")
def sim(runs):
    return _mode(runs, "sim")


@pytest.fixture(scope="module")
def ptx(runs):
    return _mode(runs, "ptx")


def result(records, name):
    assert name in records, f"check {name} did not run"
    assert "error" not in records[name], records[name]["error"]
    return records[name]["result"]


def assert_close(errors, tol=TOL):
    assert max(errors.values()) <= tol, errors


# ---------------------------------------------------------------------- GEMM

@pytest.mark.parametrize("ops", ["nn", "nt", "tn", "tt"])
def test_gemm_matches_numpy_with_partial_tiles_for_every_transpose(sim, ops):
    assert_close(result(sim, f"gemm_{ops}"))


def test_gemm_adds_beta_times_c(sim):
    assert_close(result(sim, "gemm_beta"))


def test_gemm_with_beta_0_does_not_read_c(sim):
    assert_close(result(sim, "gemm_beta0_ignores_c"))  # c held NaN


# ------------------------------------------------------------ layers by name

def test_embedding_forward_matches_cpu(sim):
    assert_close(result(sim, "embedding_forward"))


def test_embedding_backward_overwrites_with_the_cpus_scatter_add(sim):
    assert_close(result(sim, "embedding_backward"))


def test_linear_forward_matches_cpu(sim):
    assert_close(result(sim, "linear_forward"))


def test_linear_backward_overwrites_with_the_cpus_gradients(sim):
    assert_close(result(sim, "linear_backward"))


def test_column_sum_matches_cpu(sim):
    assert_close(result(sim, "column_sum"))


def test_apply_dropout_matches_cpu(sim):
    assert_close(result(sim, "apply_dropout"))


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_forward_matches_cpu(sim, cell):
    assert_close(result(sim, f"recurrent_forward_{cell}"))


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_backward_matches_cpu(sim, cell):
    assert_close(result(sim, f"recurrent_backward_{cell}"))


def test_softmax_cross_entropy_matches_cpu(sim):
    r = result(sim, "softmax_cross_entropy")
    assert r["loss_is_float"]
    assert_close({"dlogits": r["dlogits"], "loss": r["loss"]})


# ---------------------------------------------------------------- optimizers

@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "rmsprop_momentum", "adagrad",
                                  "sgd", "sgd_momentum"])
def test_three_optimizer_steps_match_cpu(sim, name):
    r = result(sim, f"optimizer_{name}")
    assert r.pop("p") <= TOL
    assert_close(r, STATE_TOL)


def test_squared_norm_matches_cpu(sim):
    r = result(sim, "squared_norm")
    assert r["is_float"]
    assert r["norm"] <= TOL


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("case", ["argmax", "temperature_1", "top_k", "top_p",
                                  "top_k_and_top_p", "top_k_beyond_vocabulary",
                                  "cold_top_p"])
def test_pick_tokens_picks_the_cpus_ids(sim, case):
    r = result(sim, f"pick_tokens_{case}")
    assert r["cuda"] == r["cpu"]


# -------------------------------------------------------- real-GPU compiling

def test_every_kernel_compiles_for_a_real_gpu(ptx):
    r = result(ptx, "ptx")
    assert r["compiled"] == r["kernels"]  # a new kernel needs a signature in the script


def test_float32_kernels_do_no_float64_arithmetic(ptx):
    # float64 runs at a fraction of float32's rate; only the kernels that
    # mirror the CPU's float64 sums (losses, norms, sampling) may use it
    assert set(result(ptx, "ptx")["float64"]) == {
        "_softmax_cross_entropy_kernel", "_squared_norm_kernel", "_pick_tokens_kernel"}
