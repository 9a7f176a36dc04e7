"""Vocabulary, corpus encoding, train/validation split and char-rnn batching."""
import codecs
import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import CharrnnError
from .files import atomic_write

_READ_BYTES = 1 << 22  # bytes read at a time: bounds the temporary copies of a chunk


def _id_dtype(size):
    """Smallest unsigned/int dtype that holds ids 0..size-1."""
    if size <= 1 << 8:
        return np.dtype(np.uint8)
    if size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


class Vocab:
    """The symbols a model reads and writes, in a stable sorted order.

    ``Vocab("abc")`` is a character vocabulary; ``Vocab(b"abc", mode="bytes")``
    a byte vocabulary (for any file, whatever its encoding). ``Vocab.from_files``
    builds one from a corpus. Ids are positions in the sorted symbol list.
    """

    def __init__(self, symbols, mode="chars"):
        if mode not in ("chars", "bytes"):
            raise CharrnnError(f"vocabulary mode must be 'chars' or 'bytes', not {mode!r}")
        self.mode = mode
        if mode == "chars":
            codes = sorted({ord(c) for c in symbols})
        else:
            codes = sorted(set(bytes(symbols)))
        if not codes:
            raise CharrnnError("a vocabulary needs at least one symbol")
        self.codes = np.array(codes, dtype=np.int64)  # code points or byte values
        self.dtype = _id_dtype(len(codes))
        self._lut = np.full(int(self.codes[-1]) + 1, -1, dtype=np.int32)
        self._lut[self.codes] = np.arange(len(codes))

    def __len__(self):
        return len(self.codes)

    def __eq__(self, other):
        return (isinstance(other, Vocab) and self.mode == other.mode
                and np.array_equal(self.codes, other.codes))

    def __repr__(self):
        return f"Vocab({len(self)} {self.mode}: {self.preview()!r})"

    @property
    def symbols(self):
        """The symbols in id order: a str (chars) or bytes (bytes mode)."""
        if self.mode == "chars":
            return "".join(map(chr, self.codes))
        return bytes(self.codes.astype(np.uint8))

    def preview(self, n=40):
        s = self.symbols[:n]
        return s if isinstance(s, str) else s.decode("latin-1")

    # ------------------------------------------------------------ encoding
    def lookup(self, codes, skip_unknown=False):
        """Ids of an array of code points (or byte values); unknown ones
        raise a CharrnnError naming them, or are dropped (``skip_unknown``)."""
        lut = self._lut
        if codes.size and codes.max() >= len(lut):
            known = codes < len(lut)
            ids = np.full(codes.shape, -1, dtype=np.int32)
            ids[known] = lut[codes[known]]
        else:
            ids = lut[codes]
        unknown = ids < 0
        if unknown.any():
            if not skip_unknown:
                raise CharrnnError("symbols outside the vocabulary: "
                                   + self._describe(np.unique(codes[unknown])))
            ids = ids[~unknown]
        return ids.astype(self.dtype)

    def _describe(self, codes, most=10):
        if self.mode == "chars":
            shown = [repr(chr(c)) for c in codes[:most]]
        else:
            shown = [f"0x{int(c):02x}" for c in codes[:most]]
        more = f" and {len(codes) - most} more" if len(codes) > most else ""
        return ", ".join(shown) + more

    def encode(self, text, skip_unknown=False):
        """Ids of ``text`` (str in chars mode, bytes in bytes mode).

        Unknown symbols raise CharrnnError naming them, or are dropped with
        ``skip_unknown=True``.
        """
        if self.mode == "chars" and not isinstance(text, str):
            raise CharrnnError("a character vocabulary encodes str, not bytes")
        if self.mode == "bytes" and isinstance(text, str):
            text = text.encode("utf-8")
        return self.lookup(_codes(text, self.mode), skip_unknown)

    def decode(self, ids):
        """The str (chars mode) or bytes (bytes mode) of a sequence of ids."""
        codes = self.codes[np.asarray(ids, dtype=np.int64)]
        if self.mode == "chars":
            return codes.astype(np.uint32).tobytes().decode("utf-32-le")
        return codes.astype(np.uint8).tobytes()

    # ---------------------------------------------------- (de)serialisation
    def to_dict(self):
        """JSON-safe description (stored in checkpoints)."""
        return {"mode": self.mode, "codes": [int(c) for c in self.codes]}

    @classmethod
    def from_dict(cls, d):
        try:
            mode, codes = d["mode"], d["codes"]
            if mode == "chars":
                return cls("".join(map(chr, codes)), mode)
            return cls(bytes(codes), mode)
        except (KeyError, TypeError, ValueError) as e:
            raise CharrnnError(f"malformed vocabulary: {e}") from None

    @classmethod
    def from_files(cls, paths, mode="chars"):
        """The vocabulary of the concatenation of ``paths``."""
        seen = np.zeros(256 if mode == "bytes" else 0x110000, dtype=bool)
        for chunk in _read_chunks(paths, mode):
            # a bincount beats np.unique's sort on big chunks
            present = np.bincount(_codes(chunk, mode)) > 0
            seen[:present.size] |= present
        codes = np.flatnonzero(seen)
        if codes.size == 0:
            raise CharrnnError("the corpus is empty: " + ", ".join(map(str, paths)))
        if mode == "chars":
            return cls("".join(map(chr, codes)), mode)
        return cls(bytes(codes.astype(np.uint8)), mode)


