"""networks/flux_merge_lora.py merging LoRAs into one LoRA: each ratio applies once, --concat is exact at the
summed rank, and a plain sum is the closest change of the first LoRA's rank to the exact sum (exact whenever
the sum has no higher rank, e.g. one LoRA twice)."""

import logging

import pytest
import torch

from library.lora_formats import to_ai_toolkit
from library.safetensors_io import load_safetensors, read_metadata, save_safetensors
from networks import flux_merge_lora
from networks.lora_flux import create_network_from_weights
from tests.test_merge_lora import deltas, merge, write_lora


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_concatenated_alpha_is_saved_exactly_in_any_precision(tmp_path, precision):
    """--concat's alpha is the summed rank (here 17 + 18 = 35): bf16 and fp8 cannot hold it, so alphas stay fp32."""
    paths = []
    for rank in (17, 18):
        paths.append(tmp_path / f"rank{rank}.safetensors")
        save_safetensors({"lora_unet_img_in.lora_down.weight": torch.full((rank, 6), 0.25),
                          "lora_unet_img_in.lora_up.weight": torch.full((8, rank), 0.5)}, paths[-1])  # fmt: skip
    out = tmp_path / "concat.safetensors"
    assert merge("--save_to", out, "--models", *paths, "--concat", "--save_precision", precision) == 0
    merged = load_safetensors(out)
    alpha = merged["lora_unet_img_in.alpha"]
    assert alpha.dtype == torch.float32 and alpha.item() == 35.0
    assert merged["lora_unet_img_in.lora_up.weight"].dtype == flux_merge_lora.str_to_dtype(precision, "")


def test_concat_merges_loras_exactly_with_each_ratio_once(dev, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", dev, dim=4, alpha=2.0, seed=1)
    b = write_lora(tmp_path / "b.safetensors", dev, dim=2, alpha=8.0, seed=2, in_dims="[2,0,0,0,2]")
    out = tmp_path / "ab.safetensors"
    assert merge("--save_to", out, "--models", a, b, "--ratios", 0.5, -1.2, "--concat") == 0
    merged = deltas(load_safetensors(out))
    da, db = deltas(load_safetensors(a)), deltas(load_safetensors(b))
    assert merged.keys() == da.keys() | db.keys()
    for name, delta in merged.items():
        expected = 0.5 * da.get(name, 0) - 1.2 * db.get(name, 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7, msg=name)
    metadata = read_metadata(out)
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["modelspec.merged_from"] == "a, b"
    network, _ = create_network_from_weights(1.0, str(out), None, [None, None], dev, for_inference=True)
    assert network.lora_unet_img_in.lora_dim == 2 and network.lora_unet_single_blocks_0_linear1.lora_dim == 6


@pytest.mark.parametrize("ratio", [0.5, -0.7])
def test_one_lora_merged_alone_is_scaled_by_its_ratio_once(dev, tmp_path, ratio):
    a = write_lora(tmp_path / "a.safetensors", dev, alpha=3.0)
    out = tmp_path / "scaled.safetensors"
    assert merge("--save_to", out, "--models", a, "--ratios", ratio) == 0
    merged, original = deltas(load_safetensors(out)), deltas(load_safetensors(a))
    assert merged.keys() == original.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], ratio * original[name], rtol=1e-5, atol=1e-7)


def test_summed_loras_on_different_modules_add_exactly(dev, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", dev, alpha=1.0, train_blocks="double")
    b = write_lora(tmp_path / "b.safetensors", dev, alpha=4.0, seed=3, train_blocks="single")
    out = tmp_path / "sum.safetensors"
    assert merge("--save_to", out, "--models", a, b, "--ratios", 0.3, 2.0, "--shuffle") == 0
    merged, da, db = deltas(load_safetensors(out)), deltas(load_safetensors(a)), deltas(load_safetensors(b))
    assert merged.keys() == da.keys() | db.keys() and not da.keys() & db.keys()
    for name, delta in merged.items():
        torch.testing.assert_close(delta, 0.3 * da[name] if name in da else 2.0 * db[name], rtol=1e-5, atol=1e-7)
    assert read_metadata(out)["ss_network_dim"] == "4"


def test_an_output_name_other_than_safetensors_is_warned_about(dev, tmp_path, caplog):
    lora = write_lora(tmp_path / "a.safetensors", dev)
    out = tmp_path / "merged.ckpt"
    with caplog.at_level(logging.WARNING):
        assert merge("--save_to", out, "--models", lora) == 0
    assert deltas(load_safetensors(out)).keys() == deltas(load_safetensors(lora)).keys()
    (record,) = [r for r in caplog.records if "whatever its name" in r.getMessage()]
    assert record.getMessage().startswith(f"--save_to {out}: the file is written in safetensors format")


def test_ai_toolkit_loras_merge_into_one_lora(dev, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", dev, alpha=2.0)
    converted = to_ai_toolkit(load_safetensors(a)).state_dict
    ait = str(tmp_path / "a_ait.safetensors")
    save_safetensors(converted, ait)
    out = tmp_path / "twice.safetensors"
    assert merge("--save_to", out, "--models", ait, a, "--ratios", 1.0, 1.0, "--concat") == 0
    merged, original = deltas(load_safetensors(out)), deltas(load_safetensors(a))
    assert merged.keys() == original.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], 2 * original[name], rtol=1e-5, atol=1e-7)



