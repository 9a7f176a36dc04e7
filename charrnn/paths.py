"""Where charrnn keeps files of its own (never inside the installed package)."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """charrnn's cache: ``$CHARRNN_CACHE`` if set, else ``$XDG_CACHE_HOME/charrnn``,
    else ``~/.cache/charrnn``. It holds the built-in corpus, downloaded corpora
    and the compiled kernels."""
    env = os.environ.get("CHARRNN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "charrnn"
