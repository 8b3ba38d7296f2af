"""Edges of the network_args parsing, target selection and LoRA file helpers that a mutation round
found untested: each value accepted or refused, each rank rule and each file convention pinned directly."""

import json
import logging
import re

import pytest
import safetensors.torch
import torch
from torch import nn

from library.errors import CheckpointError, UserError
from library.lora_formats import PEFT_METADATA_KEY
from library.model_hashes import precalculate_safetensors_hashes
from library.safetensors_io import read_metadata
from networks import lora_flux_args as args
from networks import lora_flux_files as files
from networks import lora_flux_targets as targets
from networks.lora_modules import LoRAModule

# ---- lora_flux_args ----------------------------------------------------------------------------


def test_the_string_none_is_unset_and_a_none_rank_is_no_rank():
    assert args.is_unset("None") and args.is_unset(" None ") and args.is_unset("  ") and args.is_unset(None)
    assert not args.is_unset("0")
    assert args.parse_int("img_attn_dim", "None") is None
    assert args.parse_float("ggpo_beta", "None") is None


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "YES"])
def test_booleans_read_true(text):
    assert args.parse_bool("split_qkv", text) is True


@pytest.mark.parametrize("text", ["false", "0", "no", "No", "none", "None", ""])
def test_booleans_read_false(text):
    assert args.parse_bool("split_qkv", text) is False


def test_booleans_pass_through_and_garbage_is_refused_naming_the_key():
    assert args.parse_bool("verbose", True) is True and args.parse_bool("verbose", False) is False
    with pytest.raises(UserError, match=r"--network_args split_qkv=maybe: expected True or False"):
        args.parse_bool("split_qkv", "maybe")


def test_ranks_zero_is_allowed_negative_is_refused():
    assert args.parse_int("img_attn_dim", " 0 ") == 0
    with pytest.raises(UserError, match=r"img_attn_dim=-1: must not be negative"):
        args.parse_int("img_attn_dim", "-1")
    with pytest.raises(UserError, match=r"img_attn_dim=x: expected a whole number"):
        args.parse_int("img_attn_dim", "x")


def test_floats_zero_and_the_bounds_of_below_one():
    assert args.parse_float("dropout", "0", below_one=True) == 0.0
    assert args.parse_float("dropout", "0.99", below_one=True) == 0.99
    assert args.parse_float("loraplus_lr_ratio", "16") == 16.0
    with pytest.raises(UserError, match=re.escape("dropout=1: expected a number in [0, 1)")):
        args.parse_float("dropout", "1", below_one=True)
    with pytest.raises(UserError, match=re.escape("ggpo_beta=-0.5: expected a number in [0, inf)")):
        args.parse_float("ggpo_beta", "-0.5")
    with pytest.raises(UserError, match=re.escape("dropout=-0.1: expected a number in [0, 1)")):
        args.parse_float("dropout", "-0.1", below_one=True)


def test_regex_ranks_refuse_negative_values():
    assert args.rank_value("0") == 0
    with pytest.raises(ValueError):
        args.rank_value("-1")


@pytest.mark.parametrize("value", ["[1,2,3,4,5]", "1,2,3,4,5", " [ 1, 2,3,4 ,5] ", [1, 2, 3, 4, 5], ("1", 2, 3, 4, 5)])
def test_in_dims_spellings(value):
    assert args.parse_in_dims(value) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("[1,2,3,4]", "expected 5 ranks (img_in, time_in, vector_in, guidance_in, txt_in)"),
        ("[1,2,3,4,5,6]", "expected 5 ranks"),
        ("1,,3,4,5", "entry 2 (time_in) is empty"),
        ("1,2,x,4,5", "entry 3 (vector_in) 'x' is not a whole number"),
        ("-1,2,3,4,5", "entry 1 (img_in) -1 is negative"),
        ("1,2,3,4,-2", "entry 5 (txt_in) -2 is negative"),
    ],
)
def test_in_dims_errors_name_the_entry(value, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        args.parse_in_dims(value)


def test_block_selections():
    key = "train_double_block_indices"
    assert args.parse_block_selection(key, "all", 3) == [True] * 3
    assert args.parse_block_selection(key, " none ", 3) == [False] * 3
    assert args.parse_block_selection(key, "", 3) == [False] * 3
    assert args.parse_block_selection(key, "0, 2-3", 5) == [True, False, True, True, False]
    assert args.parse_block_selection(key, "4", 5) == [False] * 4 + [True]
    assert args.parse_block_selection(key, "1-1", 3) == [False, True, False]
    assert args.parse_block_selection(key, "0-4", 5) == [True] * 5


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("1-2-3", "'1-2-3' is not an index or a range like 4-7"),
        ("a", "'a' is not an index"),
        ("-1", "'-1' is not an index"),
        ("5", "5 is outside 0-4 (this model has 5 blocks of that kind)"),
        ("3-5", "3-5 is outside 0-4"),
        ("3-1", "3-1 is outside 0-4"),
    ],
)
def test_block_selection_errors(value, fragment):
    with pytest.raises(UserError, match=re.escape(f"train_single_block_indices={value}: {fragment}")):
        args.parse_block_selection("train_single_block_indices", value, 5)