def _codes(chunk, mode):
    """Code points (chars) or byte values (bytes) of a str/bytes chunk."""
    if mode == "bytes":
        return np.frombuffer(chunk, dtype=np.uint8)
    return np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)


def _read_chunks(paths, mode):
    """Yield the concatenated corpus as str (chars) or bytes chunks, reading
    _READ_BYTES bytes at a time; an incremental decoder keeps multi-byte
    characters whole across chunk borders."""
    for path in paths:
        path = Path(path)
        decoder = codecs.getincrementaldecoder("utf-8")() if mode == "chars" else None
        try:
            with open(path, "rb") as f:
                offset = 0
                while True:
                    raw = f.read(_READ_BYTES)
                    final = not raw
                    try:
                        chunk = decoder.decode(raw, final) if decoder else raw
                    except UnicodeDecodeError as e:
                        raise CharrnnError(
                            f"{path} is not valid UTF-8 text (byte {offset + e.start}); "
                            "use --bytes to train on raw bytes") from None
                    if chunk:
                        yield chunk
                    if final:
                        break
                    offset += len(raw)
        except OSError as e:
            raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None


def _count_symbols(paths, mode):
    """Number of symbols in the corpus without decoding it: in UTF-8 every
    byte but the continuation bytes (0b10xxxxxx) starts a character."""
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                while raw := f.read(_READ_BYTES):
                    b = np.frombuffer(raw, dtype=np.uint8)
                    total += b.size if mode == "bytes" else int(np.count_nonzero((b & 0xC0) != 0x80))
        except OSError as e:
            raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None
    return total


def _encoded_parts(paths, vocab):
    """The ids of the concatenation of ``paths``, a chunk at a time."""
    for chunk in _read_chunks(paths, vocab.mode):
        yield vocab.lookup(_codes(chunk, vocab.mode))


def encode_files(paths, vocab):
    """Ids of the concatenation of ``paths`` under ``vocab``, as one array.

    Reads in chunks and writes straight into a preallocated array of the
    vocabulary's id dtype: the only full-size copy of the corpus in memory.
    """
    n = _count_symbols(paths, vocab.mode)
    ids = np.empty(n, dtype=vocab.dtype)
    pos = 0
    for part in _encoded_parts(paths, vocab):
        if pos + part.size > n:
            break
        ids[pos:pos + part.size] = part
        pos += part.size
    if pos != n:  # the file changed while we read it
        raise CharrnnError("the corpus changed while it was being read")
    return ids


CACHE_FROM_BYTES = 16 << 20  # corpora from this size keep their ids in the cache


def worth_caching(paths):
    """Whether a corpus is big enough for the id cache (IdCache)."""
    return sum(Path(p).stat().st_size for p in paths) >= CACHE_FROM_BYTES


def content_key(paths, mode):
    """A digest of the corpus files' bytes and the vocabulary mode: the name
    of its cached ids (blake2b, about a second per GB)."""
    h = hashlib.blake2b(mode.encode("ascii"), digest_size=16)
    for path in paths:
        try:
            with open(path, "rb") as f:
                while raw := f.read(_READ_BYTES):
                    h.update(raw)
        except OSError as e:
            raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None
        h.update(b"\0")  # a file boundary
    return h.hexdigest()


