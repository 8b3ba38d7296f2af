"""The LoRA network against sd-scripts' math, and the checks that stop (or explain) what cannot work:
GGPO at multiplier 0, one-element alphas, split_qkv on one side only, LoRA+ ratios per part, files for a
part not trained in the run, in_dims entries and conv args."""

import logging

import pytest
import safetensors.torch
import torch

from library.errors import UserError
from library.tiny_models import random_model, tiny_flux_params
from networks.lora_flux import create_network, create_network_from_weights, read_lora_file, validate_network_args
from networks.lora_modules import LoRAModule
from tests.test_lora_names import tiny_clip


@pytest.fixture(scope="module")
def flux():
    model = random_model(tiny_flux_params(depth=2, depth_single=2))
    model.requires_grad_(False)
    return model


def build(model, text_encoders=(None, None), dim=4, alpha=1, **kwargs):
    return create_network(1.0, dim, alpha, None, list(text_encoders), model, **kwargs)


def unapply(network):
    for lora in reversed(network.all_loras()):
        lora.org_module.forward = lora.org_forward


def applied_output(network, flux, linear, x):
    """``linear(x)`` with ``network`` applied to ``flux``, which is left as it was."""
    network.apply_to([None, None], flux)
    try:
        with torch.no_grad():
            return linear(x)
    finally:
        unapply(network)


def randomize(network, std=0.1):
    torch.manual_seed(1)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(std=std)
    return network


# ---- forward and gradients against sd-scripts' LoRAModule math ------------------------------------


def reference_output(x, weight, bias, pairs, alpha, rank, multiplier):
    """sd-scripts' LoRAModule, written as its formula: org(x) + multiplier * (alpha / rank) * up(down(x)), the
    ups of a split module (one (down, up) per q/k/v chunk) concatenated along the output."""
    update = torch.cat([(x @ down.T) @ up.T for down, up in pairs], dim=-1)
    return x @ weight.T + bias + multiplier * (alpha / rank) * update


@pytest.mark.parametrize("split_qkv", ["False", "True"])
def test_every_dit_module_matches_sd_scripts_forward_and_gradients(flux, split_qkv):
    network = randomize(build(flux, dim=4, alpha=2, split_qkv=split_qkv, in_dims="[4,4,4,4,4]"))
    network.apply_to([None, None], flux)
    network.set_multiplier(0.7)
    network.train()
    names = {lora.lora_name for lora in network.unet_loras}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_img_in", "lora_unet_time_in_in_layer"} <= names
    fused = [lora for lora in network.unet_loras if lora.split_dims]
    assert len(fused) == (0 if split_qkv == "False" else 6)  # 2 x img/txt qkv, 2 x linear1
    try:
        torch.manual_seed(2)
        for lora in network.unet_loras:
            linear = lora.org_module
            x = torch.randn(2, 3, linear.in_features, requires_grad=True)
            grad_out = torch.randn(2, 3, linear.out_features)
            ours = linear(x)
            (ours * grad_out).sum().backward()

            x_ref = x.detach().clone().requires_grad_(True)
            pairs = [(d.weight.detach().clone().requires_grad_(True), u.weight.detach().clone().requires_grad_(True))
                     for d, u in lora.pairs()]  # fmt: skip
            weight, bias = linear.weight.detach(), linear.bias.detach()
            ref = reference_output(x_ref, weight, bias, pairs, alpha=2.0, rank=4, multiplier=0.7)
            (ref * grad_out).sum().backward()

            close = dict(rtol=1e-5, atol=1e-5, msg=lambda m, name=lora.lora_name: f"{name}: {m}")
            torch.testing.assert_close(ours, ref, **close)
            torch.testing.assert_close(x.grad, x_ref.grad, **close)
            for (down, up), (ref_down, ref_up) in zip(lora.pairs(), pairs, strict=True):
                torch.testing.assert_close(down.weight.grad, ref_down.grad, **close)
                torch.testing.assert_close(up.weight.grad, ref_up.grad, **close)
            with torch.no_grad():  # the path without autograd
                torch.testing.assert_close(linear(x), ref, **close)
    finally:
        unapply(network)


# ---- GGPO at multiplier 0 ---------------------------------------------------------------------------


