"""Optimizers over the model's flat parameter buffer, gradient clipping and
learning-rate schedules."""
import dataclasses
import math

import numpy as np

from .errors import CharrnnError
from .kernels import cpu as K

OPTIMIZERS = ("adam", "adamw", "rmsprop", "adagrad", "sgd")
# each optimizer's state: one array the size of the parameters per slot
OPTIMIZER_SLOTS = {"adam": ("m", "v"), "adamw": ("m", "v"), "rmsprop": ("v", "buf"),
                   "adagrad": ("s",), "sgd": ("buf",)}
SCHEDULES = ("constant", "cosine", "step")


class Optimizer:
    """One of ``OPTIMIZERS``, updating ``params`` in place from ``grads``
    (both the model's flat float32 buffers, on the host or, with the CUDA
    ``kernels``, on the device) in one fused kernel call.

    Hyper-parameters follow PyTorch's defaults: Adam betas (0.9, 0.999),
    eps 1e-8; RMSprop alpha 0.99, eps 1e-8; Adagrad eps 1e-10.
    """

    def __init__(self, name, params, grads, momentum=0.0, weight_decay=0.0, kernels=K):
        if name not in OPTIMIZERS:
            raise CharrnnError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
        if momentum < 0 or momentum >= 1:
            raise CharrnnError(f"momentum must be in [0, 1), not {momentum}")
        if weight_decay < 0:
            raise CharrnnError(f"weight decay must be >= 0, not {weight_decay}")
        self.name, self.params, self.grads, self.backend = name, params, grads, kernels
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.step_count = 0
        self.state = {k: kernels.zeros(params.shape, params.dtype) for k in OPTIMIZER_SLOTS[name]}

    @classmethod
    def for_model(cls, model, name="adam", momentum=0.0, weight_decay=0.0):
        """An optimizer of ``model``'s parameters, on the model's device."""
        return cls(name, model.params, model.grads, momentum, weight_decay, model.backend)

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
            K.adam_update(p, g, s["m"], s["v"], lr, 0.9, 0.999, 1e-8, wd,
                          self.name == "adamw", self.step_count, scale)
        elif self.name == "rmsprop":
            K.rmsprop_update(p, g, s["v"], s["buf"], lr, 0.99, 1e-8, wd, self.momentum, scale)
        elif self.name == "adagrad":
            K.adagrad_update(p, g, s["s"], lr, 1e-10, wd, scale)
        else:
            K.sgd_update(p, g, s["buf"], lr, self.momentum, wd, scale)
        return norm

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
    """The learning rate against the update number.

    - warm-up: linear from base_lr/warmup to base_lr over ``warmup`` steps;
    - ``constant``; ``cosine``: from base_lr down to ``min_frac``*base_lr at
      ``total_steps``; ``step``: times ``decay`` every ``decay_every`` steps.
    """
    base_lr: float
    kind: str = "constant"
    warmup: int = 0
    total_steps: int = None
    decay_every: int = None
    decay: float = 0.5
    min_frac: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise CharrnnError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.kind!r}")

    def get_lr(self, step):
        """The learning rate for update number ``step`` (0-based)."""
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup)
            t = min(1.0, (step - self.warmup) / span)
            return self.base_lr * (self.min_frac + (1 - self.min_frac) * 0.5 * (1 + math.cos(math.pi * t)))
        if self.kind == "step":
            return self.base_lr * self.decay ** ((step - self.warmup) // self.decay_every)
        return self.base_lr
