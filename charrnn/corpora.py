"""Where training text comes from: built-in corpora, the download registry, paths.

Built-in corpora are assembled at run time from the Python standard library's
own ``.py`` files, so the toolkit works offline and ships no third-party text.
Registry corpora (``corpora/registry.json``) are downloaded on demand, checked
against a recorded size and sha256, and written atomically.

This is the API layer: no printing, no click.  Every problem a user can fix is
raised as a one-line :class:`~charrnn.errors.CharrnnError`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import sysconfig
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from charrnn import paths
from charrnn.files import atomic_write
from charrnn.errors import CharrnnError


Progress = Callable[[int, int], None]

# Built-in corpora: name -> (description, byte budget or None for everything).
_DEFAULT_BUILTIN = "pystdlib"
_BUILTINS: dict[str, tuple[str, int | None]] = {
    "pystdlib": ("all .py files of this Python's standard library (tens of MB)", None),
    "pystdlib-small": ("the first ~2 MB of pystdlib, whole files only, for quick demos", 2_000_000),
}
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_DOWNLOAD_BYTES = 1 << 20


# ----------------------------------------------------------------------------
# Locations


def _registry_text() -> str:
    # Installed: registry.json is package data of charrnn._corpora.  From a
    # checkout that package does not exist, so read the file beside charrnn/.
    try:
        from importlib.resources import files

        return files("charrnn._corpora").joinpath("registry.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path(__file__).resolve().parents[1] / "corpora" / "registry.json"
        return path.read_text(encoding="utf-8")


def registry() -> dict[str, dict]:
    """The downloadable corpora, keyed by name.

    Each entry has ``url``, ``size`` (bytes of the download), ``sha256`` (of the
    download), ``licence`` and ``description``; a zip download also has
    ``archive: "zip"`` and ``member``, the file inside it that is the corpus.
    """
    return json.loads(_registry_text())


# ----------------------------------------------------------------------------
# Atomic writes


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_DOWNLOAD_BYTES):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Built-in corpora


def builtin_names() -> list[str]:
    """Names accepted as built-in corpora: ``builtin`` (the default) and each variant."""
    return ["builtin", *_BUILTINS]


def builtin_description(name: str) -> str:
    """A one-line description of a built-in corpus."""
    key = _builtin_key(name)
    desc = _BUILTINS[key][0]
    return f"alias of {key}: {desc}" if name == "builtin" else desc


def _builtin_key(name: str) -> str:
    if name == "builtin":
        return _DEFAULT_BUILTIN
    if name not in _BUILTINS:
        raise CharrnnError(f"unknown built-in corpus {name!r}; known: {', '.join(builtin_names())}")
    return name


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every .py file under root, sorted by the former."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages live under site-/dist-packages: not stdlib, not deterministic.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                path = Path(dirpath, fn)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _write_stdlib_corpus(out: BinaryIO, root: Path, budget: int | None) -> None:
    written = 0
    for rel, path in _stdlib_sources(root):
        if budget is not None and written >= budget:
            break
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or not UTF-8 (a few test fixtures): skip it
        if text and not text.endswith("\n"):
            text += "\n"
        # Newlines are kept as stored, so the bytes depend only on the files.
        chunk = f"# ===== {rel} =====\n{text}".encode("utf-8")
        out.write(chunk)
        written += len(chunk)


def builtin_path(name: str = "builtin", cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a built-in corpus, assembling it into the cache on first use.

    The text is every ``.py`` file of the standard library (excluding
    site-/dist-packages), sorted by relative POSIX path, skipping files that are
    not valid UTF-8, each preceded by a ``# ===== relative/path.py =====`` line.
    It is deterministic for a given Python installation; the cache file name
    carries the Python version and a digest of the stdlib directory.
    """
    key = _builtin_key(name)
    root = _stdlib_dir()
    if not root.is_dir():
        raise CharrnnError(f"the Python standard library directory {root} is missing; cannot build {name}")
    tag = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:8]
    version = ".".join(map(str, sys.version_info[:3]))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()
    final = cache / f"{key}-{sys.implementation.name}{version}-{tag}.txt"
    if final.is_file():
        return final
    try:
        with atomic_write(final) as out:
            _write_stdlib_corpus(out, root, _BUILTINS[key][1])
    except OSError as e:
        raise CharrnnError(f"cannot write {final}: {e.strerror or e}") from None
    return final


# ----------------------------------------------------------------------------
# Downloads


def _entry_for(name: str, entries: Mapping[str, dict] | None) -> dict:
    entries = registry() if entries is None else entries
    if name not in entries:
        raise CharrnnError(f"unknown corpus {name!r}; known: {', '.join(sorted(entries)) or '(none)'}")
    return entries[name]


def _download_name(name: str, entry: Mapping) -> str:
    if entry.get("archive") == "zip":
        return f"{name}.zip"
    suffix = Path(urllib.parse.urlsplit(entry["url"]).path).suffix
    return name + (suffix or ".txt")


_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


