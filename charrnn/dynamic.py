"""Dynamic evaluation (Krause et al. 2018): the model keeps learning while
it reads the text it is scored on. Each window of the text is scored first,
then the weights take one SGD step on that window's loss and are pulled
back a little toward the trained weights, so that what was just read
(names, a style, a topic) helps predict what follows. It measures how well
a model adapts, not how well it was trained: report it apart from plain
``charrnn eval``."""
import math

import numpy as np

from .errors import CharrnnError
from .generate import ids_to_score
from .model import Model
from .optim import Optimizer

LR = 0.03      # SGD learning rate on a window's mean loss (nats); README: measured
DECAY = 0.001  # share of the way back to the trained weights after each step
WINDOW = 50    # characters scored before each update


def dynamic_score(model, text, lr=LR, decay=DECAY, window=WINDOW, skip_unknown=False):
    """``generate.score`` of ``text``, with one update after each ``window``
    characters: w <- w - lr * grad, then w <- w + decay * (w_trained - w).
    ``model`` is left as it was (a copy learns). Returns ``score``'s dict."""
    if not (lr >= 0 and math.isfinite(lr)):
        raise CharrnnError(f"the dynamic learning rate must be >= 0, not {lr}")
    if not 0 <= decay <= 1:
        raise CharrnnError(f"the dynamic decay must be in [0, 1], not {decay}")
    if not (isinstance(window, int) and window >= 1):
        raise CharrnnError(f"the dynamic window must be a whole number >= 1, not {window!r}")
    ids, skipped = ids_to_score(model, text, skip_unknown)
    learner = Model(**model.config, dtype=model.dtype, device=model.device)
    learner.load_state_dict(model.state_dict())
    K = learner.backend
    trained = np.array(K.get(learner.params))
    sgd = Optimizer.for_model(learner, "sgd")
    total, state = 0.0, None
    for j in range(0, len(ids) - 1, window):
        y = ids[j + 1:j + 1 + window]
        x = ids[j:j + len(y)]
        # without the regularisers: the updates follow the loss the text is scored with
        loss, state = learner.train_pass(x[None, :], y[None, :], state, regularise=False)
        total += loss * len(y)
        sgd.step(lr)
        weights = np.array(K.get(learner.params))
        weights += np.asarray(decay, weights.dtype) * (trained - weights)
        K.put(learner.params, weights)
    nats = total / (len(ids) - 1)
    return {"bpc": nats / math.log(2), "nats": nats, "perplexity": math.exp(nats),
            "chars": len(ids) - 1, "skipped": skipped}
