"""Each network arg changes exactly the modules it should; bad values stop with a message naming them."""

import logging

import pytest
import safetensors.torch
import torch

from library.errors import UserError
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import create_network
from tests.test_lora_names import expected_dit_names, tiny_clip, tiny_t5


@pytest.fixture(scope="module")
def flux():
    return random_model(tiny_flux_params(depth=4, depth_single=4))


def ranks(network) -> dict[str, int]:
    return {lora.lora_name: lora.lora_dim for lora in network.all_loras()}


def build(model, text_encoders=(None, None), dim=4, alpha=1, **kwargs):
    return create_network(1.0, dim, alpha, None, list(text_encoders), model, **kwargs)


ALL = expected_dit_names(4, 4)
TYPE_DIM_TARGETS = {
    "img_attn_dim": lambda n: "_img_attn_" in n,
    "txt_attn_dim": lambda n: "_txt_attn_" in n,
    "img_mlp_dim": lambda n: "_img_mlp_" in n,
    "txt_mlp_dim": lambda n: "_txt_mlp_" in n,
    "img_mod_dim": lambda n: n.endswith("_img_mod_lin"),
    "txt_mod_dim": lambda n: n.endswith("_txt_mod_lin"),
    "single_dim": lambda n: "single_blocks" in n and n.endswith(("_linear1", "_linear2")),
    "single_mod_dim": lambda n: "single_blocks" in n and n.endswith("_modulation_lin"),
}


@pytest.mark.parametrize("arg", sorted(TYPE_DIM_TARGETS))
def test_a_type_dim_sets_the_rank_of_exactly_its_layers(flux, arg):
    targeted = {n for n in ALL if TYPE_DIM_TARGETS[arg](n)}
    assert targeted, "the predicate must select something"
    changed = ranks(build(flux, **{arg: "2"}))
    assert set(changed) == ALL
    assert {n for n, r in changed.items() if r == 2} == targeted
    assert all(r == 4 for n, r in changed.items() if n not in targeted)


@pytest.mark.parametrize("arg", sorted(TYPE_DIM_TARGETS))
def test_a_zero_type_dim_removes_exactly_its_layers(flux, arg):
    targeted = {n for n in ALL if TYPE_DIM_TARGETS[arg](n)}
    assert set(ranks(build(flux, **{arg: "0"}))) == ALL - targeted


def test_type_dims_keep_network_alpha_so_the_scale_changes(flux):
    network = build(flux, dim=8, alpha=4, img_attn_dim="2")
    qkv = network.lora_unet_double_blocks_0_img_attn_qkv
    proj = network.lora_unet_double_blocks_0_txt_attn_proj
    assert (qkv.lora_dim, qkv.alpha.item(), qkv.scale) == (2, 4.0, 2.0)
    assert (proj.lora_dim, proj.alpha.item(), proj.scale) == (8, 4.0, 0.5)


IN_NAMES = {
    "img_in": ["lora_unet_img_in"],
    "time_in": ["lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer"],
    "vector_in": ["lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer"],
    "guidance_in": ["lora_unet_guidance_in_in_layer", "lora_unet_guidance_in_out_layer"],
    "txt_in": ["lora_unet_txt_in"],
}


@pytest.mark.parametrize(
    "params, present",
    [
        (tiny_flux_params(guidance_embed=True), ["img_in", "time_in", "vector_in", "guidance_in", "txt_in"]),
        (tiny_flux_params(guidance_embed=False), ["img_in", "time_in", "vector_in", "txt_in"]),
        (tiny_chroma_params(), ["img_in", "txt_in"]),
    ],
    ids=["dev", "schnell", "chroma"],
)
def test_in_dims_adapt_the_conditioning_layers_the_model_has_and_warn_about_the_others(params, present, caplog):
    model = random_model(params)
    in_ranks = dict(zip(IN_NAMES, [5, 2, 3, 6, 7], strict=True))
    with caplog.at_level(logging.WARNING):
        network = build(model, in_dims="[5,2,3,6,7]")
    conditioning = {n: r for n, r in ranks(network).items() if "blocks" not in n}
    assert conditioning == {name: in_ranks[layer] for layer in present for name in IN_NAMES[layer]}
    missing = [layer for layer in IN_NAMES if layer not in present]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(missing)
    assert all(any(layer in w for w in warnings) for layer in missing)