def best_of_rank(change: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(change)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (1.0, -0.25)])
def test_one_lora_summed_with_itself_is_exact(dev, tmp_path, ratios, caplog):
    """The sum of sqrt-scaled factors gave (sqrt(0.5) + sqrt(0.5))^2 = 2 times the change for 0.5 + 0.5."""
    a = write_lora(tmp_path / "a.safetensors", dev, alpha=3.0)
    out = tmp_path / "twice.safetensors"
    with caplog.at_level(logging.WARNING):
        assert merge("--save_to", out, "--models", a, a, "--ratios", *ratios) == 0
    merged, original = deltas(load_safetensors(out)), deltas(load_safetensors(a))
    assert merged.keys() == original.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], sum(ratios) * original[name], rtol=1e-5, atol=1e-7, msg=name)
    assert "--concat keeps the sum exactly" not in caplog.text  # nothing lost, nothing to warn about
    assert read_metadata(out)["ss_network_dim"] == "4"


def test_loras_that_share_their_downs_sum_exactly(dev, tmp_path):
    """LoRAs trained from one seed start from the same downs; when only the ups differ the sum keeps the rank."""
    a = write_lora(tmp_path / "a.safetensors", dev, alpha=2.0)
    sd = load_safetensors(a)
    g = torch.Generator().manual_seed(7)
    other = {k: torch.randn(v.shape, generator=g) * 0.1 if k.endswith("lora_up.weight") else v for k, v in sd.items()}
    other |= {k: torch.tensor(8.0) for k in sd if k.endswith(".alpha")}  # another alpha too
    b = str(tmp_path / "b.safetensors")
    save_safetensors(other, b)
    out = tmp_path / "sum.safetensors"
    assert merge("--save_to", out, "--models", a, b, "--ratios", 0.7, -0.4) == 0
    merged, da, db = deltas(load_safetensors(out)), deltas(sd), deltas(other)
    for name in merged:
        torch.testing.assert_close(merged[name], 0.7 * da[name] - 0.4 * db[name], rtol=1e-5, atol=1e-7, msg=name)


def test_independent_loras_sum_to_the_closest_change_of_the_first_ones_rank(dev, tmp_path, caplog):
    """Two unrelated rank-4 changes add up to rank 8: the merged rank-4 module is the best rank-4 approximation
    of the exact sum (the sqrt-scaled factors' cross terms were off by about the size of the sum itself), and
    the loss is reported with --concat as the exact alternative."""
    a = write_lora(tmp_path / "a.safetensors", dev, alpha=2.0, train_blocks="single")
    b = write_lora(tmp_path / "b.safetensors", dev, alpha=4.0, seed=5, train_blocks="single")
    out = tmp_path / "sum.safetensors"
    with caplog.at_level(logging.WARNING):
        assert merge("--save_to", out, "--models", a, b, "--ratios", 0.5, 0.5) == 0
    merged, da, db = deltas(load_safetensors(out)), deltas(load_safetensors(a)), deltas(load_safetensors(b))
    assert merged.keys() == da.keys() == db.keys()
    worst = 0.0
    for name, delta in merged.items():
        exact = 0.5 * da[name] + 0.5 * db[name]
        best = best_of_rank(exact, 4)
        torch.testing.assert_close(delta, best, rtol=1e-5, atol=1e-6 * exact.abs().max().item(), msg=name)
        worst = max(worst, ((exact - best).norm() / exact.norm()).item())
    (message,) = [r.getMessage() for r in caplog.records if "--concat keeps the sum exactly" in r.getMessage()]
    assert message.startswith(f"{len(merged)} module(s) are changed by several LoRAs")
    assert f"{100 * worst:.1f}% of the sum's norm" in message
    loaded = load_safetensors(out)
    assert {v.shape[0] for k, v in loaded.items() if k.endswith("lora_down.weight")} == {4}
    assert {v.item() for k, v in loaded.items() if k.endswith(".alpha")} == {2.0}  # the first LoRA's alpha


def test_truncated_product_keeps_the_rank_of_a_weight_narrower_than_it(tmp_path):
    """A 3-wide weight cannot hold rank 4: zero rows pad the factors, so alpha / rank still scales them right."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    new_up, new_down, lost = flux_merge_lora.truncated_product(up, down, 4)
    assert (new_up.shape, new_down.shape, lost) == ((5, 4), (4, 3), 0.0)
    torch.testing.assert_close(new_up.double() @ new_down.double(), up @ down, rtol=1e-5, atol=1e-5)
    new_up, new_down, lost = flux_merge_lora.truncated_product(up, down, 2)
    exact = up @ down
    torch.testing.assert_close(new_up.double() @ new_down.double(), best_of_rank(exact, 2), rtol=1e-5, atol=1e-5)
    assert lost == pytest.approx(((exact - best_of_rank(exact, 2)).norm() / exact.norm()).item(), rel=1e-6)
