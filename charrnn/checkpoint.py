"""The checkpoint file: a zip of ``.npy`` arrays (NumPy's ``.npz``) read with
``allow_pickle=False``, plus JSON metadata. No pickle anywhere.

Entries: ``meta`` (UTF-8 JSON as uint8: format, version, model config,
vocabulary, training config and progress), ``param/<pytorch name>``,
``optim/<slot>`` (optimizer state) and ``state/<i>`` (the hidden state the
training streams carry). Written atomically.
"""
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from .files import atomic_write
from .data import Vocab
from .errors import CharrnnError
from .layout import check_memory, model_config, param_shapes
from .optim import OPTIMIZERS, optimizer_slots

FORMAT = "charrnn-checkpoint"
VERSION = 2  # 2: the regularisers in the model configuration, the weights' average in optim/
SUFFIX = ".ckpt"


class Checkpoint:
    """What a checkpoint holds: ``meta`` (dict), ``params``, ``optim`` and
    ``state`` (dicts / tuple of arrays)."""

    def __init__(self, meta, params, optim=None, state=()):
        self.meta, self.params, self.optim, self.state = meta, params, optim or {}, tuple(state)

    @property
    def vocab(self):
        return Vocab.from_dict(self.meta["vocab"])


def describe(ckpt):
    """What ``charrnn info`` shows: the format version, the model
    configuration and size, the vocabulary and the training progress."""
    config = ckpt.meta["model"]
    vocab = ckpt.vocab
    progress = ckpt.meta.get("progress", {})
    best = progress.get("best_val")
    return {"format_version": ckpt.meta["version"], **config,
            "parameters": sum(int(np.prod(s)) for s in param_shapes(config).values()),
            "vocab_size": len(vocab), "vocab_mode": vocab.mode, "vocab_preview": vocab.preview(),
            "step": progress.get("step"),
            "best_val_bpc": best / math.log(2) if best is not None and math.isfinite(best) else None}


def save(path, ckpt):
    """Write ``ckpt`` to ``path`` atomically (temp file, fsync, rename)."""
    meta = {**ckpt.meta, "format": FORMAT, "version": VERSION}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    arrays.update({f"param/{k}": v for k, v in ckpt.params.items()})
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in ckpt.optim.items()})
    arrays.update({f"state/{i}": s for i, s in enumerate(ckpt.state)})
    with atomic_write(path) as f:
        np.savez(f, **arrays)


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


MAX_META_BYTES = 64 << 20  # the JSON metadata (configuration, vocabulary, metrics)
_FLOATS = (np.dtype("<f4"), np.dtype("<f8"))


def load(path, prefer="best", training=False):
    """Read and validate a checkpoint (file or run directory).

    Nothing is trusted: before any array is read, every member is checked
    against what the metadata declares (names, shapes, float dtype, and the
    sizes in the zip directory and the ``.npy`` headers), so that loading
    costs about the memory of the declared model whatever the file holds.
    The optimizer state and carried hidden state are read only for
    ``training`` (a resume). Anything wrong is a one-line CharrnnError.
    """
    path = resolve(path, prefer)
    bad = f"{path} is not a readable charrnn checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            members = _directory(z, bad)
            meta = _read_meta(z, members.pop("meta", None), bad)
            expected = _expected_members(meta, bad)
            unexpected = sorted(set(members) - set(expected))
            if unexpected:
                raise CharrnnError(f"{bad} (unexpected members: {', '.join(unexpected[:5])})")
            for name, (shape, dtypes) in expected.items():
                if name in members:
                    _check_header(z, members[name], name, shape, dtypes, bad)
                elif name.startswith("param/"):
                    raise CharrnnError(f"{bad} (no {name})")
            arrays = {name: _read_array(z, members[name])
                      for name in expected if name in members
                      and (training or name.startswith("param/"))}
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, NotImplementedError) as e:
        raise CharrnnError(f"{bad} (corrupt, truncated or another format: {e})") from None
    part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
    state = part("state/")
    return Checkpoint(meta, part("param/"), part("optim/"), [state[str(i)] for i in range(len(state))])


