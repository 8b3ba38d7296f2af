"""Loading a checkpoint allocates its weights once: peak RSS grows by at most 1.3x the file size."""

import pytest

from bench.load_memory import measure, write_checkpoint


@pytest.mark.slow
def test_loading_a_1gb_checkpoint_grows_peak_rss_by_at_most_1_3x_its_size(tmp_path):
    path = str(tmp_path / "big.safetensors")
    size = write_checkpoint(path, double_blocks=7)
    assert size >= 1_000_000_000
    result = measure(path)
    assert 0.99 * size <= result["params"] * 4 <= size  # every weight loaded, at its own dtype (fp32)
    assert result["ratio"] <= 1.3, result