class IdCache:
    """Encoded corpora kept as ``.npy`` files in a directory, keyed by the
    corpus's content and the vocabulary, and read back as read-only memory
    maps: MPI ranks and resumed runs share one copy (the page cache's)
    instead of each encoding the corpus and holding its own, and a process
    only touches the pages of the streams it reads."""

    def __init__(self, directory, paths, mode):
        self.dir, self.paths, self.mode = Path(directory), paths, mode
        self.key = content_key(paths, mode)

    def _vocab_path(self):
        return self.dir / f"{self.key}.vocab.json"

    def _ids_path(self, vocab):
        codes = hashlib.blake2b(vocab.codes.tobytes(), digest_size=8).hexdigest()
        return self.dir / f"{self.key}-{codes}.npy"

    def vocab(self):
        """The corpus's vocabulary: cached, or built (one pass) and cached."""
        try:
            return Vocab.from_dict(json.loads(self._vocab_path().read_text(encoding="utf-8")))
        except (OSError, ValueError, CharrnnError):
            vocab = Vocab.from_files(self.paths, self.mode)
            with atomic_write(self._vocab_path()) as f:
                f.write(json.dumps(vocab.to_dict()).encode("utf-8"))
            return vocab

    def build(self, vocab):
        """Encode the corpus into the cache, unless it is there already;
        written a chunk at a time, never whole in memory."""
        path = self._ids_path(vocab)
        if path.exists():
            return
        n = _count_symbols(self.paths, vocab.mode)
        with atomic_write(path) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(vocab.dtype), "fortran_order": False,
                    "shape": (n,)})
            written = 0
            for part in _encoded_parts(self.paths, vocab):
                f.write(part.tobytes())
                written += part.size
            if written != n:
                raise CharrnnError("the corpus changed while it was being read")

    def ids(self, vocab):
        """The cached ids, a read-only memory map."""
        try:
            return np.load(self._ids_path(vocab), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CharrnnError(f"cannot read the cached corpus {self._ids_path(vocab)}: {e}") from None


def split(ids, val_frac):
    """(train, val): validation is the tail ``val_frac`` share, by position."""
    if not 0.0 <= val_frac < 1.0:
        raise CharrnnError(f"--val-frac must be in [0, 1), not {val_frac}")
    n_val = int(len(ids) * val_frac)
    return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


class Windows:
    """char-rnn batching: ``ids`` cut into B contiguous parallel streams, read
    in windows of T characters; window k of stream b follows window k-1 of
    the same stream, so the hidden state carries across windows.

    ``windows[k] -> (x, y)``, each [B, T] views; y is x shifted by one.
    ``windows.at(k, offset)`` is window k with the streams starting
    ``offset`` characters later, the text read as a ring (its end joins
    its start): the same cut, shifted.
    """

    def __init__(self, ids, batch, seq_len):
        if batch < 1 or seq_len < 1:
            raise CharrnnError(f"batch and sequence length must be >= 1, not {batch} and {seq_len}")
        per_stream = (len(ids) - 1) // batch // seq_len * seq_len
        if per_stream == 0:
            raise CharrnnError(
                f"{len(ids)} characters are too few for batch {batch} x seq-len {seq_len} "
                f"(needs at least {batch * seq_len + 1})")
        n = per_stream * batch
        self.ids = ids
        self.x = ids[:n].reshape(batch, per_stream)
        self.y = ids[1:n + 1].reshape(batch, per_stream)
        self.batch, self.seq_len = batch, seq_len

    def __len__(self):
        return self.x.shape[1] // self.seq_len

    def __getitem__(self, k):
        return self.at(k, 0)

    @property
    def positions(self):
        """The places a stream can start: every character that has a next one."""
        return len(self.ids) - 1

    def at(self, k, offset):
        """Window k of the streams shifted by ``offset`` in [0, positions)."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        if not 0 <= offset < self.positions:
            raise IndexError(offset)
        j = k * self.seq_len
        if offset == 0:  # views
            return self.x[:, j:j + self.seq_len], self.y[:, j:j + self.seq_len]
        first = offset + np.arange(self.batch) * self.x.shape[1] + j
        at = (first[:, None] + np.arange(self.seq_len)) % self.positions
        return self.ids[at], self.ids[at + 1]

    def lead_in(self, before):
        """The T characters before each stream's start, as (x, y) [B, T]
        with y x shifted by one: read without scoring, they give each
        stream the state it would have reading the text straight through,
        so that its first characters are not scored out of context (a cold
        start costs 0.0034 nats at B=32 on Tiny Shakespeare: README).
        Stream 0's lead-in is the tail of ``before``, the text that
        precedes ``ids``; the others' are the end of the stream before."""
        T = self.seq_len
        if len(before) < T:
            raise CharrnnError(f"a lead-in needs {T} characters before the text, not {len(before)}")
        text = np.concatenate([before[len(before) - T:], self.ids[:self.x.size + 1]])
        first = np.arange(self.batch)[:, None] * self.x.shape[1] + np.arange(T)
        return text[first], text[first + 1]

    def epoch_offset(self, epoch, seed):
        """Where epoch ``epoch``'s streams start with --epoch-shift: 0 for the
        first, then a place drawn from (seed, epoch) alone, so every rank and
        a resumed run draw the same."""
        if epoch == 0:
            return 0
        return int(np.random.default_rng((seed, epoch)).integers(self.positions))