def test_ggpo_leaves_the_base_output_exact_at_multiplier_0_and_perturbs_it_at_1():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    lora = LoRAModule("x", linear, 1.0, 4, 1.0, ggpo_sigma=0.03, ggpo_beta=0.01)
    lora.apply_to()
    lora.train()
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    x = torch.randn(2, 5, 16)
    (linear(x.requires_grad_()) ** 2).sum().backward()  # GGPO needs gradients to set its norms
    lora.update_norms()
    lora.update_grad_norms()
    assert lora.grad_norms is not None and lora.combined_weight_norms is not None
    with torch.no_grad():
        base = torch.nn.functional.linear(x, linear.weight, linear.bias)
        update = (x @ lora.lora_down.weight.T) @ lora.lora_up.weight.T * 0.25  # alpha 1 / rank 4

        lora.multiplier = 0.0  # differential output preservation's base-model pass: no perturbation here
        assert torch.equal(linear(x), base)

        lora.multiplier = 1.0
        perturbed = linear(x)
        lora.eval()
        plain = linear(x)
    torch.testing.assert_close(plain, base + update)
    assert (perturbed - plain).abs().max().item() > 1e-3  # the perturbation is there, in training only


@pytest.mark.parametrize("scaled", [False, True])
def test_ggpo_measures_the_rows_of_an_fp8_weight_as_dequantized(scaled):
    """A scaled-fp8 weight stores W / scale (rows of size ~448): GGPO's norm estimate is W's, the same as for
    the weight widened to fp32, and so is the perturbation it scales."""
    from library.fp8 import dequantize_weight, make_fp8_linear

    torch.manual_seed(0)
    stored = make_fp8_linear(torch.nn.Linear(64, 40), scaled=scaled)
    widened = torch.nn.Linear(64, 40)
    widened.weight.data = dequantize_weight(stored.weight, stored._buffers.get("weight_scale"), torch.float32)
    estimates = []
    for linear in (stored, widened):
        torch.manual_seed(1)  # the same rows sampled
        estimates.append(LoRAModule("x", linear, 1.0, 4, 1.0, ggpo_sigma=0.03, ggpo_beta=0.01).org_weight_norm_estimate)
    true_norm = widened.weight.norm(dim=1).mean().item()  # 40 rows: the estimate reads them all
    assert estimates[0] == pytest.approx(true_norm, rel=1e-6)
    assert estimates[1] == pytest.approx(true_norm, rel=1e-6)