def test_regex_pairs_skip_empty_parts_and_split_on_the_first_equals():
    assert args.parse_regex_pairs("network_reg_dims", "a=1, ,b.*=2,", args.rank_value) == [("a", 1), ("b.*", 2)]
    with pytest.raises(UserError, match=re.escape("network_reg_lrs: 'a=1=2' has a bad value '1=2'")):
        args.parse_regex_pairs("network_reg_lrs", "a=1=2", float)
    with pytest.raises(UserError, match=re.escape("network_reg_lrs: 'a=-1' has a negative value")):
        args.parse_regex_pairs("network_reg_lrs", "a=-1", float)
    with pytest.raises(UserError, match=re.escape("network_reg_dims: 'a[' is not a valid regular expression")):
        args.parse_regex_pairs("network_reg_dims", "a[=1", args.rank_value)
    with pytest.raises(UserError, match=re.escape("network_reg_dims: 'abc' is not pattern=value")):
        args.parse_regex_pairs("network_reg_dims", "abc", args.rank_value)


def test_the_last_matching_pattern_wins():
    pairs = [(re.compile("attn"), 1), (re.compile("qkv"), 2), (re.compile("mlp"), 3)]
    assert args.last_match(pairs, "img_attn_qkv") == (1, 2)
    assert args.last_match(pairs, "img_attn_proj") == (0, 1)
    assert args.last_match(pairs, "final") is None


def test_unknown_args_are_named():
    args.check_known_args({"split_qkv": "True", "in_dims": "1,1,1,1,1"})
    with pytest.raises(UserError, match=r"unknown network arg\(s\) bogus, zz for networks.lora_flux"):
        args.check_known_args({"zz": 1, "bogus": 2, "verbose": "1"})


def test_loraplus_zero_parts():
    parts = args.LORAPLUS_PARTS
    assert args.zero_loraplus_parts((None, None, None), parts) == []
    assert args.zero_loraplus_parts((0.0, 16.0, None), parts) == ["text encoders"]
    assert args.zero_loraplus_parts((0.0, None, 4.0), parts) == ["DiT"]
    assert args.zero_loraplus_parts((4.0, 0.0, 0.0), parts) == []
    assert args.zero_loraplus_parts((None, 0.0, 0.0), parts) == []
    assert args.zero_loraplus_parts((0.0, 0.0, 0.0), parts) == ["DiT", "text encoders"]


def test_loraplus_ratios_refuse_only_when_every_part_ends_at_zero():
    assert args.loraplus_ratios({"loraplus_lr_ratio": "0", "loraplus_unet_lr_ratio": "16"}) == (0.0, 16.0, None)
    assert args.loraplus_ratios({"loraplus_lr_ratio": "0", "loraplus_text_encoder_lr_ratio": "4"}) == (0.0, None, 4)
    assert args.loraplus_ratios({"loraplus_unet_lr_ratio": "0"}) == (None, 0.0, None)
    with pytest.raises(UserError, match=re.escape("gives the DiT's and the text encoders' lora_up learning rate 0")):
        args.loraplus_ratios({"loraplus_lr_ratio": "0"})
    with pytest.raises(UserError, match=re.escape("gives the DiT's lora_up learning rate 0")):
        args.refuse_zero_loraplus((0.0, None, 4.0), ["DiT", "text encoders"])
    args.refuse_zero_loraplus((0.0, None, None), ["text encoders"][:0])


