"""The CUDA backend computes what the CPU backend does, whole model included.

No GPU is needed: tests/cuda_model_checks.py runs on numba-cuda's simulator
(switched on before numba is imported, hence a subprocess, started once) and
prints one JSON result per check; each test asserts one. Skipped where the
simulator is not usable (numba-cuda not installed).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


SHARDS = 2  # one simulator process per core


@pytest.fixture(scope="module")
def checks():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "cuda_model_checks.py"),
                               f"{i}/{SHARDS}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(SHARDS)]
    found = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if not records[0]["ok"]:
            pytest.skip(f"CUDA simulator not usable: {records[0]['reason']}")
        found.update({rec["check"]: rec for rec in records[1:]})
    return found


@pytest.mark.parametrize("name", ["training_lstm_tanh_onehot", "training_gru_tanh_emb",
                                  "training_rnn_tanh_onehot", "training_rnn_relu_emb"])
def test_losses_gradients_and_adam_steps_match_the_cpu(checks, name):
    assert checks[name]["err"] < TOL


@pytest.mark.parametrize("name", ["sampling_argmax", "sampling_top_k_top_p"])
def test_sampling_with_a_seed_gives_the_cpus_text(checks, name):
    assert checks[name]["same"], checks[name]


def test_a_model_trained_on_the_gpu_samples_on_the_cpu(checks):
    assert checks["train_on_gpu_sample_on_cpu"]["same"]
