"""Tests of charrnn.corpora: registry, built-in corpora, the downloader, resolve().

The downloader is exercised against an HTTP server on 127.0.0.1 serving files
the tests make; nothing here touches the network beyond loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from charrnn import corpora
from charrnn.errors import CharrnnError

TIMEOUT = 5.0


class _Server:
    """A loopback HTTP server: path -> bytes, counting requests.

    ``short[path] = n`` makes it announce the full Content-Length but send only
    the first n bytes, then close: an interrupted transfer.  Paths in ``stall``
    then hang (until teardown, at most TIMEOUT) instead of closing.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.short: dict[str, int] = {}
        self.stall: set[str] = set()
        self.release = threading.Event()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: server.short.get(self.path, len(body))])
                self.wfile.flush()
                if self.path in server.stall:
                    server.release.wait(TIMEOUT)
                self.close_connection = True

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = _Server()
    s.thread.start()
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(timeout=TIMEOUT)


def _entry(url: str, body: bytes, **extra) -> dict:
    return {
        "url": url,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "licence": "test",
        "description": "test",
        **extra,
    }


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


BODY = b"To be, or not to be, that is the question.\n" * 500


# ---------------------------------------------------------------- downloads


def test_fetch_downloads_and_verifies_file(server, tmp_path):
    server.files["/c.txt"] = BODY
    entries = {"demo": _entry(server.url("/c.txt"), BODY)}
    seen = []
    path = corpora.fetch("demo", tmp_path, progress=lambda d, t: seen.append((d, t)), timeout=TIMEOUT, entries=entries)
    assert path == tmp_path / "demo.txt"
    assert path.read_bytes() == BODY
    assert seen[-1] == (len(BODY), len(BODY))
    assert _leftovers(tmp_path) == ["demo.txt"]  # no temp file left behind


def test_second_fetch_skips_download(server, tmp_path):
    server.files["/c.txt"] = BODY
    entries = {"demo": _entry(server.url("/c.txt"), BODY)}
    first = corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries)
    second = corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries)
    assert first == second
    assert server.requests == ["/c.txt"]


def test_fetch_replaces_corrupt_existing_file(server, tmp_path):
    server.files["/c.txt"] = BODY
    entries = {"demo": _entry(server.url("/c.txt"), BODY)}
    (tmp_path / "demo.txt").write_bytes(b"garbage")
    assert corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries).read_bytes() == BODY
    assert len(server.requests) == 1


def test_checksum_mismatch_raises_and_keeps_nothing(server, tmp_path):
    server.files["/c.txt"] = BODY
    entry = _entry(server.url("/c.txt"), BODY)
    entry["sha256"] = "0" * 64
    with pytest.raises(CharrnnError, match=r"checksum mismatch.*expected sha256 0{64}, got [0-9a-f]{64}"):
        corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries={"demo": entry})
    assert _leftovers(tmp_path) == []


def test_size_mismatch_raises_and_keeps_nothing(server, tmp_path):
    server.files["/c.txt"] = BODY
    entry = _entry(server.url("/c.txt"), BODY)
    entry["size"] = len(BODY) + 1
    with pytest.raises(CharrnnError, match="expected"):
        corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries={"demo": entry})
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_raises_and_keeps_nothing(server, tmp_path):
    server.files["/c.txt"] = BODY
    server.short["/c.txt"] = 100
    entries = {"demo": _entry(server.url("/c.txt"), BODY)}
    with pytest.raises(CharrnnError, match=f"interrupted after 100 of {len(BODY)} bytes"):
        corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries)
    assert _leftovers(tmp_path) == []


def test_stalled_transfer_times_out_and_keeps_nothing(server, tmp_path):
    server.files["/c.txt"] = BODY
    server.short["/c.txt"] = 100
    server.stall.add("/c.txt")
    entries = {"demo": _entry(server.url("/c.txt"), BODY)}
    with pytest.raises(CharrnnError, match="could not download demo .*timed out"):
        corpora.fetch("demo", tmp_path, timeout=0.3, entries=entries)
    assert _leftovers(tmp_path) == []