def test_ggpo_needs_both_in_either_order():
    assert args.ggpo_args({"ggpo_sigma": "0.03", "ggpo_beta": "0.01"}) == (0.03, 0.01)
    assert args.ggpo_args({}) == (None, None)
    for one in ({"ggpo_sigma": "0.03"}, {"ggpo_beta": "0.01"}):
        with pytest.raises(UserError, match="ggpo_sigma and ggpo_beta go together"):
            args.ggpo_args(one)


def test_dropouts_agree_or_stop():
    assert args.dropout_args({}, 0.5) == (0.5, None, None)
    assert isinstance(args.dropout_args({}, 0)[0], float)
    assert args.dropout_args({"dropout": "0.1"}, 0.1) == (0.1, None, None)
    assert args.dropout_args({"dropout": "0.1", "rank_dropout": "0.2", "module_dropout": "0.3"}, None) == (
        0.1, 0.2, 0.3)  # fmt: skip
    with pytest.raises(UserError, match=re.escape("--network_dropout 0.1 and --network_args dropout=0.2 disagree")):
        args.dropout_args({"dropout": "0.2"}, 0.1)
    with pytest.raises(UserError, match=re.escape("--network_dropout 1: expected a number in [0, 1)")):
        args.dropout_args({}, 1)
    for key in ("rank_dropout", "module_dropout"):
        with pytest.raises(UserError, match=re.escape(f"{key}=1: expected a number in [0, 1)")):
            args.dropout_args({key: "1"}, None)


def test_network_options_map_every_arg_to_its_keyword():
    options = args.network_options(
        {"dropout": "0.1", "rank_dropout": "0.2", "module_dropout": "0.3", "ggpo_sigma": "0.03",
         "ggpo_beta": "0.01", "img_attn_dim": "2", "network_reg_dims": "a=3", "network_reg_lrs": "b=0.5",
         "verbose": "yes", "train_blocks": "single", "in_dims": "1,2,3,4,5"},
        None, 4, 4)  # fmt: skip
    assert options["dropout"] == 0.1 and options["rank_dropout"] == 0.2 and options["module_dropout"] == 0.3
    assert options["ggpo_sigma"] == 0.03 and options["ggpo_beta"] == 0.01
    assert options["type_dims"] == [2] + [None] * 7
    assert options["reg_dims"] == [("a", 3)] and options["reg_lrs"] == [("b", 0.5)]
    assert options["verbose"] is True and options["train_blocks"] == "single" and options["in_dims"] == [1, 2, 3, 4, 5]
    defaults = args.network_options({}, None, 4, 4)
    assert defaults["split_qkv"] is False and defaults["train_t5xxl"] is False and defaults["verbose"] is False
    assert defaults["type_dims"] is None and defaults["reg_dims"] is None and defaults["reg_lrs"] is None
    assert defaults["train_blocks"] == "all" and defaults["dropout"] is None


def test_network_options_check_blocks_against_the_model_and_refuse_bad_values():
    assert args.network_options({"train_single_block_indices": "3"}, None, None, None)  # no model yet: syntax only
    assert args.network_options({"train_double_block_indices": "9"}, None, None, 2)["train_double_block_indices"]
    with pytest.raises(UserError, match="train_double_block_indices=4: 4 is outside 0-3"):
        args.network_options({"train_double_block_indices": "4"}, None, 4, 4)
    with pytest.raises(UserError, match="train_single_block_indices=2: 2 is outside 0-1"):
        args.network_options({"train_single_block_indices": "2"}, None, 4, 2)
    with pytest.raises(UserError, match="train_blocks=Single: expected all, double or single"):
        args.network_options({"train_blocks": "Single"}, None, 4, 4)
    for key, value in (("conv_dim", "x"), ("conv_alpha", "-1"), ("loraplus_lr_ratio", "0")):
        with pytest.raises(UserError, match=key if key != "loraplus_lr_ratio" else "lora_up learning rate 0"):
            args.validate_network_args(**{key: value})


