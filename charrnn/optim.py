"""Optimizers over the model's flat parameter buffer, gradient clipping,
the weights' moving average and learning-rate schedules."""
import contextlib
import dataclasses
import math

import numpy as np

from .errors import CharrnnError
from .kernels import cpu as K

OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad", "sgd")
# each optimizer's state: one array the size of the parameters per slot
OPTIMIZER_SLOTS = {"adam": ("m", "v"), "adamw": ("m", "v"), "rmsprop": ("v", "buf"),
                   "adagrad": ("s",), "sgd": ("buf",)}
SCHEDULES = ("constant", "cosine", "linear", "step")


def optimizer_slots(name, average=0.0):
    """The names of the optimizer state arrays (each the size of the
    parameters) that ``Optimizer(name, average=average)`` keeps."""
    return OPTIMIZER_SLOTS[name] + (("average",) if average else ())


class Optimizer:
    """One of ``OPTIMIZERS``, updating ``params`` in place from ``grads``
    (both the model's flat float32 buffers, on the host or, with the CUDA
    ``kernels``, on the device) in one fused kernel call.

    Hyper-parameters follow PyTorch's defaults: Adam betas (0.9, ``beta2``
    0.999), eps 1e-8; RMSprop alpha 0.99, eps 1e-8; Adagrad eps 1e-10.

    ``average`` > 0 keeps an exponential moving average of the weights
    after each update, with that decay (warmed up as min(average,
    (1+t)/(10+t)) at update t, so that early weights fade fast);
    ``averaged_weights()`` puts it in the model for evaluation.
    """

    def __init__(self, name, params, grads, momentum=0.0, weight_decay=0.0, kernels=K,
                 average=0.0, beta2=0.999):
        if name not in OPTIMIZERS:
            raise CharrnnError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
        if momentum < 0 or momentum >= 1:
            raise CharrnnError(f"momentum must be in [0, 1), not {momentum}")
        if weight_decay < 0:
            raise CharrnnError(f"weight decay must be >= 0, not {weight_decay}")
        if not 0 <= average < 1:
            raise CharrnnError(f"the weights' average decay must be in [0, 1), not {average}")
        if not 0 <= beta2 < 1:
            raise CharrnnError(f"Adam's beta2 must be in [0, 1), not {beta2}")
        self.name, self.params, self.grads, self.backend = name, params, grads, kernels
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.average, self.beta2 = float(average), float(beta2)
        self.step_count = 0
        self.state = {k: kernels.zeros(params.shape, params.dtype)
                      for k in optimizer_slots(name, average)}
        if average:
            kernels.put(self.state["average"], kernels.get(params))

    @classmethod
    def for_model(cls, model, name="adam", momentum=0.0, weight_decay=0.0, average=0.0,
                  beta2=0.999):
        """An optimizer of ``model``'s parameters, on the model's device."""
        return cls(name, model.params, model.grads, momentum, weight_decay, model.backend, average,
                   beta2)

    def step(self, lr, clip=0.0):
        """Apply one update with learning rate ``lr``; with ``clip`` > 0 the
        gradient is first scaled so its global L2 norm is at most ``clip``.
        Returns the gradient norm before clipping."""
        K = self.backend
        norm = math.sqrt(K.squared_norm(self.grads))
        scale = clip / (norm + 1e-6) if 0 < clip < norm else 1.0  # PyTorch's clip_grad_norm_
        self.step_count += 1
        p, g, s, wd = self.params, self.grads, self.state, self.weight_decay
        if self.name in ("adam", "adamw"):
            K.adam_update(p, g, s["m"], s["v"], lr, 0.9, self.beta2, 1e-8, wd,
                          self.name == "adamw", self.step_count, scale)
        elif self.name == "rmsprop":
            K.rmsprop_update(p, g, s["v"], s["buf"], lr, 0.99, 1e-8, wd, self.momentum, scale)
        elif self.name == "adagrad":
            K.adagrad_update(p, g, s["s"], lr, 1e-10, wd, scale)
        else:
            K.sgd_update(p, g, s["buf"], lr, self.momentum, wd, scale)
        if self.average:
            t = self.step_count
            K.average_update(s["average"], p, min(self.average, (1 + t) / (10 + t)))
        return norm

    @contextlib.contextmanager
    def averaged_weights(self):
        """The block runs with the weights' moving average in the model's
        parameters (the weights themselves without ``average``), and puts
        the weights back after."""
        if not self.average:
            yield
            return
        weights = np.array(self.backend.get(self.params))
        self.keep_average()
        try:
            yield
        finally:
            self.backend.put(self.params, weights)

    def keep_average(self):
        """Put the weights' moving average (if kept) into the model's
        parameters for good: the end of training."""
        if self.average:
            self.backend.put(self.params, self.backend.get(self.state["average"]))

    def state_dict(self):
        return {"step_count": self.step_count,
                **{k: np.array(self.backend.get(v)) for k, v in self.state.items()}}

    def load_state_dict(self, d):
        for k, v in self.state.items():
            if k not in d or np.shape(d[k]) != v.shape:
                raise CharrnnError(f"optimizer state {k!r} is missing or has the wrong shape")
            self.backend.put(v, d[k])
        self.step_count = int(d["step_count"])


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The learning rate against the update number and the share of the
    budget spent (``spent``, 0 to 1: of the steps, the epochs or the
    minutes, whichever is nearest its end), so that a time budget decays
    too.

    - warm-up: linear from base_lr/warmup to base_lr over ``warmup`` steps;
    - ``constant``;
    - ``cosine`` / ``linear``: base_lr until ``decay_start`` of the budget is
      spent (0: from the start), then down to ``min_frac``*base_lr at its end;
    - ``step``: times ``decay`` every ``decay_every`` steps, or, with
      ``decay_every`` 0, at each third of the budget.
    """
    base_lr: float
    kind: str = "constant"
    warmup: int = 0
    decay_every: int = 0
    decay: float = 0.5
    min_frac: float = 0.1
    decay_start: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise CharrnnError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.kind!r}")
        if not 0 <= self.decay_start < 1:
            raise CharrnnError(f"the decay must start in [0, 1) of the budget, not {self.decay_start}")

    def get_lr(self, step, spent):
        """The learning rate for update number ``step`` (0-based) with the
        share ``spent`` of the budget used."""
        t = min(1.0, max(0.0, spent))
        if self.kind in ("cosine", "linear"):
            t = max(0.0, t - self.decay_start) / (1 - self.decay_start)
        if self.kind == "cosine":
            lr = self.min_frac + (1 - self.min_frac) * 0.5 * (1 + math.cos(math.pi * t))
        elif self.kind == "linear":
            lr = 1 - (1 - self.min_frac) * t
        elif self.kind == "step":
            lr = self.decay ** (step // self.decay_every if self.decay_every else min(2, int(3 * t)))
        else:
            lr = 1.0
        if step < self.warmup:
            lr *= (step + 1) / self.warmup
        return self.base_lr * lr
