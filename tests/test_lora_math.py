"""LoRA math: applied in the network == merged by hand, dropouts, multiplier, GGPO, max norm, split_qkv."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.flux_utils import pack_latents, prepare_img_ids
from library.safetensors_io import load_safetensors, read_metadata, save_safetensors
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import SPLIT_QKV_METADATA_KEY, create_network, create_network_from_weights
from networks.lora_modules import LoRAModule
from tests.test_lora_names import tiny_clip, tiny_t5


def dit_inputs(p, batch=2, h=2, w=3, txt_len=5, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = dict(
        img=pack_latents(torch.randn(batch, 16, 2 * h, 2 * w, generator=g)),
        img_ids=prepare_img_ids(batch, h, w),
        txt=torch.randn(batch, txt_len, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.tensor([0.3, 0.8])[:batch],
        y=torch.randn(batch, max(p.vec_in_dim, 1), generator=g),
        txt_attention_mask=torch.ones(batch, txt_len, dtype=torch.long),
    )
    if p.guidance_embed:
        x["guidance"] = torch.tensor([3.5, 2.0])[:batch]
    return x


def randomize_lora(network: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero ups and downs, so that every module changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def linears_by_lora_name(model: nn.Module, prefix: str, path_prefix: str = "") -> dict[str, nn.Linear]:
    """Independent of the network code: every Linear under the name a LoRA file gives it."""
    return {
        f"{prefix}_{path_prefix}{name}".replace(".", "_"): m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


@torch.no_grad()
def merge_by_hand(weights: dict[str, torch.Tensor], targets: dict[str, nn.Linear], multiplier: float) -> int:
    """W += multiplier * alpha / rank * up @ down, read from a file's tensors as any plain loader does."""
    merged = 0
    for key, down in weights.items():
        if key.endswith(".lora_down.weight") and key.split(".")[0] in targets:
            name = key.split(".")[0]
            up, alpha = weights[f"{name}.lora_up.weight"], weights[f"{name}.alpha"]
            targets[name].weight += multiplier * (alpha / down.shape[0]) * (up.float() @ down.float())
            merged += 1
    return merged


