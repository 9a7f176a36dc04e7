"""The explain page in a real browser: headless Chromium (Debian's
``chromium``) loads it from file://, and the rendered DOM and screenshots
are checked. Skipped, with the reason, where Chromium is not installed."""
import json
import re
import shutil
import subprocess

import pytest

from charrnn import Model, Vocab
from charrnn import explain as E

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium (see .ci/run)")

TEXT = 'He said "to be, or not to be" (that is the question)\nand went home.\n' * 6


def chromium(tmp_path, url, *flags):
    """Run headless Chromium on ``url`` (the flags of a closed network:
    nothing is fetched anyway) and return its stdout."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
                        "--virtual-time-budget=10000", *flags, url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def spans(dom):
    """(character, background) of each span of the text box."""
    box = re.search(r'<div id="text">(.*?)</div>', dom, re.S).group(1)
    return re.findall(r'<span data-i="\d+" style="background: ([^;"]+);?">(.*?)</span>', box, re.S)


def page(tmp_path, text, name="p.html"):
    vocab = Vocab(text)
    m = Model(len(vocab), hidden=16, layers=2, seed=1)
    m.vocab = vocab
    E.page(m, text, tmp_path / name)
    return tmp_path / name


def test_the_page_renders_the_text_coloured_by_surprisal(tmp_path):
    path = page(tmp_path, TEXT)
    dom = chromium(tmp_path, path.as_uri(), "--dump-dom")
    assert 'data-ready="1"' in dom  # the script ran to its end
    shown = spans(dom)
    assert "".join(c for _, c in shown).replace("&amp;", "&").replace("&quot;", '"') == TEXT
    colours = {bg for bg, _ in shown[1:]}
    assert all(c.startswith("rgb(255,") for c in colours) and len(colours) > 5


def test_choosing_a_neuron_recolours_the_text(tmp_path):
    path = page(tmp_path, TEXT)
    by_surprisal = [bg for bg, _ in spans(chromium(tmp_path, path.as_uri(), "--dump-dom"))]
    neuron = [bg for bg, _ in spans(chromium(tmp_path, path.as_uri() + "#layer=1&kind=c&unit=3", "--dump-dom"))]
    assert len(neuron) == len(by_surprisal) and neuron != by_surprisal
    assert any(c.startswith("rgb(255,") for c in neuron) or any(c.endswith(", 255)") for c in neuron)


def test_the_page_takes_a_screenshot(tmp_path):
    path = page(tmp_path, TEXT)
    chromium(tmp_path, path.as_uri(), f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,1000")
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "shot.png").stat().st_size > 20_000


def test_chinese_text_renders_as_characters_not_empty_boxes(tmp_path):
    """The same page twice, once with Chinese characters and once with as
    many private-use code points (which no font draws: empty boxes). The
    screenshots differ only if Chromium had glyphs for the Chinese."""
    if not subprocess.run(["fc-list", ":charset=4e2d"], capture_output=True, text=True).stdout.strip():
        pytest.skip("no font with Chinese glyphs: apt-get install fonts-noto-cjk (see .ci/run)")
    chinese = "人工智能正在改变世界。我们一起学习语言模型，看看它学到了什么。\n" * 4
    path = page(tmp_path, chinese, "zh.html")
    body = path.read_text(encoding="utf-8")
    raw = re.search(r'<script id="data" type="application/json">(.*?)</script>', body, re.S).group(1)
    data = json.loads(raw)
    assert data["text"] == chinese
    boxes = {c: chr(0xE000 + i) for i, c in enumerate(sorted(set(chinese) - {"\n"}))}
    data["text"] = "".join(boxes.get(c, c) for c in chinese)
    data["symbols"] = [boxes.get(c, c) for c in data["symbols"]]
    (tmp_path / "boxes.html").write_text(body.replace(raw, json.dumps(data)), encoding="utf-8")
    shots = []
    for name in ("zh.html", "boxes.html"):
        shot = tmp_path / f"{name}.png"
        chromium(tmp_path, (tmp_path / name).as_uri(), f"--screenshot={shot}", "--window-size=1000,700")
        shots.append(shot.read_bytes())
    assert shots[0] != shots[1]
    assert "人工智能" in chromium(tmp_path, path.as_uri(), "--dump-dom")