def test_conv_args_warn_only_when_the_network_is_built(caplog):
    with caplog.at_level(logging.WARNING):
        args.network_options({"conv_dim": "4"}, None, None, None)
    assert "conv_dim" not in caplog.text
    with caplog.at_level(logging.WARNING):
        args.network_options({"conv_alpha": "1"}, None, 2, 2)
    assert "conv_dim / conv_alpha have no effect" in caplog.text


# ---- lora_flux_targets ---------------------------------------------------------------------------


class DoubleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_attn = nn.Module()
        self.img_attn.qkv = nn.Linear(4, 12)


class SingleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(4, 20)


class Conditioner(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(4, 4), nn.Linear(4, 4)


def toy_dit(time_in=True):
    unet = nn.Module()
    unet.double_blocks = nn.ModuleList([DoubleStreamBlock(), DoubleStreamBlock()])
    unet.single_blocks = nn.ModuleList([SingleStreamBlock()])
    unet.img_in = nn.Linear(4, 4)
    if time_in:
        unet.time_in = Conditioner()
    unet.txt_in = nn.Linear(4, 4)
    unet.guidance_in = nn.Identity()
    unet.final_layer = nn.Module()
    unet.final_layer.linear = nn.Linear(4, 4)
    return unet


BLOCKS = {"double": ("DoubleStreamBlock",), "single": ("SingleStreamBlock",)}


def test_dit_targets_by_kind_in_dims_and_final_layers(caplog):
    unet = toy_dit(time_in=False)
    found = {name: kind for name, _, kind in targets.dit_targets(unet, "lora_unet", BLOCKS, ("double",), None)}
    assert found == {f"lora_unet_double_blocks_{i}_img_attn_qkv": "double" for i in (0, 1)}
    with caplog.at_level(logging.WARNING):
        found = {n: k for n, _, k in targets.dit_targets(unet, "lora_unet", BLOCKS, ("single",), [1, 2, 0, 3, 1])}
    assert found == {"lora_unet_single_blocks_0_linear1": "single", "lora_unet_img_in": 0, "lora_unet_txt_in": 4}
    assert "no time_in layer; its rank 2 is ignored" in caplog.text and "vector_in" not in caplog.text
    assert "guidance_in" in caplog.text  # an Identity is no Linear
    every = {n: k for n, _, k in targets.dit_targets(toy_dit(), "lora_unet", BLOCKS, (), None, all_in_layers=True)}
    assert every == {"lora_unet_img_in": 0, "lora_unet_time_in_in_layer": 1, "lora_unet_time_in_out_layer": 1,
                     "lora_unet_txt_in": 4, "lora_unet_final_layer_linear": "final"}  # fmt: skip


def test_text_encoder_targets_take_the_listed_classes_and_respell_clip_paths():
    encoder = nn.Module()
    encoder.encoder = nn.Module()
    encoder.encoder.layers = nn.ModuleList([SingleStreamBlock()])
    encoder.head = nn.Linear(4, 4)
    names = [n for n, _ in targets.text_encoder_targets(encoder, "lora_te1", ["SingleStreamBlock"], clip=True)]
    assert names == ["lora_te1_text_model_encoder_layers_0_linear1"]
    names = [n for n, _ in targets.text_encoder_targets(encoder, "lora_te3", ["SingleStreamBlock"], clip=False)]
    assert names == ["lora_te3_encoder_layers_0_linear1"]
    assert targets.clip_file_path("encoder.layers.3.mlp.fc1") == "text_model.encoder.layers.3.mlp.fc1"
    assert targets.clip_file_path("text_model.encoder.layers.3.x") == "text_model.encoder.layers.3.x"
    assert targets.clip_file_path("embeddings.x") == "embeddings.x"


def test_type_dims_warn_only_for_layers_the_model_lacks(caplog):
    with caplog.at_level(logging.WARNING):
        targets.warn_type_dims_without_layers(toy_dit(), [2, 3, None, None, None, None, 5, None])
    assert "txt_attn_dim: this model has no txt_attn layers; its rank 3 is ignored" in caplog.text
    assert "img_attn_dim" not in caplog.text and "single_dim" not in caplog.text
    caplog.clear()
    unet = nn.Module()
    unet.single_blocks_linear = nn.Module()
    unet.single_blocks_linear.other = nn.Linear(2, 2)  # "single_blocks" and "linear" in one path
    unet.a = nn.Module()
    unet.a.single_blocks = nn.Linear(2, 2)  # only "single_blocks": not a single_dim layer
    with caplog.at_level(logging.WARNING):
        targets.warn_type_dims_without_layers(unet, [None] * 6 + [5, None])
    assert "single_dim" not in caplog.text
    del unet.single_blocks_linear
    with caplog.at_level(logging.WARNING):
        targets.warn_type_dims_without_layers(unet, [None] * 6 + [5, None])
    assert "single_dim: this model has no single_blocks linear layers" in caplog.text


def test_rank_rules_in_their_order():
    rules = targets.RankRules(lora_dim=4, alpha=2.0, in_dims=[1, 2, 3, 0, 5],
                              type_dims=[8, None, None, None, None, None, 6, 7],
                              train_double_block_indices=[True, False],
                              train_single_block_indices=[False, True])  # fmt: skip
    assert rules.rank("lora_unet_double_blocks_0_img_attn_qkv", "double") == (8, 2.0)
    assert rules.rank("lora_unet_double_blocks_1_img_attn_qkv", "double") == (0, 2.0)
    assert rules.rank("lora_unet_double_blocks_0_txt_attn_qkv", "double") == (4, 2.0)
    assert rules.rank("lora_unet_single_blocks_1_linear1", "single") == (6, 2.0)
    assert rules.rank("lora_unet_single_blocks_0_linear1", "single") == (0, 2.0)
    assert rules.rank("lora_unet_single_blocks_1_modulation_lin", "single") == (7, 2.0)
    assert rules.rank("lora_unet_double_blocks_0_img_mod_lin", "double") == (4, 2.0)  # img_mod_dim unset
    assert rules.rank("lora_unet_time_in_in_layer", 1) == (2, 2.0)
    assert rules.rank("lora_unet_final_layer_linear", "final") == (4, 2.0)
    # the first matching type dim: a name with img_attn and modulation takes img_attn_dim
    assert rules.rank("lora_unet_double_blocks_0_img_attn_modulation", "double") == (8, 2.0)
    rules.reg_dims = [(re.compile("attn"), 3), (re.compile("qkv"), 9)]
    assert rules.rank("lora_unet_double_blocks_1_img_attn_qkv", "double") == (9, 2.0)  # not zeroed by selection
    assert rules.rank("lora_unet_double_blocks_0_img_attn_proj", "double") == (3, 2.0)
    from_file = targets.RankRules(lora_dim=4, alpha=1.0, modules_dim={"a": 3}, modules_alpha={"a": 1.5})
    assert from_file.rank("a", "double") == (3, 1.5) and from_file.rank("b", "double") == (0, None)
    empty = targets.RankRules(lora_dim=4, alpha=1.0, modules_dim={})
    assert empty.rank("a", "double") == (0, None)


def test_split_targets_and_chunks():
    assert targets.is_split_target("lora_unet_double_blocks_3_img_attn_qkv")
    assert targets.is_split_target("lora_unet_double_blocks_3_txt_attn_qkv")
    assert targets.is_split_target("lora_unet_single_blocks_0_linear1")
    assert not targets.is_split_target("lora_unet_single_blocks_0_linear2")
    assert not targets.is_split_target("lora_unet_double_blocks_3_img_attn_proj")
    assert targets.split_parts("lora_unet_double_blocks_3_txt_attn_qkv") == 3
    assert targets.split_parts("lora_unet_single_blocks_0_linear1") == 4
    assert targets.split_dims("lora_unet_double_blocks_0_img_attn_qkv", nn.Linear(4, 12)) == [4, 4, 4]
    assert targets.split_dims("lora_unet_single_blocks_0_linear1", nn.Linear(4, 20)) == [4, 4, 4, 8]
    assert targets.split_dims("lora_unet_single_blocks_0_linear2", nn.Linear(4, 20)) is None


def test_block_selection_lengths_and_patterns():
    targets.check_block_selection(toy_dit(), [True, False], [True])
    with pytest.raises(UserError, match="train_double_block_indices: 3 flags given for a model with 2 blocks"):
        targets.check_block_selection(toy_dit(), [True] * 3, None)
    with pytest.raises(UserError, match="train_single_block_indices: 0 flags given for a model with 1 blocks"):
        targets.check_block_selection(toy_dit(), None, [])
    assert targets.compile_patterns(None, "network_reg_dims") is None
    assert targets.compile_patterns([], "network_reg_dims") is None
    compiled = targets.compile_patterns({"a.c": 2}, "network_reg_dims")
    assert compiled[0][0].pattern == "a.c" and compiled[0][1] == 2
    assert targets.compile_patterns([("b", 0.5)], "network_reg_lrs")[0][1] == 0.5
    with pytest.raises(UserError, match=re.escape("network_reg_lrs: '(' is not a valid regular expression")):
        targets.compile_patterns([("(", 1.0)], "network_reg_lrs")
    assert targets.get_submodule(toy_dit(), "time_in.in_layer") is not None
    assert targets.get_submodule(toy_dit(), "vector_in.in_layer") is None


# ---- lora_flux_files -----------------------------------------------------------------------------

QKV, LINEAR1, PROJ = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1", "lora_unet_x_proj"


def alphas(dtype=torch.bfloat16):
    return {f"{QKV}.alpha": torch.tensor(2.0, dtype=dtype), f"{LINEAR1}.alpha": torch.tensor(2.0, dtype=dtype),
            f"{PROJ}.alpha": torch.tensor(2.0, dtype=dtype), f"{QKV}.lora_down.weight": torch.ones(2, 4)}  # fmt: skip


def test_sd_scripts_split_qkv_files_get_the_trained_alpha():
    metadata = {"ss_network_args": json.dumps({"split_qkv": "True"})}
    fixed, marked = files.with_trained_split_alpha(alphas(), metadata)
    assert fixed[f"{QKV}.alpha"].item() == 6 and fixed[f"{LINEAR1}.alpha"].item() == 8
    assert fixed[f"{PROJ}.alpha"].item() == 2 and fixed[f"{QKV}.alpha"].dtype == torch.bfloat16
    assert torch.equal(fixed[f"{QKV}.lora_down.weight"], torch.ones(2, 4))
    assert marked == {**metadata, files.SPLIT_QKV_METADATA_KEY: files.SPLIT_QKV_CONVENTION}
    again, same = files.with_trained_split_alpha(fixed, marked)  # ours: as it is
    assert again[f"{QKV}.alpha"].item() == 6 and same is marked


@pytest.mark.parametrize("network_args", ['{"split_qkv": "False"}', "not json", '["split_qkv"]', "null", "{}"])
def test_files_without_sd_scripts_split_qkv_are_kept(network_args):
    metadata = {"ss_network_args": network_args}
    assert files.split_alpha_multiplied(metadata)
    fixed, same = files.with_trained_split_alpha(alphas(), metadata)
    assert fixed[f"{QKV}.alpha"].item() == 2 and same == metadata
    assert files.split_alpha_multiplied({})
    assert not files.split_alpha_multiplied({"ss_network_args": '{"split_qkv": true}'})  # True as a JSON boolean


def test_reading_files_checks_what_they_are(tmp_path):
    with pytest.raises(CheckpointError, match="a folder; give the LoRA file in it"):
        files.read_lora_file(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'x.pt'}: file not found")):
        files.read_lora_file(tmp_path / "x.pt")
    torch.save({"a.alpha": torch.tensor([3.0]), "b": 1}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="holds a dict, not a LoRA state dict of tensors"):
        files.read_lora_file(tmp_path / "mixed.pt")
    torch.save({"a.alpha": torch.tensor([3.0]), "a.lora_down.weight": torch.ones(1)}, tmp_path / "ok.pt")
    sd, metadata = files.read_lora_file(tmp_path / "ok.pt")
    assert sd["a.alpha"].shape == () and sd["a.lora_down.weight"].shape == (1,) and metadata == {}
    safetensors.torch.save_file({"a.alpha": torch.tensor([3.0]), "b.alpha": torch.ones(2)}, tmp_path / "s.safetensors")
    sd, _ = files.read_lora_file(tmp_path / "s.safetensors")
    assert sd["a.alpha"].shape == () and sd["b.alpha"].shape == (2,)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!")
    with pytest.raises(CheckpointError, match=r"^--network_weights .*bad.safetensors"):
        files.check_lora_file(tmp_path / "bad.safetensors", "--network_weights")
    with pytest.raises(CheckpointError, match=r"^--network_weights .*x.pt: file not found"):
        files.check_lora_file(tmp_path / "x.pt", "--network_weights")


def test_a_peft_adapters_config_joins_its_metadata(tmp_path):
    adapter = tmp_path / files.PEFT_ADAPTER_FILE
    safetensors.torch.save_file({"a": torch.ones(1)}, adapter)
    assert files.with_peft_config(adapter, {}) == {}  # no config beside it
    (tmp_path / files.PEFT_CONFIG_FILE).write_text('{"r": 4, "lora_alpha": 8}')
    assert json.loads(files.read_lora_file(adapter)[1][PEFT_METADATA_KEY]) == {"r": 4, "lora_alpha": 8}
    assert files.with_peft_config(adapter, {PEFT_METADATA_KEY: "{}"}) == {PEFT_METADATA_KEY: "{}"}
    other = tmp_path / "other.safetensors"
    assert files.with_peft_config(other, {}) == {}
    (tmp_path / files.PEFT_CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json: the peft adapter's config cannot be read"):
        files.with_peft_config(adapter, {})


def test_base_model_versions_and_the_warning_for_another_model(tmp_path, caplog):
    assert files.base_model_version("chroma") == "chroma"
    assert files.base_model_version("dev") == files.base_model_version(None) == "flux1"
    with caplog.at_level(logging.WARNING):
        for made_for in ({"ss_base_model_version": "sdxl"}, {}, {"ss_base_model_version": "flux1"}):
            files.warn_if_made_for_another_model("a.safetensors", "--network_weights", "flux1", made_for)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        files.warn_if_made_for_another_model("c.safetensors", "--lora", "flux1", {"ss_base_model_version": "chroma"})
    assert "--lora c.safetensors was trained on chroma (ss_base_model_version), and this model is flux1" in caplog.text


def test_file_keys_are_respelled_and_checked_for_any_prefix(tmp_path):
    file = tmp_path / "comfy.safetensors"
    safetensors.torch.save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.ones(1),
                                 "lora_te1_x.alpha": torch.ones(())}, file)  # fmt: skip
    keys = files.lora_file_keys([file])
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" not in keys and "lora_te1_x.alpha" in keys
    assert files.lora_files_have_modules([file], files.TEXT_ENCODER_KEYS)
    assert files.lora_files_have_modules([file], files.DIT_KEYS)
    assert not files.lora_files_have_modules([file], ("lora_te3",))