def _directory(z, bad):
    """Member name (without .npy) -> ZipInfo, from the zip's central directory."""
    members = {}
    for info in z.infolist():
        if not info.filename.endswith(".npy") or info.filename[:-4] in members:
            raise CharrnnError(f"{bad} (unexpected member {info.filename[:80]!r})")
        members[info.filename[:-4]] = info
    return members


def _read_meta(z, info, bad):
    if info is None:
        raise CharrnnError(f"{bad} (no metadata)")
    _check_header(z, info, "meta", None, (np.dtype(np.uint8),), bad, MAX_META_BYTES)
    try:
        meta = json.loads(_read_array(z, info).tobytes().decode("utf-8"))
    except ValueError as e:
        raise CharrnnError(f"{bad} (no valid metadata: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CharrnnError(f"{bad} (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CharrnnError(f"{z.filename} has checkpoint format version {meta.get('version')}; "
                           f"this charrnn reads up to {VERSION}: upgrade charrnn")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("vocab"), dict):
        raise CharrnnError(f"{bad} (no model configuration or vocabulary)")
    if len(Vocab.from_dict(meta["vocab"])) != meta["model"].get("vocab_size"):
        raise CharrnnError(f"{bad} (its vocabulary does not match its model)")
    return meta


def _expected_members(meta, bad):
    """name -> (shape, allowed dtypes) of every member the metadata allows;
    the hidden state and optimizer state only where training options say
    how big they are. Their total must fit in memory."""
    try:
        config = model_config(**meta["model"])
    except TypeError as e:
        raise CharrnnError(f"checkpoint has an unknown model configuration: {e}") from None
    shapes = param_shapes(config)
    n = sum(int(np.prod(s)) for s in shapes.values())
    expected = {f"param/{k}": (s, _FLOATS) for k, s in shapes.items()}
    train = meta.get("train")
    if isinstance(train, dict):
        batch = train.get("batch")
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 1 << 24:
            raise CharrnnError(f"{bad} (training batch {batch!r})")
        state = (config["layers"], batch, config["hidden"])
        for i in range(2 if config["cell"] == "lstm" else 1):
            expected[f"state/{i}"] = (state, _FLOATS)
        expected["optim/step_count"] = ((), (np.dtype("<i8"), np.dtype("<i4")))
        average = train.get("average", 0.0)
        if train.get("optimizer") in OPTIMIZERS and isinstance(average, (int, float)):
            for slot in optimizer_slots(train["optimizer"], average):
                expected[f"optim/{slot}"] = ((n,), _FLOATS)
    check_memory(sum(8 * int(np.prod(shape)) for shape, _ in expected.values()),
                 "the model this checkpoint declares")
    return expected


def _check_header(z, info, name, shape, dtypes, bad, max_bytes=None):
    """The member's .npy header declares ``shape`` (any 1-D one if None,
    of at most max_bytes) and one of ``dtypes``, and the zip directory
    declares exactly the size that makes."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CharrnnError(f"{bad} ({name}: .npy version {version})")
        header = f.tell()
    if dtype not in dtypes or fortran:
        raise CharrnnError(f"{bad} ({name} holds {dtype}{' in Fortran order' if fortran else ''}, "
                           f"not {' or '.join(str(d) for d in dtypes)})")
    if shape is None:
        if len(got) != 1 or got[0] * dtype.itemsize > max_bytes:
            raise CharrnnError(f"{bad} ({name} has shape {got})")
    elif tuple(got) != tuple(shape):
        raise CharrnnError(f"{bad} ({name} has shape {got}, the model declares {tuple(shape)})")
    if info.file_size != header + int(np.prod(got)) * dtype.itemsize:
        raise CharrnnError(f"{bad} ({name} is {info.file_size:,} bytes in the zip directory; "
                           f"its header declares {int(np.prod(got)) * dtype.itemsize:,})")


def _read_array(z, info):
    """The member's array, read in chunks into an array of the size already
    checked (a zip member stops at its declared size; its CRC is checked)."""
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)