# ---- one-element alphas ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_alphas_saved_with_shape_1_load_as_the_0_dim_alpha(flux, tmp_path, suffix):
    trained = randomize(build(flux, dim=4, alpha=2))
    scalar, shaped = tmp_path / f"scalar{suffix}", tmp_path / f"shaped{suffix}"
    trained.save_weights(scalar, None, {})
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    state = {k: v.reshape(1) if k.endswith(".alpha") else v for k, v in state.items()}
    assert state["lora_unet_double_blocks_0_img_attn_qkv.alpha"].shape == (1,)
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, shaped)
    else:
        torch.save(state, shaped)

    read, _ = read_lora_file(shaped)
    assert read["lora_unet_double_blocks_0_img_attn_qkv.alpha"].shape == ()
    assert read["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 2.0

    from_shaped, _ = create_network_from_weights(1.0, shaped, None, [None, None], flux)
    from_scalar, _ = create_network_from_weights(1.0, scalar, None, [None, None], flux)
    assert {(lora.lora_name, float(lora.alpha), lora.scale) for lora in from_shaped.all_loras()} == {
        (lora.lora_name, float(lora.alpha), lora.scale) for lora in from_scalar.all_loras()
    }
    assert {lora.scale for lora in from_shaped.all_loras()} == {0.5}

    loaded = build(flux, dim=4, alpha=1)  # --network_weights into a network made from the flags
    loaded.load_weights(shaped)
    qkv = loaded.lora_unet_double_blocks_0_img_attn_qkv
    assert (qkv.alpha.shape, float(qkv.alpha), qkv.scale) == ((), 2.0, 0.5)
    reference = build(flux, dim=4, alpha=1)
    reference.load_weights(scalar)
    x = torch.randn(2, 3, qkv.org_module.in_features)
    out_shaped, out_scalar = (applied_output(network, flux, qkv.org_module, x) for network in (loaded, reference))
    assert torch.equal(out_shaped, out_scalar)


# ---- split_qkv on one side only ----------------------------------------------------------------------


def test_a_plain_file_for_a_split_qkv_network_and_the_reverse_say_split_qkv_is_the_cause(flux, tmp_path):
    plain, split = build(flux, dim=4), build(flux, dim=4, split_qkv="True")
    plain.save_weights(tmp_path / "plain.safetensors", None, {})
    randomize(split).save_weights(tmp_path / "split.safetensors", None, {})

    with pytest.raises(UserError) as error:
        split.load_weights(tmp_path / "plain.safetensors")
    message = str(error.value)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight (4, 64) (network (12, 64))" in message
    assert message.endswith(". The file was not trained with split_qkv (its fused projections hold one LoRA, not one "
                            "per q/k/v part): remove split_qkv=True from --network_args to continue it")
    assert "--dim_from_weights" not in message

    with pytest.raises(UserError) as error:
        plain.load_weights(tmp_path / "split.safetensors")
    assert str(error.value).endswith(". The file was trained with split_qkv=True (its fused projections hold one LoRA "
                                     "per part): add split_qkv=True to --network_args to continue it")


def test_a_file_of_another_rank_still_points_to_the_rank_flags(flux, tmp_path):
    build(flux, dim=8).save_weights(tmp_path / "r8.safetensors", None, {})
    with pytest.raises(UserError) as error:
        build(flux, dim=4, split_qkv="True").load_weights(tmp_path / "r8.safetensors")
    hint = "Give the file's rank as --network_dim / network_args, or add --dim_from_weights"
    assert str(error.value).endswith(f". {hint}")


# ---- LoRA+ ratios that end at 0 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(layers=2)


def test_loraplus_checks_only_the_parts_that_have_modules(flux, clip):
    dit_only = build(flux, loraplus_unet_lr_ratio="16", loraplus_lr_ratio="0")  # no text-encoder module
    params, descriptions = dit_only.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)
    assert descriptions == ["unet", "unet plus"]
    assert [g["lr"] for g in params] == pytest.approx([1e-3, 1.6e-2])

    unet_only_run = build(flux, (clip, None), loraplus_unet_lr_ratio="16", loraplus_lr_ratio="0")
    unet_only_run.apply_to([clip, None], flux, apply_text_encoder=False, apply_unet=True)  # --network_train_unet_only
    try:
        assert unet_only_run.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)[1] == ["unet", "unet plus"]
    finally:
        unapply(unet_only_run)

    with_encoder = build(flux, (clip, None), loraplus_unet_lr_ratio="16", loraplus_lr_ratio="0")
    with pytest.raises(UserError) as error:
        with_encoder.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)
    assert str(error.value) == (
        "--network_args loraplus_lr_ratio=0 gives the text encoders' lora_up learning rate 0, so the LoRA would "
        "not change: leave it out for no LoRA+, or give a ratio above 0 (e.g. 16)"
    )


def test_a_loraplus_ratio_that_ends_at_0_everywhere_stops_before_the_model_loads(flux):
    expected = ("--network_args loraplus_lr_ratio=0 gives the DiT's and the text encoders' lora_up learning rate 0, "
                "so the LoRA would not change: leave it out for no LoRA+, or give a ratio above 0 (e.g. 16)")
    with pytest.raises(UserError) as error:
        validate_network_args(loraplus_lr_ratio="0")
    assert str(error.value) == expected
    with pytest.raises(UserError) as error:
        validate_network_args(loraplus_lr_ratio="0", loraplus_unet_lr_ratio="0")
    assert str(error.value) == expected
    validate_network_args(loraplus_lr_ratio="0", loraplus_text_encoder_lr_ratio="4")  # decided once parts are known
    dit_only = build(flux, loraplus_lr_ratio="0", loraplus_text_encoder_lr_ratio="4")
    with pytest.raises(UserError, match="^--network_args loraplus_lr_ratio=0 gives the DiT's lora_up learning rate 0"):
        dit_only.prepare_optimizer_params_with_multiple_te_lrs(1e-4, 1e-3, 1e-3)


# ---- a file for a part this run does not train ----------------------------------------------------


def test_a_dit_file_in_a_text_encoder_only_run_is_refused_for_that_reason(flux, clip, tmp_path):
    file = tmp_path / "dit_only.safetensors"
    build(flux).save_weights(file, None, {})
    network = build(flux, (clip, None))
    network.apply_to([clip, None], flux, apply_text_encoder=True, apply_unet=False)  # --network_train_text_encoder_only
    try:
        with pytest.raises(UserError) as error:
            network.load_weights(file)
    finally:
        unapply(network)
    assert str(error.value) == (
        f"{file} holds DiT modules only (lora_unet_*), and this network has none: the DiT is not trained in this "
        "run (--network_train_text_encoder_only); train the DiT too, or leave out the file"
    )


