"""Vocabulary, corpus encoding, split and char-rnn batching."""
import json

import numpy as np
import pytest

from charrnn import CharrnnError, Vocab
from charrnn import data


def test_vocab_is_sorted_and_deduplicated():
    assert Vocab("banana").symbols == "abn"


def test_encode_decode_round_trips_unicode():
    text = "héllo wörld — ☃"
    v = Vocab(text)
    assert v.decode(v.encode(text)) == text


@pytest.mark.parametrize("size,dtype", [(200, np.uint8), (256, np.uint8), (257, np.uint16),
                                        (70_000, np.int32)])
def test_ids_use_the_smallest_dtype_that_fits(size, dtype):
    v = Vocab("".join(chr(0x100 + i) for i in range(size)))
    assert v.encode(v.symbols[:3]).dtype == dtype


def test_unknown_characters_are_an_error_naming_them():
    with pytest.raises(CharrnnError, match="'x', 'z'"):
        Vocab("abc").encode("axbz")


def test_unknown_characters_can_be_skipped():
    v = Vocab("abc")
    assert v.decode(v.encode("axbz", skip_unknown=True)) == "ab"


def test_bytes_vocabulary_encodes_any_bytes():
    raw = bytes([0, 255, 7, 0xC3])
    v = Vocab(raw, mode="bytes")
    assert v.decode(v.encode(raw)) == raw


def test_vocab_serialises_through_json_types():
    import json
    for v in (Vocab("ab☃\n"), Vocab(b"\x00\xff", mode="bytes")):
        assert Vocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v


def test_corpus_of_several_files_is_their_concatenation(tmp_path):
    (tmp_path / "a.txt").write_text("hello ", encoding="utf-8")
    (tmp_path / "b.txt").write_text("wörld", encoding="utf-8")
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    v = Vocab.from_files(paths)
    assert v.decode(data.encode_files(paths, v)) == "hello wörld"


def test_multibyte_characters_survive_chunk_borders(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_READ_BYTES", 7)
    text = "☃é" * 50 + "abc"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    v = Vocab.from_files([tmp_path / "t.txt"])
    assert v.decode(data.encode_files([tmp_path / "t.txt"], v)) == text


def test_invalid_utf8_suggests_bytes_mode(tmp_path):
    (tmp_path / "bin").write_bytes(b"abc\xff\xfe")
    with pytest.raises(CharrnnError, match="--bytes"):
        Vocab.from_files([tmp_path / "bin"])


def test_bytes_mode_reads_binary_files(tmp_path):
    (tmp_path / "bin").write_bytes(b"abc\xff\xfe")
    v = Vocab.from_files([tmp_path / "bin"], mode="bytes")
    assert v.decode(data.encode_files([tmp_path / "bin"], v)) == b"abc\xff\xfe"


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CharrnnError, match="empty"):
        Vocab.from_files([tmp_path / "empty.txt"])


def test_missing_corpus_is_an_error(tmp_path):
    with pytest.raises(CharrnnError, match="cannot read"):
        Vocab.from_files([tmp_path / "nope.txt"])