def test_file_placed_by_hand_is_used_offline(tmp_path):
    (tmp_path / "demo.txt").write_bytes(BODY)
    entries = {"demo": _entry("http://127.0.0.1:9/c.txt", BODY)}  # never contacted
    assert corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries) == tmp_path / "demo.txt"


def test_http_error_is_reported(server, tmp_path):
    entries = {"demo": _entry(server.url("/missing.txt"), BODY)}
    with pytest.raises(CharrnnError, match="could not download demo .*HTTP 404"):
        corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries)
    assert _leftovers(tmp_path) == []


def test_connection_refused_is_reported(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entries = {"demo": _entry(f"http://127.0.0.1:{port}/c.txt", BODY)}
    with pytest.raises(CharrnnError, match="connection refused; check your connection") as info:
        corpora.fetch("demo", tmp_path / "dl", timeout=TIMEOUT, entries=entries)
    assert str(tmp_path / "dl" / "demo.txt") in str(info.value)  # says where to put it by hand
    assert _leftovers(tmp_path / "dl") == []


def test_zip_archive_is_unpacked_to_member(server, tmp_path):
    archive = _zip_bytes({"README": b"not this", "data/corpus.txt": BODY})
    server.files["/c.zip"] = archive
    entries = {"demo": _entry(server.url("/c.zip"), archive, archive="zip", member="data/corpus.txt")}
    path = corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries)
    assert path == tmp_path / "demo.txt"
    assert path.read_bytes() == BODY
    assert _leftovers(tmp_path) == ["demo.txt", "demo.zip"]
    path.unlink()  # a missing unpacked file is re-extracted from the verified zip, no request
    assert corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries).read_bytes() == BODY
    assert server.requests == ["/c.zip"]


def test_zip_without_member_raises(server, tmp_path):
    archive = _zip_bytes({"a.txt": b"a", "b.txt": b"b"})
    server.files["/c.zip"] = archive
    entries = {"demo": _entry(server.url("/c.zip"), archive, archive="zip", member="corpus.txt")}
    with pytest.raises(CharrnnError, match="no member 'corpus.txt'"):
        corpora.fetch("demo", tmp_path, timeout=TIMEOUT, entries=entries)


def test_unknown_name_lists_known_names(tmp_path):
    entries = {"alpha": {}, "beta": {}}
    with pytest.raises(CharrnnError, match="unknown corpus 'gamma'; known: alpha, beta"):
        corpora.fetch("gamma", tmp_path, entries=entries)


# ---------------------------------------------------------------- registry

REQUIRED = {"url": str, "size": int, "sha256": str, "licence": str, "description": str}


def test_registry_entries_have_required_fields():
    reg = corpora.registry()
    assert {"tinyshakespeare", "enwik8", "text8"} <= set(reg)
    for name, entry in reg.items():
        for field, kind in REQUIRED.items():
            assert isinstance(entry.get(field), kind), (name, field)
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert entry["size"] > 0, name
        assert re.match(r"https?://[^/\s]+/\S+$", entry["url"]), name
        assert entry["licence"].strip() and entry["description"].strip(), name
        assert "\n" not in entry["description"], name
        assert set(entry) <= set(REQUIRED) | {"archive", "member"}, name
        if "archive" in entry:
            assert entry["archive"] == "zip" and isinstance(entry["member"], str), name


def test_registry_names_do_not_shadow_builtins():
    assert not set(corpora.registry()) & set(corpora.builtin_names())


def test_registry_file_is_plain_json():
    path = Path(corpora.__file__).resolve().parents[1] / "corpora" / "registry.json"
    assert json.loads(path.read_text(encoding="utf-8")) == corpora.registry()


# ---------------------------------------------------------------- built-in corpora


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages" / "thirdparty").mkdir(parents=True)
    (root / "b.py").write_text("print('b')\n")
    (root / "a.py").write_text("print('a')")  # no final newline: one is added
    (root / "pkg" / "c.py").write_text("x = 'é'\n", encoding="utf-8")
    (root / "pkg" / "bad.py").write_bytes(b"x = '\xff'\n")  # not UTF-8: skipped
    (root / "notes.txt").write_text("not python\n")
    (root / "site-packages" / "thirdparty" / "t.py").write_text("third = 1\n")
    monkeypatch.setattr(corpora, "_stdlib_dir", lambda: root)
    return root