def test_a_text_encoder_file_in_a_dit_only_network_is_refused_for_that_reason(flux, clip, tmp_path):
    file = tmp_path / "te.safetensors"
    te_only = build(flux, (clip, None))
    te_only.apply_to([clip, None], flux, apply_text_encoder=True, apply_unet=False)
    try:
        te_only.save_weights(file, None, {})
    finally:
        unapply(te_only)
    with pytest.raises(UserError) as error:
        build(flux).load_weights(file)
    assert str(error.value).startswith(f"{file} holds text-encoder modules only (lora_te*), and this network has none")


def test_a_file_for_another_model_keeps_the_general_message(flux, tmp_path):
    file = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 8)}, file)
    with pytest.raises(UserError) as error:
        build(flux).load_weights(file)
    assert str(error.value) == (
        f"{file}: none of its weights belongs to this network (e.g. lora_unet_nothing_here.lora_down.weight); "
        "give a FLUX/Chroma LoRA in sd-scripts' format trained on this model"
    )


# ---- in_dims entries ----------------------------------------------------------------------------------

IN_DIMS_EXPECTED = ("expected 5 ranks (img_in, time_in, vector_in, guidance_in, txt_in), e.g. in_dims=[4,2,2,2,4] "
                    "(0 disables a layer)")  # fmt: skip


@pytest.mark.parametrize(
    "value, message",
    [
        ("4,,2,2,4", f"--network_args in_dims=4,,2,2,4: entry 2 (time_in) is empty; {IN_DIMS_EXPECTED}"),
        ("[4,2,2,2,]", f"--network_args in_dims=[4,2,2,2,]: entry 5 (txt_in) is empty; {IN_DIMS_EXPECTED}"),
        ("4,2,x,2,4", f"--network_args in_dims=4,2,x,2,4: entry 3 (vector_in) 'x' is not a whole number; "
                      f"{IN_DIMS_EXPECTED}"),
        ("4,2,2,None,4", f"--network_args in_dims=4,2,2,None,4: entry 4 (guidance_in) 'None' is not a whole number; "
                         f"{IN_DIMS_EXPECTED}"),
        ("-1,2,2,2,4", "--network_args in_dims=-1,2,2,2,4: entry 1 (img_in) -1 is negative: a rank is 0 (no LoRA on "
                       "that layer) or more"),
    ],
)  # fmt: skip
def test_a_bad_in_dims_entry_is_named_by_its_position_quoting_the_whole_value(value, message):
    with pytest.raises(UserError) as error:
        validate_network_args(in_dims=value)
    assert str(error.value) == message


def test_in_dims_with_spaces_and_brackets_still_parse(flux):
    network = build(flux, in_dims="[ 4, 0 ,2,2, 3 ]")
    ranks = {lora.lora_name: lora.lora_dim for lora in network.all_loras()}
    assert ranks["lora_unet_img_in"] == 4 and ranks["lora_unet_txt_in"] == 3
    assert ranks["lora_unet_vector_in_in_layer"] == 2 and "lora_unet_time_in_in_layer" not in ranks


# ---- conv_dim / conv_alpha ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ({"conv_dim": "x"}, "--network_args conv_dim=x: expected a whole number (a rank; 0 disables)"),
        ({"conv_dim": "4", "conv_alpha": "1,5"}, "--network_args conv_alpha=1,5: expected a number"),
        ({"conv_alpha": "one"}, "--network_args conv_alpha=one: expected a number"),
    ],
)
def test_conv_args_that_are_not_numbers_stop_before_the_model_loads(args, message):
    with pytest.raises(UserError) as error:
        validate_network_args(**args)
    assert str(error.value) == message


def test_valid_conv_args_still_warn_that_they_do_nothing(flux, caplog):
    validate_network_args(conv_dim="4", conv_alpha="1.5")
    with caplog.at_level(logging.WARNING, logger="networks.lora_flux_args"):
        network = build(flux, conv_dim="4", conv_alpha="1.5")
    assert "network args conv_dim / conv_alpha have no effect: FLUX and Chroma have no convolutions" in caplog.text
    assert {lora.lora_dim for lora in network.all_loras()} == {4}