def test_modulation_dims_on_chroma_which_has_no_modulation_layers_warn_once_each(flux, caplog):
    chroma = random_model(tiny_chroma_params())
    dims = {"img_mod_dim": "8", "txt_mod_dim": "8", "single_mod_dim": "8", "img_attn_dim": "6"}
    with caplog.at_level(logging.WARNING):
        network = build(chroma, **dims)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(w.split(":")[0] for w in warnings) == ["img_mod_dim", "single_mod_dim", "txt_mod_dim"]
    assert all("this model has no" in w and "its rank 8 is ignored" in w for w in warnings)
    assert {r for n, r in ranks(network).items() if "_img_attn_" in n} == {6}  # what the model has still applies
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(flux, **dims)  # FLUX.1 has them all: no warning
        build(flux, train_blocks="single", img_mod_dim="8")  # there, but not trained: no warning either
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_in_dims_zero_entries_skip_layers_and_plain_lists_parse(flux):
    conditioning = {n: r for n, r in ranks(build(flux, in_dims="4,0,0,0,2")).items() if "blocks" not in n}
    assert conditioning == {"lora_unet_img_in": 4, "lora_unet_txt_in": 2}


@pytest.mark.parametrize("value", ["[1,2,3]", "1,2,3,4,5,6", "a,b,c,d,e", "[1,2,-3,4,5]"])
def test_malformed_in_dims_stop_with_a_message_naming_them(flux, value):
    with pytest.raises(UserError, match="in_dims"):
        build(flux, in_dims=value)


def blocks_of(network, kind: str) -> set[int]:
    return {int(n.split("_")[4]) for n in ranks(network) if f"_{kind}_blocks_" in n}


@pytest.mark.parametrize(
    "value, expected",
    [("0,2-3", {0, 2, 3}), ("1", {1}), ("all", {0, 1, 2, 3}), ("none", set()), ("", set()), ("3, 0-1", {0, 1, 3})],
)
def test_block_indices_select_blocks(flux, value, expected):
    network = build(flux, train_double_block_indices=value, train_single_block_indices="1-2")
    assert blocks_of(network, "double") == expected
    assert blocks_of(network, "single") == {1, 2}
    for i in expected:  # a selected block keeps all its layers
        assert sum(n.startswith(f"lora_unet_double_blocks_{i}_") for n in ranks(network)) == 10


@pytest.mark.parametrize("value", ["4", "0-4", "3-1", "1-x", "-1", "1-2-3"])
def test_block_indices_are_checked_against_the_real_depth(flux, value):
    # the tiny model has 4 double blocks: 4 is out of range although FLUX.1 has 19
    with pytest.raises(UserError, match=r"train_double_block_indices"):
        build(flux, train_double_block_indices=value)
    with pytest.raises(UserError, match=r"train_single_block_indices"):
        build(flux, train_single_block_indices=value)


@pytest.mark.parametrize("value", ["4", "0-4", "2,4"])
def test_an_index_equal_to_the_block_count_is_outside_the_range(value):
    """Blocks are numbered 0 to count − 1: index 4 of 4 blocks is an error naming the range, not a no-op."""
    from networks.lora_flux_args import parse_block_selection

    with pytest.raises(UserError, match=r"train_double_block_indices=.*outside 0-3 \(this model has 4 blocks"):
        parse_block_selection("train_double_block_indices", value, 4)
    assert parse_block_selection("train_double_block_indices", "3", 4) == [False, False, False, True]


@pytest.mark.parametrize(
    "value, kinds", [("all", {"double", "single"}), ("double", {"double"}), ("single", {"single"})]
)
def test_train_blocks_restricts_the_block_kinds(flux, value, kinds):
    names = set(ranks(build(flux, train_blocks=value)))
    assert names == {n for n in ALL if n.split("_")[2] in kinds}


def test_invalid_train_blocks_is_refused(flux):
    with pytest.raises(UserError, match="train_blocks"):
        build(flux, train_blocks="both")


def test_regex_dims_last_matching_pattern_wins(flux):
    forward = ranks(build(flux, network_reg_dims="double_blocks=8,img_attn=2"))
    assert all(r == 2 for n, r in forward.items() if "_img_attn_" in n)
    assert all(r == 8 for n, r in forward.items() if "double" in n and "_img_attn_" not in n)
    assert all(r == 4 for n, r in forward.items() if "single" in n)
    backward = ranks(build(flux, network_reg_dims="img_attn=2,double_blocks=8"))
    assert all(r == 8 for n, r in backward.items() if "double" in n)


