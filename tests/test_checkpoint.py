"""Hostile or broken checkpoints are refused in one line, before their
arrays are read, at about the memory of the model they declare."""
import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import Model, Vocab, checkpoint
from charrnn.cli import main
from charrnn.errors import CharrnnError

TEXT = "hello world, hello checkpoints\n"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A model checkpoint's members, as name -> .npy bytes."""
    m = Model(len(Vocab(TEXT)), hidden=8, layers=1, seed=0)
    m.vocab = Vocab(TEXT)
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    m.save(path)
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def npy(array=None, header=None, data=b""):
    """The .npy bytes of ``array``, or of a ``header`` dict followed by ``data``."""
    f = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(data)
    return f.getvalue()


def crafted(tmp_path, members, **replace):
    """A copy of ``members`` with some replaced (None: removed), zipped."""
    path = tmp_path / "crafted.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in {**members, **replace}.items():
            if data is not None:
                z.writestr(name, data)
    return path


def refused(path, match):
    with pytest.raises(CharrnnError, match=match):
        Model.from_checkpoint(checkpoint.load(path))
    r = CliRunner().invoke(main, ["sample", str(path), "--length", "5"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1


def test_the_untouched_checkpoint_loads(good, tmp_path):
    assert Model.from_checkpoint(checkpoint.load(crafted(tmp_path, good))).sample(5, seed=0)


def test_a_parameter_array_of_strings_is_refused(good, tmp_path):
    refused(crafted(tmp_path, good, **{"param/decoder.bias.npy": npy(np.array(["x"] * len(Vocab(TEXT))))}),
            "decoder.bias holds <U1")


def test_a_header_declaring_a_huge_shape_is_refused_before_reading(good, tmp_path):
    huge = npy(header={"descr": "<f4", "fortran_order": False, "shape": (10 ** 12,)}, data=b"\0" * 64)
    refused(crafted(tmp_path, good, **{"param/decoder.bias.npy": huge}), r"shape \(1000000000000,\)")


def test_an_object_array_is_refused_without_unpickling(good, tmp_path):
    pickled = npy(header={"descr": "|O", "fortran_order": False, "shape": (len(Vocab(TEXT)),)}, data=b"\x80\x04.")
    refused(crafted(tmp_path, good, **{"param/decoder.bias.npy": pickled}), "holds object")


def test_a_zip_member_that_inflates_far_past_its_array_is_refused_unread(good, tmp_path):
    """A zip bomb: the header declares the model's shape, the zip directory
    300 MB (deflated to about 0.3 MB); loading reads none of it."""
    path = tmp_path / "bomb.ckpt"
    header = npy(header={"descr": "<f4", "fortran_order": False, "shape": (len(Vocab(TEXT)),)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in good.items():
            if name != "param/decoder.bias.npy":
                z.writestr(name, data)
        with z.open("param/decoder.bias.npy", "w", force_zip64=True) as f:
            f.write(header)
            zeros = bytes(1 << 20)
            for _ in range(300):
                f.write(zeros)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CharrnnError, match="in the zip directory"):
            checkpoint.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_missing_parameter_is_refused(good, tmp_path):
    refused(crafted(tmp_path, good, **{"param/decoder.bias.npy": None}), "no param/decoder.bias")


def test_an_unexpected_member_is_refused(good, tmp_path):
    refused(crafted(tmp_path, good, **{"evil.npy": npy(np.zeros(3))}), "unexpected members: evil")


def test_a_member_that_is_not_npy_is_refused(good, tmp_path):
    refused(crafted(tmp_path, good, **{"README": b"hello"}), "unexpected member 'README'")


def test_an_impossible_model_configuration_is_refused(good, tmp_path):
    meta = json.loads(np.load(io.BytesIO(good["meta.npy"])).tobytes())
    meta["model"]["hidden"] = 10 ** 9
    raw = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    refused(crafted(tmp_path, good, **{"meta.npy": npy(raw)}), "hidden must be an integer")


def test_a_version_1_checkpoint_without_the_regularisers_still_loads(good, tmp_path):
    meta = json.loads(np.load(io.BytesIO(good["meta.npy"])).tobytes())
    meta["version"] = 1
    for key in ("output_dropout", "weight_drop", "embed_dropout", "locked_dropout", "zoneout"):
        del meta["model"][key]
    raw = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    m = Model.from_checkpoint(checkpoint.load(crafted(tmp_path, good, **{"meta.npy": npy(raw)})))
    assert m.config["weight_drop"] == 0.0 and m.sample(5, seed=0)


def test_oversized_metadata_is_refused(good, tmp_path):
    big = npy(header={"descr": "|u1", "fortran_order": False, "shape": (1 << 30,)})
    refused(crafted(tmp_path, good, **{"meta.npy": big}), r"meta has shape")


def test_non_finite_weights_are_refused(good, tmp_path):
    bias = np.load(io.BytesIO(good["param/decoder.bias.npy"]))
    bias[3] = np.nan
    refused(crafted(tmp_path, good, **{"param/decoder.bias.npy": npy(bias)}), "non-finite")
