"""``charrnn bench`` reports the figures it promises (its speeds are not tested)."""
import json

from click.testing import CliRunner

from charrnn.bench import gemm_weights
from charrnn.cli import main


def test_bench_json_names_its_config_and_carries_every_figure():
    r = CliRunner().invoke(main, ["bench", "--cell", "gru", "--hidden", "8", "--batch", "4",
                                  "--seq-len", "5", "--seconds", "0.05", "--no-torch", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[0])
    assert (d["cell"], d["hidden"], d["batch"], d["seq_len"]) == ("gru", 8, 4, 5)
    for key in ("train_chars_per_s", "sample_chars_per_s", "batch_sample_chars_per_s", "gflops",
                "sgemm_gflops", "peak_rss_mb", "blas"):
        assert key in d, key
    assert d["train_chars_per_s"] > 0 and d["gflops"] > 0


def test_flop_count_is_six_per_gemm_weight_per_character():
    # 2x256 LSTM, one-hot V=65: W_hh of both layers, W_ih of layer 1, the decoder
    assert gemm_weights("lstm", 256, 2, 65, 0) == 2 * 1024 * 256 + 1024 * 256 + 65 * 256
    assert gemm_weights("gru", 10, 1, 7, 3) == 30 * 10 + 7 * 10 + 30 * 3
