"""Loading a checkpoint allocates its weights once: peak RSS grows by at most 1.3x the file size, and
an fp8 load (--fp8_base) of a diffusers or ComfyUI scaled-fp8 file never holds the whole model in bf16."""

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


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["diffusers", "comfy-fp8"])
def test_an_fp8_load_reads_one_block_at_a_time_in_any_layout(tmp_path, layout):
    """28 blocks: the fp8 model is about 1 GB, and the whole file widened to bf16 would be about 2 GB more."""
    path = str(tmp_path / f"{layout}.safetensors")
    write_checkpoint(path, double_blocks=28, layout=layout)
    result = measure(path, fp8=True)
    assert 0.95 * 2**30 <= result["model_bytes"] <= 1.1 * 2**30  # the block weights came back in fp8
    assert result["model_ratio"] <= 1.5, result  # the model, plus a few blocks as stored and the allocator's slack
