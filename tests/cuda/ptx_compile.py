"""Compile every kernel of charrnn.kernels.cuda for a real GPU (sm_80), for
tests/cuda/test_ptx.py, which runs this script in a subprocess:

    python tests/cuda/ptx_compile.py      (NUMBA_ENABLE_CUDASIM must not be set)

No GPU is needed, but NVVM is (e.g. from ``numba-cuda[cu13]``). Compiling
with the argument types the host functions pass is real type inference, the
checking the simulator does not do.

Prints one JSON object: ``{"reason": why not}`` when PTX cannot be compiled
here, else ``{"kernels": [...], "compiled": [...], "float64": [...]}``: every
``*_kernel`` of the module, those compiled, and those whose PTX holds float64
instructions.
"""
import json
import os


def problem():
    """None if numba-cuda compiles a trivial kernel to PTX here, else why not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set: the simulator compiles no PTX"
    try:
        from numba import cuda
        if getattr(cuda, "implementation", "Built-in") != "NVIDIA":
            return "numba-cuda is not installed: pip install numba-cuda"
        from numba import float32

        def k(a):
            a[0] = 1.0

        cuda.compile_ptx(k, (float32[::1],), cc=(8, 0))
    except Exception as exc:  # no NVVM, typically
        return f"{type(exc).__name__}: {exc}"
    return None


def compile_all():
    from types import SimpleNamespace

    import numba.cuda.dispatcher as dispatcher
    from numba import boolean, cuda
    from numba import float32 as f4
    from numba import float64 as f8
    from numba import int32 as i4
    from numba import int64 as i8

    # Device functions compile for "the current device", which needs a driver;
    # point them at the same target as the kernels instead.
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(8, 0))

    from charrnn.kernels import cuda as gpu

    a1, a2, a3, ids = f4[::1], f4[:, ::1], f4[:, :, ::1], i4[::1]
    signatures = {
        "_gemm_kernel": (a2, a2, a2, boolean, boolean, f4),
        "_embedding_forward_kernel": (a2, a2, ids, a1),
        "_embedding_scatter_kernel": (a2, a2, ids),
        "_add_bias_kernel": (a2, a1),
        "_column_sum_kernel": (a1, a2),
        "_multiply_kernel": (a1, a1, a1),
        "_fill_kernel": (a1, f4),
        "_transpose_kernel": (a2, a2),
        "_cell_forward_kernel": (i8, i8, a3, a2, a1, a3, a3, a3, a3, a3),
        "_cell_backward_kernel": (i8, i8, a3, a2, a3, a3, a3, a3, a3, a2, a3, a3),
        "_ln_lstm_forward_kernel": (i8, a3, a2, a1, a2, a3, a3, a3, a3, a3),
        "_ln_lstm_backward_kernel": (i8, a3, a2, a2, a3, a3, a3, a3, a2, a3, a3),
        "_multiplicative_forward_kernel": (i8, a3, a3, a3),
        "_multiplicative_backward_kernel": (i8, a2, a3, a3, a3, a3),
        "_copy_gates_kernel": (a3, a3),
        "_softmax_cross_entropy_kernel": (a2, f8[::1], a2, ids, f8),
        "_squared_norm_kernel": (f8[::1], a1),
        "_adam_kernel": (a1, a1, a1, a1) + (f4,) * 8,
        "_rmsprop_kernel": (a1, a1, a1, a1) + (f4,) * 6,
        "_adagrad_kernel": (a1, a1, a1) + (f4,) * 4,
        "_sgd_kernel": (a1, a1, a1) + (f4,) * 4,
        "_average_kernel": (a1, a1, f4),
        "_pick_tokens_kernel": (ids, a2, f8, i8, f8, f8[::1]),
    }
    kernels = sorted(k for k in vars(gpu) if k.endswith("_kernel"))
    compiled, float64_kernels = [], []
    for name in kernels:
        if name in signatures:
            ptx, _ = cuda.compile_ptx(getattr(gpu, name).py_func, signatures[name], cc=(8, 0))
            compiled.append(name)
            if ".f64" in ptx:
                float64_kernels.append(name)
    return {"kernels": kernels, "compiled": compiled, "float64": float64_kernels}


if __name__ == "__main__":
    why = problem()
    print(json.dumps({"reason": why} if why else compile_all()), flush=True)