def test_regex_dims_override_type_dims_block_selection_and_in_dims(flux):
    network = build(
        flux,
        img_attn_dim="0",
        train_double_block_indices="none",
        in_dims="[0,0,0,0,4]",
        network_reg_dims="double_blocks_1_img_mlp=6,img_attn_qkv=3,img_in=5,linear2=0",
        alpha=2,
    )
    r = ranks(network)
    double = {n: v for n, v in r.items() if "double" in n}
    # block 1's img_mlp comes back in a deselected block; img_attn_qkv comes back though img_attn_dim=0
    # (in every deselected block); img_attn_proj stays off
    expected_double = {f"lora_unet_double_blocks_1_img_mlp_{k}": 6 for k in (0, 2)}
    expected_double |= {f"lora_unet_double_blocks_{i}_img_attn_qkv": 3 for i in range(4)}
    assert double == expected_double
    assert r["lora_unet_img_in"] == 5 and r["lora_unet_txt_in"] == 4
    assert not any(n.endswith("linear2") for n in r)
    assert network.lora_unet_img_in.alpha.item() == 2.0


def test_regex_dims_apply_to_text_encoder_modules(flux):
    network = build(flux, [tiny_clip(2), None], network_reg_dims="te1.*q_proj=7,te1.*fc2=0")
    r = ranks(network)
    assert {n for n, v in r.items() if v == 7} == {
        f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj" for i in (0, 1)
    }
    assert not any("fc2" in n for n in r)
    assert sum(n.startswith("lora_te1") for n in r) == 10


@pytest.mark.parametrize("key", ["network_reg_dims", "network_reg_lrs"])
def test_a_regex_that_matches_no_module_is_warned_about(flux, caplog, key):
    import logging

    with caplog.at_level(logging.WARNING):  # "dubble" for "double": before, the run trained with no word
        build(flux, **{key: "dubble_blocks=8,img_attn=2"})
    messages = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert messages == [f"--network_args {key}: the pattern 'dubble_blocks' (= 8{'.0' if key.endswith('lrs') else ''}) "
                        "matches no module of this network; verbose=True lists the module names"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a pattern that only sets ranks to 0 still matches its modules
        build(flux, **{key: "linear2=0"})
    assert not [r for r in caplog.records if key in r.getMessage()]


@pytest.mark.parametrize("key", ["network_reg_dims", "network_reg_lrs"])
@pytest.mark.parametrize("value", ["img_attn(=4", "no_equals_sign", "img_attn=abc"])
def test_malformed_regex_args_stop_with_a_message_naming_them(flux, key, value):
    with pytest.raises(UserError, match=key):
        build(flux, **{key: value})


def test_unknown_network_args_are_refused(flux):
    with pytest.raises(UserError, match="algo"):
        build(flux, algo="lokr")


@pytest.mark.parametrize("arg, value", [("img_attn_dim", "four"), ("single_dim", "-1"), ("rank_dropout", "1.5")])
def test_bad_numbers_are_refused(flux, arg, value):
    with pytest.raises(UserError, match=arg):
        build(flux, **{arg: value})


def test_booleans_accept_true_spelled_either_way_and_refuse_garbage(flux):
    assert build(flux, split_qkv="true").lora_unet_double_blocks_0_img_attn_qkv.split_dims is not None
    assert build(flux, split_qkv="False").lora_unet_double_blocks_0_img_attn_qkv.split_dims is None
    with pytest.raises(UserError, match="split_qkv"):
        build(flux, split_qkv="maybe")


def test_conv_args_are_accepted_with_a_warning_and_change_nothing(flux, caplog):
    with caplog.at_level(logging.WARNING):
        network = build(flux, conv_dim="8", conv_alpha="4")
    assert ranks(network) == ranks(build(flux))
    assert any("conv_dim" in r.getMessage() for r in caplog.records)


def test_ggpo_needs_both_values(flux):
    with pytest.raises(UserError, match="ggpo_sigma and ggpo_beta"):
        build(flux, ggpo_sigma="0.03")
    network = build(flux, ggpo_sigma="0.03", ggpo_beta="0.01")
    assert all(lora.ggpo_sigma == 0.03 and lora.ggpo_beta == 0.01 for lora in network.all_loras())


def test_dropouts_reach_every_module(flux):
    network = create_network(1.0, 4, 1, None, [None, None], flux, 0.25, rank_dropout="0.1", module_dropout="0.2")
    assert {(m.dropout, m.rank_dropout, m.module_dropout) for m in network.all_loras()} == {(0.25, 0.1, 0.2)}
    # sd-scripts' trainer also passes the neuron dropout as a `dropout` network arg
    network = build(flux, dropout="0.3")
    assert {m.dropout for m in network.all_loras()} == {0.3}


def test_defaults_for_missing_dim_and_alpha_are_sd_scripts(flux):
    network = create_network(1.0, None, None, None, [None, None], flux)
    lora = network.lora_unet_single_blocks_0_linear1
    assert (lora.lora_dim, lora.alpha.item(), lora.scale) == (4, 1.0, 0.25)


def test_verbose_lists_modules_and_skipped_ones(flux, caplog):
    with caplog.at_level(logging.INFO):
        build(flux, verbose="True", single_mod_dim="0")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "lora_unet_double_blocks_3_txt_mlp_2" in text
    assert "skipped" in text and "lora_unet_single_blocks_0_modulation_lin" in text


# ---- learning rates ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders():
    return tiny_clip(1), tiny_t5(1)


def param_ids(params) -> set[int]:
    return {id(p) for p in params}


def lora_params(network, prefix: str, up_only: bool | None = None) -> set[int]:
    return {
        id(p)
        for lora in network.all_loras()
        if lora.lora_name.startswith(prefix)
        for name, p in lora.named_parameters()
        if up_only is None or (("lora_up" in name) == up_only)
    }


@pytest.mark.parametrize(
    "te_lr, expected",
    [
        (None, [1e-3, 1e-3]),
        ([], [1e-3, 1e-3]),
        (5e-4, [5e-4, 5e-4]),
        ([5e-4], [5e-4, 5e-4]),
        ([5e-4, 1e-5], [5e-4, 1e-5]),
    ],
)
def test_text_encoder_lrs_one_for_both_or_one_each(flux, encoders, te_lr, expected):
    network = build(flux, encoders, train_t5xxl="True")
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, 2e-3, 1e-3)
    assert descriptions == ["textencoder 1 ", "textencoder 2 ", "unet"]
    assert [g["lr"] for g in params] == [*expected, 2e-3]
    assert param_ids(params[0]["params"]) == lora_params(network, "lora_te1")
    assert param_ids(params[1]["params"]) == lora_params(network, "lora_te3")
    assert param_ids(params[2]["params"]) == lora_params(network, "lora_unet")