def assert_close_to(ours: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> None:
    """Equal to rounding, and the LoRA's effect is far larger than the tolerance."""
    tolerance = 1e-5 * reference.abs().max().item()
    assert (ours - reference).abs().max().item() <= tolerance
    assert (reference - base).abs().max().item() > 1000 * tolerance, "the LoRA barely changes the output"


CASES = {
    "dev": (tiny_flux_params(guidance_embed=True), {}),
    "schnell": (tiny_flux_params(guidance_embed=False), {}),
    "chroma": (tiny_chroma_params(), {}),
    "dev-split_qkv": (tiny_flux_params(), {"split_qkv": "True"}),
    "chroma-split_qkv": (tiny_chroma_params(), {"split_qkv": "True"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_in_the_network_equals_weights_merged_by_hand(case):
    params, extra = CASES[case]
    model = random_model(params, seed=3)
    reference = copy.deepcopy(model)
    x = dit_inputs(params)
    with torch.no_grad():
        base = model(**x)
    network = create_network(0.7, 4, 2.0, None, [None, None], model, in_dims="[4,3,2,3,4]", **extra)
    network.apply_to([None, None], model)
    randomize_lora(network)
    network.eval()
    with torch.no_grad():
        ours = model(**x)
    # a plain loader: what a saved file holds, applied as multiplier * alpha/rank * up @ down
    expected_modules = len(network.unet_loras)
    assert merge_by_hand(network.state_dict(), linears_by_lora_name(reference, "lora_unet"), 0.7) == expected_modules
    with torch.no_grad():
        merged = reference(**x)
    assert_close_to(ours, merged, base)


def test_text_encoder_loras_equal_weights_merged_by_hand():
    clip, t5 = tiny_clip(2), tiny_t5(2)
    clip_ref, t5_ref = copy.deepcopy(clip), copy.deepcopy(t5)
    ids = torch.tensor([[0, 5, 9, 17, 1, 1]])
    with torch.no_grad():
        base = clip(ids).last_hidden_state, t5(ids).last_hidden_state
    network = create_network(1.3, 4, 8, None, [clip, t5], random_model(tiny_flux_params()), train_t5xxl="True")
    network.apply_to([clip, t5], None, apply_unet=False)
    randomize_lora(network, std=0.2)
    with torch.no_grad():
        ours = clip(ids).last_hidden_state, t5(ids).last_hidden_state
    sd = network.state_dict()
    targets = linears_by_lora_name(clip_ref, "lora_te1", "text_model.") | linears_by_lora_name(t5_ref, "lora_te3")
    assert merge_by_hand(sd, targets, 1.3) == 6 * 2 + 7 * 2 == len(network.text_encoder_loras)
    with torch.no_grad():
        merged = clip_ref(ids).last_hidden_state, t5_ref(ids).last_hidden_state
    for o, m, b in zip(ours, merged, base, strict=True):
        assert_close_to(o, m, b)


def test_merge_to_writes_the_same_weights_as_merging_by_hand():
    p = tiny_flux_params()
    model = random_model(p, seed=5)
    source = create_network(1.0, 4, 2, None, [None, None], model, split_qkv="True", in_dims="[2,2,2,2,2]")
    randomize_lora(source)
    weights = source.state_dict()
    by_hand, by_network = copy.deepcopy(model), copy.deepcopy(model)
    merge_by_hand(weights, linears_by_lora_name(by_hand, "lora_unet"), 0.5)
    network, _ = create_network_from_weights(0.5, None, None, [None, None], by_network, weights, for_inference=True)
    network.merge_to([None, None], by_network, weights)
    for (name, a), (_, b) in zip(by_hand.state_dict().items(), by_network.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(by_network.img_in.weight, model.img_in.weight)


def test_merge_to_only_touches_the_parts_the_file_has():
    model, clip = random_model(tiny_flux_params()), tiny_clip(1)
    source = create_network(1.0, 4, 1, None, [clip, None], model)
    randomize_lora(source)
    te_only = {k: v for k, v in source.state_dict().items() if k.startswith("lora_te1")}
    dit_before, clip_before = copy.deepcopy(model.state_dict()), copy.deepcopy(clip.state_dict())
    network, _ = create_network_from_weights(1.0, None, None, [clip, None], model, te_only, for_inference=True)
    network.merge_to([clip, None], model, te_only)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dit_before.items())
    assert not all(torch.equal(v, clip.state_dict()[k]) for k, v in clip_before.items())


def lone_module(in_dim=8, out_dim=6, **kwargs) -> tuple[nn.Linear, LoRAModule]:
    torch.manual_seed(0)
    linear = nn.Linear(in_dim, out_dim)
    lora = LoRAModule("lora_test", linear, **kwargs)
    lora.apply_to()
    return linear, lora


def test_init_follows_sd_scripts():
    linear, lora = lone_module(in_dim=100, lora_dim=4, alpha=None)
    bound = 1 / math.sqrt(100)
    assert lora.lora_down.weight.abs().max() <= bound and lora.lora_down.weight.abs().max() > 0.8 * bound
    assert lora.lora_up.weight.count_nonzero() == 0
    assert (lora.alpha.item(), lora.scale) == (4.0, 1.0)
    assert LoRAModule("z", nn.Linear(3, 3), lora_dim=8, alpha=0).scale == 1.0
    assert LoRAModule("t", nn.Linear(3, 3), lora_dim=8, alpha=torch.tensor(2.0, dtype=torch.bfloat16)).scale == 0.25
    x = torch.randn(2, 5, 100)
    torch.testing.assert_close(linear(x), lora.org_forward(x), rtol=0, atol=0)  # zero up: no change yet


def test_multiplier_scales_the_update_and_zero_or_disabled_gives_the_base_output():
    linear, lora = lone_module(lora_dim=2, alpha=1)
    randomize_lora(lora)
    x = torch.randn(3, 8)
    base = lora.org_forward(x)
    full = linear(x) - base
    lora.multiplier = 0.25
    torch.testing.assert_close(linear(x) - base, 0.25 * full)
    expected = 0.25 * 0.5 * lora.lora_up(lora.lora_down(x))  # alpha / rank = 1/2
    torch.testing.assert_close(linear(x) - base, expected)
    lora.multiplier = 0.0
    assert torch.equal(linear(x), base)
    lora.multiplier, lora.enabled = 1.0, False
    assert torch.equal(linear(x), base)


def test_network_multiplier_and_enabled_switches_reach_every_module():
    model = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 1, None, [None, None], model)
    network.set_multiplier(0.3)
    assert {lora.multiplier for lora in network.all_loras()} == {0.3}
    network.set_enabled(False)
    assert {lora.enabled for lora in network.all_loras()} == {False}


def test_dropouts_act_only_in_training_with_sd_scripts_scaling():
    linear, lora = lone_module(lora_dim=4, alpha=4, dropout=0.5, rank_dropout=0.25)
    randomize_lora(lora)
    x = torch.randn(3, 7, 8)
    lora.eval()
    clean = lora.org_forward(x) + lora.lora_up(lora.lora_down(x))
    torch.testing.assert_close(linear(x), clean)
    lora.train()
    torch.manual_seed(11)
    out = linear(x)
    torch.manual_seed(11)
    lx = nn.functional.dropout(lora.lora_down(x), p=0.5)
    mask = (torch.rand(3, 4) > 0.25)[:, None, :]  # one mask per sample and rank, shared by tokens
    expected = lora.org_forward(x) + lora.lora_up(lx * mask) / (1 - 0.25)
    torch.testing.assert_close(out, expected)


def test_module_dropout_skips_the_whole_update_in_training():
    linear, lora = lone_module(module_dropout=0.999999)
    randomize_lora(lora)
    x = torch.randn(2, 8)
    lora.train()
    assert torch.equal(linear(x), lora.org_forward(x))
    lora.eval()
    assert not torch.equal(linear(x), lora.org_forward(x))


def test_ggpo_uses_the_scaled_update_and_the_gradient_norms():
    sigma, beta = 0.03, 0.5
    linear, lora = lone_module(in_dim=8, out_dim=6, lora_dim=4, alpha=2, ggpo_sigma=sigma, ggpo_beta=beta)
    randomize_lora(lora, std=0.5)
    lora.train()
    x = torch.randn(5, 8)
    linear(x).pow(2).sum().backward()  # no perturbation yet: the norms are unknown
    lora.update_grad_norms()
    lora.update_norms()
    up, down = lora.lora_up.weight.detach(), lora.lora_down.weight.detach()
    delta = 0.5 * up @ down  # scale alpha/rank = 2/4: sd-scripts computes and drops it (spec §k.15)
    estimate = linear.weight.detach().norm(dim=1).mean()  # 6 rows: the estimate uses them all
    torch.testing.assert_close(lora.combined_weight_norms, torch.sqrt(estimate**2 + (delta**2).sum(1, keepdim=True)))
    torch.testing.assert_close(lora.weight_norms, delta.norm(dim=1, keepdim=True))
    grad = 0.5 * (up @ lora.lora_down.weight.grad + lora.lora_up.weight.grad @ down)
    torch.testing.assert_close(lora.grad_norms, grad.norm(dim=1, keepdim=True))

    torch.manual_seed(7)
    out = linear(x)
    torch.manual_seed(7)
    row_scale = sigma * lora.combined_weight_norms + beta * lora.grad_norms**2
    perturbation = torch.randn(6, 8) * row_scale / math.sqrt(6)
    expected = lora.org_forward(x) + 0.5 * lora.lora_up(lora.lora_down(x)) + x @ perturbation.T
    torch.testing.assert_close(out, expected)
    lora.eval()
    torch.testing.assert_close(linear(x), lora.org_forward(x) + 0.5 * lora.lora_up(lora.lora_down(x)))


def test_ggpo_norms_are_logged_by_the_network():
    model = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 1, None, [None, None], model, ggpo_sigma="0.03", ggpo_beta="0.01")
    randomize_lora(network)  # lora_up starts at zero: every update norm would be 0
    network.apply_to([None, None], model)
    network.train()
    assert network.grad_norms() is None
    x = dit_inputs(tiny_flux_params())
    x.pop("txt_attention_mask")
    model(**x).square().mean().backward()
    network.update_grad_norms()
    network.update_norms()
    n = len(network.unet_loras)
    assert network.grad_norms().shape == network.weight_norms().shape == network.combined_weight_norms().shape == (n, 1)
    # each module's mean row norm of its update, of base + update (base rows estimated), and of the update's gradient
    for i, lora in enumerate(network.unet_loras):
        (down, up), scale = lora.pairs()[0], lora.scale
        delta = scale * up.weight @ down.weight
        grad = scale * (up.weight @ down.weight.grad + up.weight.grad @ down.weight)
        combined = (lora.org_weight_norm_estimate**2 + delta.square().sum(1)).sqrt()
        torch.testing.assert_close(network.weight_norms()[i, 0], delta.norm(dim=1).mean())
        torch.testing.assert_close(network.grad_norms()[i, 0], grad.norm(dim=1).mean())
        torch.testing.assert_close(network.combined_weight_norms()[i, 0], combined.mean())


@pytest.mark.parametrize("split", [False, True])
def test_max_norm_regularization_caps_every_module_update(split):
    model = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 1, None, [None, None], model, split_qkv=str(split))
    randomize_lora(network, std=0.3)
    norms = {lora.lora_name: lora.delta_weight().norm().item() for lora in network.all_loras()}
    cap = sorted(norms.values())[len(norms) // 2]  # half the modules exceed it
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cap, "cpu")
    after = {lora.lora_name: lora.delta_weight().norm().item() for lora in network.all_loras()}
    assert scaled == sum(v > cap for v in norms.values()) > 0
    assert max(after.values()) == pytest.approx(cap, rel=1e-5) == max_norm
    assert all(after[k] == pytest.approx(v, rel=1e-6) for k, v in norms.items() if v <= cap)
    assert all(after[k] == pytest.approx(cap, rel=1e-5) for k, v in norms.items() if v > cap)  # at the cap, not below
    assert mean_norm == pytest.approx(sum(min(v, cap) for v in norms.values()) / len(norms))
    if split:  # the fused update of split modules is capped too (sd-scripts scales copies, spec §k.17)
        assert after["lora_unet_double_blocks_0_img_attn_qkv"] <= cap * (1 + 1e-5)


# ---- split_qkv files ---------------------------------------------------------------------


@pytest.fixture
def split_network():
    model = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 2, None, [None, None], model, split_qkv="True")
    randomize_lora(network)
    return model, network