def test_split_takes_the_tail_as_validation():
    train, val = data.split(np.arange(100), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


def test_windows_are_contiguous_streams_with_shifted_targets():
    ids = np.arange(2 * 3 * 4 + 5)
    w = data.Windows(ids, batch=2, seq_len=3)
    assert len(w) == 4
    x0, y0 = w[0]
    x1, _ = w[1]
    assert x0.tolist() == [[0, 1, 2], [12, 13, 14]]
    assert x1.tolist() == [[3, 4, 5], [15, 16, 17]]
    assert np.array_equal(y0, x0 + 1)


def test_shifted_windows_read_the_text_as_a_ring():
    w = data.Windows(np.arange(23), batch=2, seq_len=3)  # 22 places a stream can start
    x0, y0 = w.at(0, 20)
    x1, _ = w.at(1, 20)
    assert x0.tolist() == [[20, 21, 0], [7, 8, 9]]  # stream 0 runs off the end into the start
    assert x1.tolist() == [[1, 2, 3], [10, 11, 12]]
    assert y0.tolist() == [[21, 22, 1], [8, 9, 10]]


def test_the_first_epoch_is_not_shifted_and_the_others_draw_from_the_seed_and_the_epoch():
    w = data.Windows(np.arange(1000), batch=4, seq_len=10)
    assert w.epoch_offset(0, seed=3) == 0
    later = [w.epoch_offset(e, seed=3) for e in range(1, 6)]
    assert later == [w.epoch_offset(e, seed=3) for e in range(1, 6)]
    assert later != [w.epoch_offset(e, seed=4) for e in range(1, 6)]
    assert all(0 <= o < w.positions for o in later) and len(set(later)) > 1


def test_a_lead_in_is_the_window_of_text_before_each_stream():
    w = data.Windows(np.arange(100, 123), batch=2, seq_len=3)  # streams start at 100 and 109
    x, y = w.lead_in(np.arange(90, 100))  # the text before it
    assert x.tolist() == [[97, 98, 99], [106, 107, 108]]
    assert np.array_equal(y, x + 1)


def test_a_lead_in_needs_a_window_of_text_before():
    w = data.Windows(np.arange(23), batch=2, seq_len=3)
    with pytest.raises(CharrnnError, match="needs 3 characters before"):
        w.lead_in(np.arange(2))


def test_windows_say_what_fits_when_the_text_is_too_short():
    with pytest.raises(CharrnnError, match="needs at least 51"):
        data.Windows(np.arange(50), batch=5, seq_len=10)


def test_the_id_cache_encodes_once_and_maps_the_ids_read_only(tmp_path):
    (tmp_path / "a.txt").write_text("hello wörld\n" * 50)
    paths = [tmp_path / "a.txt"]
    cache = data.IdCache(tmp_path / "cache", paths, "chars")
    vocab = cache.vocab()
    assert vocab == Vocab.from_files(paths)
    cache.build(vocab)
    ids = cache.ids(vocab)
    assert isinstance(ids, np.memmap) and not ids.flags.writeable
    np.testing.assert_array_equal(ids, data.encode_files(paths, vocab))
    built = sorted((tmp_path / "cache").iterdir())
    again = data.IdCache(tmp_path / "cache", paths, "chars")  # another rank, or a resume
    again.build(again.vocab())
    assert sorted((tmp_path / "cache").iterdir()) == built and [p.stat().st_mtime for p in built] == \
        [p.stat().st_mtime for p in sorted((tmp_path / "cache").iterdir())]


def test_the_id_cache_is_keyed_by_content_and_vocabulary(tmp_path):
    (tmp_path / "a.txt").write_text("abc" * 10)
    key = data.IdCache(tmp_path, [tmp_path / "a.txt"], "chars").key
    assert data.IdCache(tmp_path, [tmp_path / "a.txt"], "bytes").key != key
    (tmp_path / "a.txt").write_text("abd" * 10)
    assert data.IdCache(tmp_path, [tmp_path / "a.txt"], "chars").key != key


def test_training_on_a_big_corpus_goes_through_the_id_cache(tmp_path, monkeypatch):
    import charrnn
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "CACHE_FROM_BYTES", 100)
    (tmp_path / "c.txt").write_text("to be or not to be, that is the question\n" * 60)
    opts = dict(hidden=8, layers=1, batch=4, seq_len=8, eval_every=5, quiet=True)
    charrnn.train(tmp_path / "c.txt", out=tmp_path / "cached", steps=10, **opts)
    assert len(list((tmp_path / "cache" / "ids").glob("*.npy"))) == 1
    monkeypatch.setattr(data, "CACHE_FROM_BYTES", 1 << 40)
    charrnn.train(tmp_path / "c.txt", out=tmp_path / "plain", steps=10, **opts)
    assert (tmp_path / "cached" / "metrics.jsonl").read_text().count("val_loss") == 2
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("chars_per_s", "elapsed_s")}  # noqa: E731
                         for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("cached") == strip("plain")