def test_written_files_carry_string_metadata_the_split_mark_defaults_and_hashes(tmp_path):
    sd = {"lora_unet_a.alpha": torch.tensor(1.0), "lora_unet_a.lora_down.weight": torch.ones(2, 3)}
    file = tmp_path / "my.lora.safetensors"
    files.write_lora_file(sd, file, {"ss_network_dim": 4, "modelspec.title": "mine"}, "dev", split=False)
    metadata = read_metadata(file)
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.title"] == "mine"
    assert files.SPLIT_QKV_METADATA_KEY not in metadata
    given = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == precalculate_safetensors_hashes(sd, given)
    files.write_lora_file(sd, file, None, "dev", split=True)
    metadata = read_metadata(file)
    assert metadata[files.SPLIT_QKV_METADATA_KEY] == files.SPLIT_QKV_CONVENTION
    assert metadata["modelspec.title"] == "my.lora"
    files.write_lora_file(sd, file, None, None, split=False)
    assert not any(k.startswith("modelspec.") for k in read_metadata(file))
    pt = tmp_path / "lora.pt"
    files.write_lora_file(sd, pt, {"ss_network_dim": "4"}, "dev", split=True)
    assert torch.equal(torch.load(pt, weights_only=True)["lora_unet_a.lora_down.weight"], torch.ones(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.pt", "my.lora.safetensors"]


def split_network(split):
    network = nn.Module()
    for name in (QKV, "lora_unet_double_blocks_0_txt_attn_qkv"):
        setattr(network, name, LoRAModule(name, nn.Linear(4, 12), lora_dim=2, split_dims=[4, 4, 4] if split else None))
    network.add_module("lora_unet_x_proj", LoRAModule("lora_unet_x_proj", nn.Linear(4, 4), lora_dim=2))
    return network


def fused_weights(rank, names=(QKV, "lora_unet_double_blocks_0_txt_attn_qkv")):
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"] = torch.zeros(rank, 4)
        sd[f"{name}.lora_up.weight"] = torch.zeros(12, rank)
    return sd


def test_misfits_are_listed_and_explained_by_split_qkv():
    with pytest.raises(UserError, match=r"remove split_qkv=True from --network_args to continue it") as e:
        files.check_weights_fit("f.safetensors", fused_weights(2), split_network(True), "HINT")
    assert str(e.value).startswith(f"f.safetensors does not fit this network: {QKV}.lora_down.weight (2, 4) "
                                   "(network (6, 4)); ")  # fmt: skip
    with pytest.raises(UserError, match=r"add split_qkv=True to --network_args to continue it"):
        files.check_weights_fit("f.safetensors", fused_weights(6), split_network(False), "HINT")
    with pytest.raises(UserError, match=r"\. HINT$"):  # neither a split nor a plain rank
        files.check_weights_fit("f.safetensors", fused_weights(3), split_network(False), "HINT")
    wide = fused_weights(6)
    wide[f"{QKV}.lora_down.weight"] = torch.zeros(6, 5)
    with pytest.raises(UserError, match=r"\. HINT$"):  # another width: another model
        files.check_weights_fit("f.safetensors", wide, split_network(False), "HINT")
    plain = {"lora_unet_x_proj.lora_down.weight": torch.zeros(8, 4)}  # 4 x its rank, yet no fused projection
    with pytest.raises(UserError, match=r"\. HINT$"):  # not a fused projection
        files.check_weights_fit("f.safetensors", plain, split_network(False), "HINT")
    files.check_weights_fit("f.safetensors", fused_weights(2), split_network(False), "HINT")


def test_misfits_beyond_three_are_counted():
    names = [f"lora_unet_m{i}" for i in range(5)]
    network = nn.Module()
    for name in names:
        network.add_module(name, LoRAModule(name, nn.Linear(4, 4), lora_dim=2))
    sd = {f"{name}.lora_down.weight": torch.zeros(3, 4) for name in names}
    with pytest.raises(UserError) as e:
        files.check_weights_fit("f", sd, network, "HINT")
    assert "lora_unet_m2.lora_down.weight (3, 4) (network (2, 4)) and 2 more. HINT" in str(e.value)
    assert "lora_unet_m0" in str(e.value) and "lora_unet_m1" in str(e.value) and "m3" not in str(e.value)
    sd = {f"{name}.lora_down.weight": torch.zeros(3, 4) for name in names[:4]}
    with pytest.raises(UserError, match=r"\(network \(2, 4\)\) and 1 more\. HINT$"):
        files.check_weights_fit("f", sd, network, "HINT")
    sd = {f"{name}.lora_down.weight": torch.zeros(3, 4) for name in names[:3]}
    with pytest.raises(UserError, match=r"\(network \(2, 4\)\)\. HINT$"):
        files.check_weights_fit("f", sd, network, "HINT")


def test_nothing_fits_messages():
    dit, te = ["lora_unet_a.alpha", "lora_unet_b.alpha"], ["lora_te1_a.alpha"]
    assert "holds DiT modules only" in files.nothing_fits_message("f", dit, False, True)
    assert "none of its weights belongs to this network (e.g. lora_unet_a.alpha)" in files.nothing_fits_message(
        "f", dit, True, True)  # fmt: skip
    assert "holds text-encoder modules only" in files.nothing_fits_message("f", te, True, False)
    assert "none of its weights" in files.nothing_fits_message("f", te, True, True)
    assert "none of its weights" in files.nothing_fits_message("f", dit + te, False, False)