def test_split_qkv_saves_standard_fused_modules_at_the_trained_strength(split_network, tmp_path):
    model, network = split_network
    file = tmp_path / "split.safetensors"
    network.save_weights(file, None, {"ss_network_args": json.dumps({"split_qkv": "True"})})
    weights, metadata = load_safetensors(file), read_metadata(file)
    assert metadata[SPLIT_QKV_METADATA_KEY] == "fused_alpha_x_splits"
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"
    assert tuple(weights[f"{qkv}.lora_down.weight"].shape) == (12, 64)
    assert tuple(weights[f"{linear1}.lora_up.weight"].shape) == (3 * 64 + 256, 16)
    assert weights[f"{qkv}.alpha"].item() == 6.0 and weights[f"{linear1}.alpha"].item() == 8.0
    assert weights["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 2.0
    # a plain reading of the fused file gives exactly the trained update, chunk by chunk
    for name in (qkv, linear1):
        down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
        plain = up @ down * weights[f"{name}.alpha"] / down.shape[0]
        torch.testing.assert_close(plain, getattr(network, name).delta_weight())


def test_split_qkv_files_reload_into_split_form(split_network, tmp_path):
    model, network = split_network
    file = tmp_path / "split.safetensors"
    network.save_weights(file, None, None)
    again = create_network(1.0, 4, 2, None, [None, None], model, split_qkv="True")
    again.load_weights(file)
    for a, b in zip(network.all_loras(), again.all_loras(), strict=True):
        assert a.alpha.item() == b.alpha.item() and a.scale == b.scale
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert torch.equal(pa, pb), f"{a.lora_name}.{name}"
    # a training state (accelerate's save_state / load_state) goes through state_dict() and back, strictly
    resumed = create_network(1.0, 4, 2, None, [None, None], model, split_qkv="True")
    resumed.load_state_dict(network.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), network.parameters(), strict=True))
    from_file, _ = create_network_from_weights(1.0, str(file), None, [None, None], model, split_qkv="True")
    from_file.load_weights(file)
    qkv = from_file.lora_unet_double_blocks_1_txt_attn_qkv
    assert (qkv.split_dims, qkv.lora_dim, qkv.alpha.item()) == ([64] * 3, 4, 2.0)
    torch.testing.assert_close(qkv.delta_weight(), network.lora_unet_double_blocks_1_txt_attn_qkv.delta_weight())


