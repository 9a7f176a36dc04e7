"""Every CUDA kernel compiles for a real GPU (sm_80), no GPU needed.

PTX needs numba-cuda without the simulator, which conftest.py switches on for
this process, so ptx_compile.py (beside this file) compiles them in a
subprocess started without NUMBA_ENABLE_CUDASIM. Skipped, with the
subprocess's reason, where it cannot compile PTX (no NVVM:
``numba-cuda[cu13]`` or ``[cu12]`` provides it).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

USES_SIMULATOR = False  # conftest.py: do not skip these when the simulator is unusable
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "ptx_compile.py"


@pytest.fixture(scope="module")
def ptx():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "reason" in result:
        pytest.skip(f"cannot compile PTX here: {result['reason']}")
    return result


def test_every_kernel_compiles_for_a_real_gpu(ptx):
    # a new kernel needs a signature in ptx_compile.py
    assert ptx["compiled"] == ptx["kernels"]


def test_float32_kernels_do_no_float64_arithmetic(ptx):
    # float64 runs at a fraction of float32's rate; only the kernels that
    # mirror the CPU's float64 sums (losses, norms, sampling) may use it
    assert set(ptx["float64"]) == {
        "_softmax_cross_entropy_kernel", "_squared_norm_kernel", "_pick_tokens_kernel"}
