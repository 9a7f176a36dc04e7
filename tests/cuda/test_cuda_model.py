"""The CUDA backend computes what the CPU backend does, whole model included:
the same losses, gradients, optimizer steps and sampled text, on numba-cuda's
simulator (see conftest.py). Tiny shapes: the simulator is slow.
"""
import numpy as np
import pytest

import charrnn
from charrnn import Model, Vocab
from charrnn.generate import sample
from charrnn.optim import Optimizer

V, H, E, B, T = 7, 4, 3, 2, 4  # the simulator runs each GPU thread as a Python thread
TOL = 1e-5


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


def windows(seed):
    """Two consecutive [B, T] windows (x, y) of one random stream per row."""
    s = np.random.default_rng(seed).integers(0, V, size=(B, 2 * T + 1))
    return [(s[:, k * T:(k + 1) * T], s[:, k * T + 1:(k + 1) * T + 1]) for k in (0, 1)]


def model_pair(cell, nonlinearity, embed, **regularisers):
    """The same model (same seed) on the CPU and on the GPU."""
    kw = dict(cell=cell, hidden=H, layers=2, embed=embed, nonlinearity=nonlinearity, seed=3,
              **regularisers)
    cpu, gpu = Model(V, **kw), Model(V, **kw, device="cuda")
    assert (cpu.device, gpu.device) == ("cpu", "cuda")
    cpu.vocab = gpu.vocab = Vocab("abcdefg")
    return cpu, gpu


@pytest.mark.parametrize("cell, nonlinearity, embed, layer_norm", [
    ("lstm", "tanh", None, False), ("lstm", "tanh", E, True), ("gru", "tanh", E, False),
    ("rnn", "tanh", None, False), ("rnn", "relu", E, False)],
    ids=["lstm_onehot", "lstm_ln_embed", "gru_embed", "rnn_tanh_onehot", "rnn_relu_embed"])
def test_losses_gradients_and_adam_steps_match_the_cpu(cell, nonlinearity, embed, layer_norm):
    """Loss and every gradient over three windows, the state carried and
    every regulariser on (zoneout too, for the LSTM), with a clipped Adam step after each (so the later
    windows see updated weights); then the weights and their average."""
    cpu, gpu = model_pair(cell, nonlinearity, embed, dropout=0.3, output_dropout=0.2, weight_drop=0.3,
                          embed_dropout=0.2, locked_dropout=cell != "lstm", layer_norm=layer_norm,
                          zoneout=0.3 if cell == "lstm" else 0.0)
    opts = [Optimizer.for_model(m, "adam", average=0.9) for m in (cpu, gpu)]
    errors, states = {}, [None, None]
    for w, (x, y) in enumerate(windows(0) + windows(1)[:1]):
        (lc, gc, sc), (lg, gg, sg) = [m.loss_and_grads(x, y, st) for m, st in zip((cpu, gpu), states)]
        states = [sc, sg]
        errors[f"window {w} loss"] = abs(lc - lg) / abs(lc)
        errors.update({f"window {w} grad {k}": rel(gg[k], gc[k]) for k in gc})
        for opt in opts:
            opt.step(0.01, clip=1.0)
    want = cpu.state_dict()
    errors.update({f"weight {k}": rel(w, want[k]) for k, w in gpu.state_dict().items()})
    errors["average"] = rel(opts[1].state_dict()["average"], opts[0].state_dict()["average"])
    assert max(errors.values()) < TOL, {k: v for k, v in errors.items() if not v < TOL}


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.8, top_k=4, top_p=0.7)],
                         ids=["argmax", "top_k_top_p"])
def test_sampling_with_a_seed_gives_the_cpus_text(options):
    cpu, gpu = model_pair("lstm", "tanh", None, zoneout=0.3)
    want = sample(cpu, 8, seed=5, prime="ab", num=2, **options)
    assert sample(gpu, 8, seed=5, prime="ab", num=2, **options) == want


def test_a_model_trained_on_the_gpu_samples_on_the_cpu(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabdabe " * 60)
    charrnn.train(str(corpus), device="cuda", hidden=H, batch=2, seq_len=4, steps=1,
                  val_frac=0.02, eval_every=1, out=str(tmp_path / "run"), quiet=True)
    model = charrnn.load(tmp_path / "run")
    assert model.device == "cpu"
    assert len(model.sample(20, seed=1)) == 20
