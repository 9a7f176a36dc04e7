"""The checkpoint file: a zip of ``.npy`` arrays (NumPy's ``.npz``) read with
``allow_pickle=False``, plus JSON metadata. No pickle anywhere.

Entries: ``meta`` (UTF-8 JSON as uint8: format, version, model config,
vocabulary, training config and progress), ``param/<pytorch name>``,
``optim/<slot>`` (optimizer state) and ``state/<i>`` (the hidden state the
training streams carry). Written atomically.
"""
import json
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .data import Vocab
from .errors import CharrnnError
from .model import Model

FORMAT = "charrnn-checkpoint"
VERSION = 1
SUFFIX = ".ckpt"


class Checkpoint:
    """What a checkpoint holds: ``meta`` (dict), ``params``, ``optim`` and
    ``state`` (dicts / tuple of arrays)."""

    def __init__(self, meta, params, optim=None, state=()):
        self.meta, self.params, self.optim, self.state = meta, params, optim or {}, tuple(state)

    @property
    def vocab(self):
        return Vocab.from_dict(self.meta["vocab"])

    def model(self, device="cpu"):
        """A Model with these weights on ``device``, ``model.vocab`` set."""
        cfg = self.meta["model"]
        try:
            model = Model(**cfg, device=device)
        except TypeError as e:
            raise CharrnnError(f"checkpoint has an unknown model configuration: {e}") from None
        model.load_state_dict(self.params)
        model.vocab = self.vocab
        if len(model.vocab) != cfg["vocab_size"]:
            raise CharrnnError("checkpoint's vocabulary does not match its model")
        return model


def save(path, ckpt):
    """Write ``ckpt`` to ``path`` atomically (temp file, fsync, rename)."""
    meta = {**ckpt.meta, "format": FORMAT, "version": VERSION}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    arrays.update({f"param/{k}": v for k, v in ckpt.params.items()})
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in ckpt.optim.items()})
    arrays.update({f"state/{i}": s for i, s in enumerate(ckpt.state)})
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def save_model(path, model):
    """A checkpoint of just a model and its vocabulary (no training state)."""
    if model.vocab is None:
        raise CharrnnError("this model has no vocabulary to save with it")
    save(path, Checkpoint({"model": model.config, "vocab": model.vocab.to_dict()},
                          model.state_dict()))


def resolve(path, prefer="best"):
    """A checkpoint file, or a run directory's ``best`` (or ``last``) one."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, "last", "best"):
            if (path / f"{name}{SUFFIX}").is_file():
                return path / f"{name}{SUFFIX}"
        raise CharrnnError(f"{path} holds no checkpoint ({prefer}{SUFFIX} or last{SUFFIX})")
    if not path.exists():
        raise CharrnnError(f"no such checkpoint: {path}")
    return path


def load(path, prefer="best"):
    """Read and validate a checkpoint (file or run directory)."""
    path = resolve(path, prefer)
    bad = f"{path} is not a readable charrnn checkpoint"
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CharrnnError(f"{bad} (corrupt, truncated or another format: {e})") from None
    try:
        meta = json.loads(files.pop("meta").tobytes().decode("utf-8"))
    except (KeyError, ValueError) as e:
        raise CharrnnError(f"{bad} (no valid metadata: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CharrnnError(f"{bad} (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CharrnnError(f"{path} has checkpoint format version {meta.get('version')}; "
                           f"this charrnn reads up to {VERSION}: upgrade charrnn")
    if "model" not in meta or "vocab" not in meta:
        raise CharrnnError(f"{bad} (no model configuration or vocabulary)")
    part = lambda prefix: {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)}  # noqa: E731
    state = part("state/")
    return Checkpoint(meta, part("param/"), part("optim/"),
                      [state[str(i)] for i in range(len(state))])