def test_unet_lr_defaults_and_zero_lr_groups_are_dropped(flux, encoders):
    network = build(flux, encoders, train_t5xxl="True")
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([0, 1e-5], None, 1e-3)
    assert descriptions == ["textencoder 2 ", "unet"]
    assert [g["lr"] for g in params] == [1e-5, 1e-3]


def test_loraplus_puts_up_weights_in_plus_groups_with_specific_ratios_first(flux, encoders):
    network = build(flux, encoders, loraplus_lr_ratio="4", loraplus_unet_lr_ratio="16")
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder 1 ", "textencoder 1  plus", "unet", "unet plus"]
    assert [g["lr"] for g in params] == pytest.approx([1e-4, 4e-4, 1e-3, 1.6e-2])
    assert param_ids(params[1]["params"]) == lora_params(network, "lora_te1", up_only=True)
    assert param_ids(params[3]["params"]) == lora_params(network, "lora_unet", up_only=True)
    assert param_ids(params[2]["params"]) == lora_params(network, "lora_unet", up_only=False)



def test_a_part_loraplus_ratio_of_0_falls_back_and_one_that_ends_at_0_is_refused(flux, encoders):
    from library.errors import UserError

    network = build(flux, encoders, loraplus_lr_ratio="16", loraplus_unet_lr_ratio="0")  # 0: the general ratio
    _, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)
    assert "unet plus" in descriptions
    plain = build(flux, encoders, loraplus_unet_lr_ratio="0")  # 0 and no general ratio: no LoRA+
    _, descriptions = plain.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)
    assert descriptions == ["textencoder 1 ", "unet"]
    with pytest.raises(UserError, match="loraplus_lr_ratio=0 gives the DiT's and the text encoders' lora_up learning"):
        build(flux, encoders, loraplus_lr_ratio="0")  # lora_up would never train


def test_regex_lrs_group_modules_by_the_last_matching_pattern(flux):
    network = build(flux, network_reg_lrs="double_blocks=1e-3,img_attn=2e-3,nothing_matches=9", loraplus_lr_ratio="2")
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-4)
    assert descriptions == [
        "unet reg_lr_0",
        "unet reg_lr_0 plus",
        "unet reg_lr_1",
        "unet reg_lr_1 plus",
        "unet",
        "unet plus",
    ]
    assert [g["lr"] for g in params] == pytest.approx([1e-3, 2e-3, 2e-3, 4e-3, 1e-4, 2e-4])
    by_name = {lora.lora_name: lora for lora in network.all_loras()}
    img_attn = {id(p) for n, m in by_name.items() if "_img_attn_" in n for p in m.parameters()}
    other_double = {
        id(p) for n, m in by_name.items() if "double" in n and "_img_attn_" not in n for p in m.parameters()
    }
    single = {id(p) for n, m in by_name.items() if "single" in n for p in m.parameters()}
    assert param_ids(params[2]["params"]) | param_ids(params[3]["params"]) == img_attn
    assert param_ids(params[0]["params"]) | param_ids(params[1]["params"]) == other_double
    assert param_ids(params[4]["params"]) | param_ids(params[5]["params"]) == single