def _reason(err: BaseException) -> str:
    """A short human reason for a network error."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        if not isinstance(err.reason, BaseException):
            return str(err.reason)
        err = err.reason
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host ({err.strerror or err})"
    if isinstance(err, http.client.IncompleteRead):
        return "connection closed early"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _download(name: str, entry: Mapping, final: Path, progress: Progress | None, timeout: float) -> None:
    """Download entry["url"] to final via a temp file, checking length, size and sha256."""
    url, want_size, want_sha = entry["url"], int(entry["size"]), entry["sha256"].lower()
    by_hand = f"check your connection or download it by hand to {final}"

    def failed(e: BaseException) -> CharrnnError:
        return CharrnnError(f"could not download {name} from {url}: {_reason(e)}; {by_hand}")

    request = urllib.request.Request(url, headers={"User-Agent": "charrnn"})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except _NET_ERRORS as e:
        raise failed(e) from None
    # Network errors are caught around each read only, so that a local write
    # error (disk full) is reported as such by the caller, not as "offline".
    with resp, atomic_write(final) as out:
        header = resp.headers.get("Content-Length", "")
        length = int(header) if header.isdigit() else None
        total = want_size if length is None else length
        h, done = hashlib.sha256(), 0
        if progress:
            progress(0, total)
        while True:
            try:
                chunk = resp.read(_DOWNLOAD_BYTES)
            except _NET_ERRORS as e:
                raise failed(e) from None
            if not chunk:
                break
            out.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        # http.client returns b"" when the server closes early, without raising.
        if length is not None and done < length:
            raise CharrnnError(
                f"download of {name} from {url} was interrupted after {done} of {length} bytes; {by_hand}"
            )
        if done != want_size:
            raise CharrnnError(
                f"download of {name} from {url} gave {done} bytes, expected {want_size} "
                f"(interrupted, or changed upstream); not kept; {by_hand}"
            )
        got = h.hexdigest()
        if got != want_sha:
            raise CharrnnError(
                f"checksum mismatch for {name} from {url}: expected sha256 {want_sha}, got {got}; not kept"
            )


def _extract(name: str, entry: Mapping, archive: Path, final: Path) -> None:
    """Extract the corpus member of a verified zip to final, atomically."""
    try:
        with zipfile.ZipFile(archive) as zf:
            files = [i for i in zf.infolist() if not i.is_dir()]
            member = entry.get("member")
            if member is None and len(files) == 1:
                member = files[0].filename
            if member is None or member not in zf.namelist():
                names = ", ".join(i.filename for i in files[:10])
                raise CharrnnError(f"archive {archive} has no member {member!r} for {name}; it holds: {names}")
            with zf.open(member) as src, atomic_write(final) as out:
                while chunk := src.read(_DOWNLOAD_BYTES):
                    out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise CharrnnError(f"cannot unpack {archive} for {name}: {e}") from None


def fetch(
    name: str,
    dest_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    *,
    entries: Mapping[str, dict] | None = None,
) -> Path:
    """Download a registry corpus (once) and return the path of its text file.

    The download goes to ``dest_dir`` (default: ``<cache>/corpora``) as
    ``NAME.zip`` or ``NAME<url suffix>``; it is streamed into a temp file in the
    same directory, checked against the entry's size and sha256, fsynced and
    renamed, so a partial or wrong file never appears under the final name.
    A file already there with the right sha256 is reused without any request.
    Zip archives are unpacked (the entry's ``member``) to ``NAME.txt`` beside it.

    ``progress(done_bytes, total_bytes)`` is called as bytes arrive.
    ``entries`` replaces the packaged registry (tests use it).
    """
    entry = _entry_for(name, entries)
    dest = Path(dest_dir).expanduser() if dest_dir is not None else paths.cache_dir() / "corpora"
    download = dest / _download_name(name, entry)
    try:
        valid = download.is_file() and _sha256_of(download) == entry["sha256"].lower()
        if not valid:
            _download(name, entry, download, progress, timeout)
        if entry.get("archive") != "zip":
            return download
        text = dest / f"{name}.txt"
        if valid and text.is_file():
            return text
        _extract(name, entry, download, text)
        return text
    except OSError as e:
        raise CharrnnError(f"cannot fetch {name} into {dest}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------
# Resolving a training spec


def _files_under(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            path = Path(dirpath, fn)
            if not fn.startswith(".") and path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def resolve(
    spec: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    *,
    entries: Mapping[str, dict] | None = None,
) -> list[Path]:
    """The text files ``charrnn train SPEC`` trains on.

    An existing file gives itself; an existing directory gives its regular
    files, recursively, sorted by relative path, skipping hidden files and
    directories; a built-in name gives the assembled corpus; a registry name
    gives the fetched corpus (downloaded into ``<cache>/corpora`` if needed).
    """
    if not str(spec):
        raise CharrnnError("empty corpus name: give a file, a directory, a built-in or a registry name")
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _files_under(path)
        if not files:
            raise CharrnnError(f"directory {path} has no (non-hidden) files to train on")
        return files
    name = str(spec)
    if name in builtin_names():
        return [builtin_path(name, cache_dir)]
    entries = registry() if entries is None else entries
    if name in entries:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()
        return [fetch(name, cache / "corpora", progress, entries=entries)]
    raise CharrnnError(
        f"{name!r} is neither a file, a directory, a built-in corpus ({', '.join(builtin_names())}) "
        f"nor a registry corpus ({', '.join(sorted(entries))})"
    )
