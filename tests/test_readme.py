"""The README's examples run as written."""
import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from charrnn.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_setup_commands_ci_runs_in_order():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].startswith("pip install . && charrnn train builtin")
    commands = [line.split("#")[0].strip() for line in first_block]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    at = [ci.index(c) for c in commands]  # each a line of its own, in the README's order
    assert at == sorted(at)
    after = "\n".join(ci[at[-1] + 1:])  # then the installed command, from another directory
    assert "cd " in after and "charrnn --version" in after and "charrnn sample" in after


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    words = ["ROMEO:", "JULIET:", "To", "be,", "or", "not", "to", "be", "the", "king", "of", "love"]
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(words[i] for i in rng.integers(0, len(words), 12)) for _ in range(1200))
    (tmp_path / "input.txt").write_text(text + "\n")
    monkeypatch.chdir(tmp_path)
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "model.ckpt").exists() and (tmp_path / "run" / "best.ckpt").exists()
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_corpora_list_shows_builtin_and_registry():
    r = CliRunner().invoke(main, ["corpora", "list"])
    assert r.exit_code == 0
    assert "builtin" in r.output and "tinyshakespeare" in r.output and "enwik8" in r.output