def test_sd_scripts_split_qkv_files_keep_their_trained_strength_here_and_load_weaker_elsewhere(split_network, tmp_path):
    model, network = split_network
    # sd-scripts' layout: the same fused tensors, but alpha left at the per-chunk value (spec §k.7)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    for name, chunks in (("double_blocks_0_img_attn_qkv", 3), ("single_blocks_0_linear1", 4)):
        weights[f"lora_unet_{name}.alpha"] /= chunks
    file = tmp_path / "sd_scripts_split.safetensors"
    save_safetensors(weights, file, {"ss_network_args": json.dumps({"split_qkv": "True"})})
    again = create_network(1.0, 4, 2, None, [None, None], model, split_qkv="True")
    again.load_weights(file)
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        torch.testing.assert_close(getattr(again, name).delta_weight(), getattr(network, name).delta_weight())
        down, up, alpha = (weights[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        plain = up @ down * alpha / down.shape[0]
        chunks = 3 if "qkv" in name else 4
        torch.testing.assert_close(plain * chunks, getattr(network, name).delta_weight())


def test_plain_files_cannot_be_continued_as_split_qkv(tmp_path):
    model = random_model(tiny_flux_params())
    # same shapes as the split network (rank 3 x 4 on the fused layers), but a dense up matrix
    plain = create_network(1.0, 4, 1, None, [None, None], model, network_reg_dims="qkv=12,linear1=16")
    randomize_lora(plain)
    file = tmp_path / "plain.safetensors"
    plain.save_weights(file, None, None)
    split = create_network(1.0, 4, 1, None, [None, None], model, split_qkv="True")
    with pytest.raises(UserError, match="split_qkv"):
        split.load_weights(file)


# ---- loading -------------------------------------------------------------------------------


def test_loaded_alpha_sets_the_scale(tmp_path):
    # sd-scripts keeps the command line's alpha/rank after loading a file with another alpha (spec §k.16)
    p = tiny_flux_params()
    model = random_model(p)
    trained = create_network(1.0, 4, 8, None, [None, None], model)
    randomize_lora(trained)
    file = tmp_path / "alpha8.safetensors"
    trained.save_weights(file, None, None)
    continued = create_network(1.0, 4, 1, None, [None, None], model)
    continued.load_weights(file)
    assert {lora.scale for lora in continued.all_loras()} == {2.0}
    reference = copy.deepcopy(model)
    continued.apply_to([None, None], model)
    x = dit_inputs(p)
    with torch.no_grad():
        ours = model(**x)
        continued.set_enabled(False)
        base = model(**x)
    merge_by_hand(load_safetensors(file), linears_by_lora_name(reference, "lora_unet"), 1.0)
    with torch.no_grad():
        assert_close_to(ours, reference(**x), base)


def test_loading_a_file_of_another_rank_names_the_fix(tmp_path):
    model = random_model(tiny_flux_params())
    file = tmp_path / "rank8.safetensors"
    create_network(1.0, 8, 1, None, [None, None], model).save_weights(file, None, None)
    with pytest.raises(UserError, match="--dim_from_weights"):
        create_network(1.0, 4, 1, None, [None, None], model).load_weights(file)
    save_safetensors({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64)}, file)  # half a module
    with pytest.raises(UserError, match=r"x_embedder\.lora_A\.weight has no lora_B beside it; the file is incomplete"):
        create_network(1.0, 4, 1, None, [None, None], model).load_weights(file)


@pytest.mark.parametrize("for_inference", [True, False])
def test_a_network_from_a_file_for_other_widths_is_refused_naming_the_file(tmp_path, for_inference):
    file = tmp_path / "wide.safetensors"
    wide = random_model(tiny_flux_params(hidden_size=128, num_heads=8))
    create_network(1.0, 4, 1, None, [None, None], wide).save_weights(file, None, None)
    model = random_model(tiny_flux_params())
    with pytest.raises(UserError, match=r"wide\.safetensors does not fit this network: lora_unet_.* other widths"):
        create_network_from_weights(1.0, str(file), None, [None, None], model, for_inference=for_inference)


def test_loading_a_file_with_nothing_for_this_network_is_refused(tmp_path):
    model = random_model(tiny_flux_params())
    file = tmp_path / "diffusers_format.safetensors"  # img_in: a module this network (no in_dims) lacks
    save_safetensors({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
                      "transformer.x_embedder.lora_B.weight": torch.zeros(model.img_in.weight.shape[0], 4)}, file)
    with pytest.raises(UserError, match=r"diffusers_format\.safetensors: none of its weights belongs to this network"):
        create_network(1.0, 4, 1, None, [None, None], model).load_weights(file)


def test_network_from_weights_takes_ranks_alphas_in_dims_and_t5_from_the_file(tmp_path):
    model, clip, t5 = random_model(tiny_flux_params()), tiny_clip(1), tiny_t5(1)
    source = create_network(
        1.0, 4, 2, None, [clip, t5], model, train_t5xxl="True", in_dims="[3,0,0,5,0]", img_mlp_dim="6", single_dim="0"
    )
    randomize_lora(source)
    file = tmp_path / "source.safetensors"
    source.save_weights(file, None, None)
    network, weights = create_network_from_weights(1.0, str(file), None, [clip, t5], model)
    assert set(weights) == set(source.state_dict())
    shape = {lora.lora_name: (lora.lora_dim, lora.alpha.item()) for lora in network.all_loras()}
    assert shape == {lora.lora_name: (lora.lora_dim, lora.alpha.item()) for lora in source.all_loras()}
    assert shape["lora_unet_guidance_in_out_layer"] == (5, 2.0) and shape["lora_unet_img_in"] == (3, 2.0)
    assert any(n.startswith("lora_te3") for n in shape)
    network.load_weights(file)
    assert all(torch.equal(v, weights[k]) for k, v in network.state_dict().items())


def test_a_files_final_layer_modules_are_applied_as_a_plain_loader_merges_them():
    # ai-toolkit's proj_out / norm_out.linear: merge, convert and diffusers apply them, so loading does too
    params = tiny_flux_params()
    model = random_model(params, seed=3)
    reference = copy.deepcopy(model)
    x = dit_inputs(params)
    with torch.no_grad():
        base = model(**x)
    source = create_network(1.0, 4, 2.0, None, [None, None], model, train_blocks="single")
    randomize_lora(source)
    weights = source.state_dict()
    g = torch.Generator().manual_seed(5)
    finals = {"lora_unet_final_layer_linear": model.final_layer.linear,
              "lora_unet_final_layer_adaLN_modulation_1": model.final_layer.adaLN_modulation[1]}  # fmt: skip
    for name, linear in finals.items():
        weights[f"{name}.lora_down.weight"] = torch.randn(4, linear.in_features, generator=g) * 0.1
        weights[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, 4, generator=g) * 0.1
        weights[f"{name}.alpha"] = torch.tensor(2.0)
    network, _ = create_network_from_weights(0.7, None, None, [None, None], model, weights)
    assert set(finals) <= {lora.lora_name for lora in network.unet_loras}
    network.apply_to([None, None], model)
    network.load_state_dict(weights)
    with torch.no_grad():
        ours = model(**x)
    assert merge_by_hand(weights, linears_by_lora_name(reference, "lora_unet"), 0.7) == len(network.unet_loras)
    with torch.no_grad():
        merged = reference(**x)
    assert_close_to(ours, merged, base)


def test_network_from_weights_refuses_files_for_other_models(tmp_path, caplog):
    model = random_model(tiny_flux_params())
    other = random_model(tiny_flux_params(depth=3, depth_single=1))
    source = create_network(1.0, 4, 1, None, [None, None], other, train_blocks="double")
    weights = source.state_dict()
    network, _ = create_network_from_weights(1.0, None, None, [None, None], model, weights)
    assert len(network.unet_loras) == 20  # blocks 0 and 1 of 3
    assert any("no target" in r.getMessage() for r in caplog.records)
    foreign = {k.replace("lora_unet_double", "lora_unet_triple"): v for k, v in weights.items()}
    with pytest.raises(UserError, match="none of its"):
        create_network_from_weights(1.0, "foreign.safetensors", None, [None, None], model, foreign)


@pytest.mark.parametrize("fp8", [None, "plain", "scaled"])
def test_restorable_merge_for_inference(fp8):
    from library.fp8 import quantize_dit_

    p = tiny_flux_params()
    model = random_model(p)
    if fp8:  # (adding an update to an fp8 weight in its own dtype is not implemented: "add ... Float8_e4m3fn")
        quantize_dit_(model, torch.float32, scaled=fp8 == "scaled")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    source = create_network(1.0, 4, 1, None, [None, None], model)
    randomize_lora(source)
    network, weights = create_network_from_weights(1.0, None, None, [None, None], model, source.state_dict(), True)
    network.apply_to([None, None], model)
    network.load_state_dict(weights)
    x = dit_inputs(p)
    with torch.no_grad():
        applied = model(**x)
        network.backup_weights()
        network.pre_calculation()
        precalculated = model(**x)
        network.restore_weights()
        restored = model(**x)
    # the merged weights are rounded to fp8 again: 0.4% of the output, where the LoRA's share is 1.5%
    tolerance = 1e-5 if fp8 is None else 6e-3
    torch.testing.assert_close(precalculated, applied, rtol=0, atol=tolerance * applied.abs().max().item())
    assert torch.equal(restored, applied)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())  # the weights (and row scales) back