def test_builtin_corpus_content_and_order(fake_stdlib, tmp_path):
    text = corpora.builtin_path("pystdlib", tmp_path / "cache").read_text(encoding="utf-8")
    assert text == (
        "# ===== a.py =====\nprint('a')\n"
        "# ===== b.py =====\nprint('b')\n"
        "# ===== pkg/c.py =====\nx = 'é'\n"
    )


def test_builtin_corpus_is_deterministic(fake_stdlib, tmp_path):
    one = corpora.builtin_path("builtin", tmp_path / "one").read_bytes()
    two = corpora.builtin_path("builtin", tmp_path / "two").read_bytes()
    assert one == two and one


def test_builtin_corpus_is_cached(fake_stdlib, tmp_path, monkeypatch):
    first = corpora.builtin_path("builtin", tmp_path)
    monkeypatch.setattr(corpora, "_write_stdlib_corpus", lambda *a: pytest.fail("assembled twice"))
    assert corpora.builtin_path("pystdlib", tmp_path) == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_builtin_cache_dir_defaults_to_env(fake_stdlib, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "envcache"))
    assert corpora.builtin_path("builtin").parent == tmp_path / "envcache"


def test_small_builtin_from_real_stdlib_is_deterministic(tmp_path):
    one = corpora.builtin_path("pystdlib-small", tmp_path / "one").read_bytes()
    two = corpora.builtin_path("pystdlib-small", tmp_path / "two").read_bytes()
    assert one == two
    assert 2_000_000 <= len(one) < 4_000_000
    assert one.startswith(b"# ===== ")


def test_unknown_builtin_raises(tmp_path):
    with pytest.raises(CharrnnError, match="unknown built-in corpus 'nope'"):
        corpora.builtin_path("nope", tmp_path)


# ---------------------------------------------------------------- resolve


def test_resolve_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("hello")
    assert corpora.resolve(f) == [f]


def test_resolve_directory_sorted_skipping_hidden(tmp_path):
    for rel in ["b.txt", "a/z.txt", "a/b.txt", ".hidden", ".git/config", "c/.secret"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    got = [p.relative_to(tmp_path).as_posix() for p in corpora.resolve(tmp_path)]
    assert got == ["a/b.txt", "a/z.txt", "b.txt"]


def test_resolve_empty_directory_raises(tmp_path):
    with pytest.raises(CharrnnError, match="no .*files"):
        corpora.resolve(tmp_path)


def test_resolve_builtin(fake_stdlib, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [path] = corpora.resolve("builtin", cache_dir=tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and path.read_text().startswith("# ===== a.py")


def test_resolve_registry_name_fetches_into_cache(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.files["/c.txt"] = BODY
    entries = {"demo": _entry(server.url("/c.txt"), BODY)}
    [path] = corpora.resolve("demo", cache_dir=tmp_path / "cache", entries=entries)
    assert path == tmp_path / "cache" / "corpora" / "demo.txt"
    assert corpora.resolve("demo", cache_dir=tmp_path / "cache", entries=entries) == [path]
    assert server.requests == ["/c.txt"]


def test_resolve_unknown_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CharrnnError, match="'nothing-here' is neither a file, a directory, a built-in"):
        corpora.resolve("nothing-here")


# ---------------------------------------------------------------------- CLI

def test_cli_fetch_prints_the_verified_path_and_train_takes_the_name(server, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from charrnn.cli import main
    server.files["/tiny.txt"] = BODY
    monkeypatch.setattr(corpora, "registry", lambda: {"tiny": _entry(server.url("/tiny.txt"), BODY)})
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["corpora", "fetch", "tiny", "--dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip().splitlines()[-1]).read_bytes() == BODY
    r = CliRunner().invoke(main, ["train", "tiny", "--out", str(tmp_path / "run"), "--steps", "2",
                                  "--hidden", "8", "--batch", "4", "--seq-len", "8", "--quiet"])
    assert r.exit_code == 0, r.output