def test_trainable_params_cover_the_whole_network(flux):
    network = build(flux)
    assert param_ids(network.get_trainable_params()) == lora_params(network, "lora_")
    network.requires_grad_(False)
    network.prepare_grad_etc(None, flux)
    assert all(p.requires_grad for p in network.parameters())
    network.eval()
    network.on_epoch_start(None, flux)
    assert network.training
    assert network.is_mergeable() is True
    network.enable_gradient_checkpointing()  # a no-op that must exist
    assert isinstance(next(iter(network.get_trainable_params())), torch.nn.Parameter)


def test_training_only_the_dit_drops_the_text_encoder_loras():
    model, clip = random_model(tiny_flux_params()), tiny_clip(1)
    network = build(model, [clip, None])
    assert len(network.text_encoder_loras) == 6
    ids = torch.tensor([[0, 3, 7, 1]])
    with torch.no_grad():
        clip_before = clip(ids).last_hidden_state
    network.apply_to([clip, None], model, apply_text_encoder=False, apply_unet=True)
    for p in network.parameters():
        torch.nn.init.normal_(p)
    assert network.text_encoder_loras == []
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    with torch.no_grad():
        assert torch.equal(clip(ids).last_hidden_state, clip_before)
    assert all(lora.org_forward is not None for lora in network.unet_loras)


def test_entry_points_keep_sd_scripts_signatures():
    import inspect

    from networks import lora_flux

    def params(f):
        return list(inspect.signature(f).parameters)

    assert params(lora_flux.create_network) == [
        "multiplier",
        "network_dim",
        "network_alpha",
        "ae",
        "text_encoders",
        "flux",
        "neuron_dropout",
        "kwargs",
    ]
    assert params(lora_flux.create_network_from_weights) == [
        "multiplier",
        "file",
        "ae",
        "text_encoders",
        "flux",
        "weights_sd",
        "for_inference",
        "kwargs",
    ]
    network = lora_flux.LoRANetwork
    assert params(network.apply_to) == ["self", "text_encoders", "flux", "apply_text_encoder", "apply_unet"]
    assert params(network.save_weights) == ["self", "file", "dtype", "metadata"]
    assert params(network.load_weights) == ["self", "file"]
    assert params(network.merge_to) == ["self", "text_encoders", "flux", "weights_sd", "dtype", "device"]
    assert params(network.prepare_optimizer_params_with_multiple_te_lrs) == [
        "self",
        "text_encoder_lr",
        "unet_lr",
        "default_lr",
    ]
    assert params(network.apply_max_norm_regularization) == ["self", "max_norm_value", "device"]
    for name in (
        "set_multiplier",
        "set_enabled",
        "is_mergeable",
        "enable_gradient_checkpointing",
        "prepare_grad_etc",
        "on_epoch_start",
        "on_step_start",
        "get_trainable_params",
        "set_loraplus_lr_ratio",
        "update_norms",
        "update_grad_norms",
        "grad_norms",
        "weight_norms",
        "combined_weight_norms",
        "backup_weights",
        "restore_weights",
        "pre_calculation",
    ):
        assert callable(getattr(network, name)), name


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_network_dropout_outside_0_to_1_is_refused(value):
    from networks.lora_flux_args import dropout_args

    with pytest.raises(UserError, match=rf"^--network_dropout {value}: expected a number in \[0, 1\)$"):
        dropout_args({}, value)


def test_load_weights_lists_only_the_files_own_keys_as_unexpected(tmp_path, caplog):
    """A module of another model without alpha: its two weights are ignored, and no alpha is made up for it."""
    from library.tiny_models import random_model, tiny_flux_params
    from networks.lora_flux import create_network

    flux = random_model(tiny_flux_params())
    network = create_network(1.0, 4, 4.0, None, [None, None], flux)
    weights = dict(network.state_dict())
    foreign = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}  # fmt: skip
    path = str(tmp_path / "extra.safetensors")
    safetensors.torch.save_file(weights | foreign, path)
    with caplog.at_level(logging.INFO):
        info = network.load_weights(path)
    assert sorted(info.unexpected_keys) == sorted(foreign)
    assert "2 weights have no module here and are ignored" in caplog.text
    assert "modules have no alpha" not in caplog.text
