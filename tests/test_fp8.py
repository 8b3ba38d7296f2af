"""fp8 storage of the DiT (--fp8_base, --fp8_base_unet, --fp8_scaled): what is stored in fp8,
what stays in the compute dtype, the error of scaled vs plain fp8, memory, fp8 files and the checks."""

import copy

import pytest
import safetensors.torch
import torch
from torch import nn

import flux_train_network
from library.chroma_models import Chroma
from library.flux_utils import load_flow_model
from library.fp8 import (
    FP8,
    block_linears,
    dit_load_dtype,
    fp8_weight_bytes,
    make_fp8_linear,
    quantize_dit_,
    quantize_weight,
    row_scales,
)
from library.lora_formats import to_ai_toolkit
from library.safetensors_io import save_safetensors
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks import lora_flux
from tests.test_flux_models import dit_inputs
from tests.training_helpers import base_argv, dataset

GUIDANCE = torch.tensor([3.5, 3.5])


def flux_like_model(std: float = 0.01) -> nn.Module:
    """A tiny DiT whose matrices have FLUX-like magnitudes (mostly below e4m3's normal range, 2^-6)."""
    model = random_model(tiny_flux_params(), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(std / p.std())
    return model


def relative_error(model: nn.Module, reference: torch.Tensor, x: dict) -> float:
    with torch.no_grad():
        return ((model(**x, guidance=GUIDANCE) - reference).norm() / reference.norm()).item()


def test_scaled_fp8_output_error_is_smaller_than_plain_fp8_on_the_same_weights():
    model = flux_like_model()
    x = dit_inputs(model.params)
    with torch.no_grad():
        reference = model(**x, guidance=GUIDANCE)
    plain = relative_error(quantize_dit_(copy.deepcopy(model), torch.float32, scaled=False), reference, x)
    scaled = relative_error(quantize_dit_(copy.deepcopy(model), torch.float32, scaled=True), reference, x)
    assert 0 < scaled < 0.75 * plain


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_block_linear_weights_take_a_quarter_of_their_fp32_bytes(scaled):
    model = quantize_dit_(flux_like_model(), torch.bfloat16, scaled=scaled)
    now, fp32 = fp8_weight_bytes(model)
    assert now * 4 == fp32
    linears = [m for _, m in block_linears(model)]
    assert linears and all(m.weight.dtype == FP8 and m.weight.element_size() == 1 for m in linears)
    scale_bytes = sum(m.weight_scale.numel() * 4 for m in linears if hasattr(m, "weight_scale"))
    assert (scale_bytes > 0) == scaled
    if scaled:  # one fp32 per output row: 4 / in_features of the weights (0.03% at FLUX's width)
        assert scale_bytes == sum(4 * m.out_features for m in linears)


def test_sensitive_tensors_stay_in_the_compute_dtype():
    model = quantize_dit_(flux_like_model(), torch.bfloat16)
    fp8_names = {f"{name}.weight" for name, _ in block_linears(model)}
    for name, p in model.named_parameters():
        assert p.dtype == (FP8 if name in fp8_names else torch.bfloat16), name
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.bfloat16
    assert model.double_blocks[0].img_attn.qkv.bias.dtype == torch.bfloat16
    for kept in (model.img_in, model.txt_in, model.time_in.in_layer, model.final_layer.linear):
        assert kept.weight.dtype == torch.bfloat16
    chroma = quantize_dit_(random_model(tiny_chroma_params(), seed=2), torch.bfloat16, scaled=True)
    assert isinstance(chroma, Chroma)
    assert all(p.dtype == torch.bfloat16 for p in chroma.distilled_guidance_layer.parameters())
    assert chroma.single_blocks[0].linear1.weight.dtype == FP8


def test_fp8_linears_stay_plain_linears_that_lora_finds():
    plain_model = flux_like_model()
    fp8_model = quantize_dit_(copy.deepcopy(plain_model), torch.bfloat16, scaled=True)
    for _, module in block_linears(fp8_model):
        assert type(module) is nn.Linear
    assert type(fp8_model.double_blocks[0]).__name__ == "DoubleStreamBlock"
    def lora_names(model):
        return [lora.lora_name for lora in lora_flux.create_network(1.0, 4, 4, None, [None, None], model).unet_loras]

    assert lora_names(plain_model) and lora_names(plain_model) == lora_names(fp8_model)
    assert set(fp8_model.state_dict()) - set(plain_model.state_dict()) == {
        f"{name}.weight_scale" for name, _ in block_linears(fp8_model)
    }


def test_fp8_linear_computes_with_the_dequantized_weight_and_saves_only_fp8_for_backward():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.mul_(0.05)
    x = torch.randn(3, 5, 32, requires_grad=True)
    fp8 = make_fp8_linear(copy.deepcopy(linear), scaled=True)
    dequantized = fp8.weight.float() * fp8.weight_scale[:, None]
    assert torch.equal(row_scales(dequantized), fp8.weight_scale)  # powers of two: requantizing is lossless
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fp8(x)
    out.square().sum().backward()
    expected = torch.nn.functional.linear(x, dequantized, linear.bias)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    x_grad = x.grad.clone()
    x.grad = None
    expected.square().sum().backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-5, atol=1e-6)
    # no dequantized copy: weight-shaped tensors are fp8, or stand-ins of one element (tests/test_fp8_recompute.py)
    copies = [t for t in saved if t.shape == linear.weight.shape and t.dtype != FP8]
    assert all(t.untyped_storage().nbytes() == t.element_size() for t in copies)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the mixed-precision path: computed in bf16
        y = fp8(x[:1, :2])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()


def test_fp8_weights_cannot_be_trained():
    fp8 = make_fp8_linear(nn.Linear(8, 8))
    fp8.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen base"):
        fp8(torch.randn(2, 8))


def test_fp8_checkpoint_is_loaded_without_a_round_trip(tmp_path):
    model = flux_like_model()
    sd = {k: (v.to(FP8) if ("blocks." in k and k.endswith(".weight") and v.ndim == 2) else v.to(torch.bfloat16))
          for k, v in model.state_dict().items()}  # fmt: skip
    path = str(tmp_path / "flux-fp8.safetensors")
    save_safetensors(sd, path)
    assert dit_load_dtype(path, torch.bfloat16) is None
    for scaled in (False, True):
        _, loaded = load_flow_model(path, dit_load_dtype(path, torch.bfloat16), "cpu")
        quantize_dit_(loaded, torch.bfloat16, scaled=scaled)
        for name, linear in block_linears(loaded):
            stored = sd[f"{name}.weight"]
            if scaled:  # new power-of-two scales: the same values, exactly
                values = linear.weight.float() * linear.weight_scale[:, None]
                assert torch.equal(values, stored.float()), name
            else:
                assert torch.equal(linear.weight.view(torch.uint8), stored.view(torch.uint8)), name
    bf16_path = str(tmp_path / "flux-bf16.safetensors")
    save_safetensors({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, bf16_path)
    assert dit_load_dtype(bf16_path, torch.bfloat16) == torch.bfloat16


def test_fp8_scaled_flag_dest_and_default():
    parser = flux_train_network.setup_parser()
    assert parser.get_default("fp8_scaled") is False
    args = parser.parse_args(["--fp8_base", "--fp8_scaled"])
    assert args.fp8_scaled is True and args.fp8_base is True


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"fp8_base": True}, "--fp8_base stores weights in fp8 and computes in the mixed-precision dtype: add "
                             "--mixed_precision bf16"),
        ({"fp8_base_unet": True, "mixed_precision": "no"}, "--fp8_base_unet stores weights in fp8"),
        ({"fp8_scaled": True, "mixed_precision": "bf16"}, "use it with --fp8_base or --fp8_base_unet"),
        ({"fp8_base": True, "mixed_precision": "fp16"}, "--fp8_base computes in the mixed precision, and on a CPU "
                                                        "--mixed_precision fp16 computes in fp32: use bf16"),
    ],
    ids=["no-mixed-precision", "unet-fp32", "scaled-alone", "fp16-on-cpu"],
)  # fmt: skip
def test_fp8_option_errors_are_clear(tiny_model_files, tmp_path, capsys, flags, message):
    argv = base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), **flags)
    assert flux_train_network.main(argv) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["fp8_base", "fp8_base_unet"])
def test_fp8_base_also_stores_the_text_encoders_in_fp8_and_fp8_base_unet_does_not(tiny_model_files, tmp_path, flag):
    from types import SimpleNamespace

    parser = flux_train_network.setup_parser()
    args = parser.parse_args(base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"),
                                       mixed_precision="bf16", **{flag: True}))  # fmt: skip
    trainer = flux_train_network.FluxNetworkTrainer(parser)
    trainer.check_args(args)
    models = trainer.load_target_model(args, SimpleNamespace(device=torch.device("cpu")), torch.bfloat16)
    assert models.dit.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    assert models.dit.img_in.weight.dtype == torch.bfloat16
    clip_l, t5 = models.text_encoders
    te_weights = {clip_l.encoder.layers[0].mlp.fc1.weight.dtype,
                  t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype}  # fmt: skip
    assert te_weights == ({FP8} if flag == "fp8_base" else {torch.bfloat16})
    assert t5.shared.weight.dtype == torch.bfloat16 and models.ae.dtype == torch.bfloat16


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "fp8_scaled"])
def test_loading_straight_to_fp8_equals_loading_then_quantizing(tmp_path, scaled):
    """--fp8_base (and --fp8_scaled) store block Linear weights as they are read: the same model as
    load + quantize_dit_, bit for bit."""
    from library.flux_utils import load_flow_model
    from library.fp8 import FP8, quantize_dit_
    from library.safetensors_io import save_safetensors
    from library.tiny_models import random_model, tiny_flux_params

    source = random_model(tiny_flux_params(), seed=3)
    prefixed = {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    save_safetensors(prefixed, tmp_path / "dev.safetensors")
    path = str(tmp_path / "dev.safetensors")
    _, direct = load_flow_model(path, torch.bfloat16, "cpu", fp8_block_linears=True, fp8_scaled=scaled)
    qkv = direct.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == FP8 and (getattr(qkv, "weight_scale", None) is not None) == scaled
    assert direct.img_in.weight.dtype == torch.bfloat16 and direct.final_layer.linear.weight.dtype == torch.bfloat16
    quantize_dit_(direct, torch.bfloat16, scaled=scaled)
    _, reference = load_flow_model(path, torch.bfloat16, "cpu")
    quantize_dit_(reference, torch.bfloat16, scaled=scaled)
    a, b = direct.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key].float(), b[key].float()), key


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "fp8_scaled"])
def test_fp8_loads_of_a_diffusers_file_and_a_comfy_scaled_file_equal_the_bfl_files(tiny_model_files, tmp_path,
                                                                                   scaled):  # fmt: skip
    """All three layouts are read block by block into the same fp8 model (ComfyUI's scales applied first)."""
    from library.flux_key_mapping import bfl_to_diffusers
    from library.safetensors_io import load_safetensors

    weights = {k: v.to(torch.bfloat16) for k, v in load_safetensors(tiny_model_files.flux_dev).items()}
    save_safetensors(weights, tmp_path / "bfl.safetensors")
    save_safetensors(bfl_to_diffusers(weights), tmp_path / "diffusers.safetensors")
    _, model = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    comfy = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for name, _ in block_linears(model):
        weight = weights.pop(f"{name}.weight").float()
        scale = weight.abs().max() / 448
        comfy[f"{name}.weight"], comfy[f"{name}.scale_weight"] = (weight / scale).to(FP8), scale
        weights[f"{name}.weight"] = (comfy[f"{name}.weight"].float() * scale).to(torch.bfloat16)
    save_safetensors(weights, tmp_path / "bfl_of_comfy.safetensors")  # the weights the ComfyUI file holds
    save_safetensors({**weights, **comfy}, tmp_path / "comfy.safetensors")

    def load(name):
        _, dit = load_flow_model(str(tmp_path / name), torch.bfloat16, "cpu", fp8_block_linears=True,
                                 fp8_scaled=scaled)  # fmt: skip
        return dit.state_dict()

    for file, reference in (("diffusers", "bfl"), ("comfy", "bfl_of_comfy")):
        got, expected = load(f"{file}.safetensors"), load(f"{reference}.safetensors")
        assert got.keys() == expected.keys()
        assert got["double_blocks.0.img_attn.qkv.weight"].dtype == FP8
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key].float(), value.float()), (file, key)


@pytest.mark.parametrize("scaled, ext", [(False, ".safetensors"), (True, ".safetensors"), (False, ".pt"),
                                         (False, "_ai_toolkit.safetensors")],
                         ids=["fp8", "fp8_scaled", "pt_file", "ai_toolkit"])  # (a .pt file was not looked into,
# nor a file of diffusers' names: they merged into fp8)
def test_base_weights_merge_into_the_wide_weights_before_they_are_stored_in_fp8(tiny_model_files, tmp_path, scaled,
                                                                                 ext):  # fmt: skip
    """Q(W + dW), not Q(Q(W) + dW): a change of a few percent of a weight is mostly rounded away by the latter."""
    from types import SimpleNamespace

    from library.fp8 import store_linears_in_fp8
    from library.text_encoders import load_clip_l
    from tests.test_lora_math import randomize_lora

    clip = load_clip_l(tiny_model_files.clip_l, torch.float32, "cpu")
    _, dit = load_flow_model(tiny_model_files.flux_dev, torch.float32, "cpu")
    network = lora_flux.create_network(1.0, 4, 4, None, [clip, None], dit)
    randomize_lora(network, std=0.05)
    base = str(tmp_path / f"base{ext}")
    if ext == ".pt":
        torch.save(network.state_dict(), base)
    elif "ai_toolkit" in ext:
        save_safetensors(to_ai_toolkit(network.state_dict()).state_dict, base)
    else:
        save_safetensors(network.state_dict(), base)

    parser = flux_train_network.setup_parser()
    flags = dict(mixed_precision="bf16", fp8_base=True, fp8_scaled=scaled, base_weights=[base])
    args = parser.parse_args(base_argv(tiny_model_files, dataset(tmp_path), str(tmp_path / "out"), **flags))
    trainer = flux_train_network.FluxNetworkTrainer(parser)
    trainer.check_args(args)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    models = trainer.load_target_model(args, accelerator, torch.bfloat16)
    ctx = flux_train_network.train_network.RunContext(args, accelerator, torch.bfloat16, models)
    trainer.merge_base_weights(ctx, lora_flux)

    def merged_then_fp8(dit, clip):
        merging, weights = lora_flux.create_network_from_weights(1.0, base, None, [clip, None], dit, for_inference=True)
        merging.merge_to([clip, None], dit, weights)
        return quantize_dit_(dit, torch.bfloat16, scaled=scaled), store_linears_in_fp8(clip)

    _, wide_dit = load_flow_model(tiny_model_files.flux_dev, torch.bfloat16, "cpu")
    wide_clip = load_clip_l(tiny_model_files.clip_l, torch.bfloat16, "cpu")
    expected_dit, expected_clip = merged_then_fp8(wide_dit, wide_clip)
    for got, expected in ((models.dit, expected_dit), (models.text_encoders[0], expected_clip)):
        got, expected = got.state_dict(), expected.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert models.dit.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    assert models.text_encoders[0].encoder.layers[0].mlp.fc1.weight.dtype == FP8


def test_merge_to_into_a_row_scaled_fp8_weight_adds_the_change_in_real_units():
    """--fp8_scaled stores W / scale: a LoRA merged into it is added to W, and the rows get new scales."""
    from networks.lora_modules import LoRAModule

    torch.manual_seed(0)
    linear = make_fp8_linear(nn.Linear(16, 8, bias=False), scaled=True)
    wide = linear.weight.float() * linear.weight_scale[:, None]  # the weight the layer computes with
    lora = LoRAModule("lora_unet_x", linear, multiplier=1.0, lora_dim=2, alpha=2)
    down, up = torch.randn(2, 16) * 0.1, torch.randn(8, 2) * 0.1
    lora.merge_to({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0)})
    expected = wide + up @ down
    assert linear.weight.dtype == FP8 and torch.equal(linear.weight_scale, row_scales(expected))
    assert torch.equal(linear.weight, quantize_weight(expected, scaled=True)[0])  # Q(W + dW), to the bit
    merged = linear.weight.float() * linear.weight_scale[:, None]
    assert (merged - wide).norm() > 0.9 * (up @ down).norm()


def test_only_a_plain_e4m3_t5_file_counts_as_one_that_can_stay_fp8(tmp_path):
    """A scaled file would be dequantized and rounded to fp8 again (other outputs), a file with some wide
    Linears would have those narrowed: both load wide, as before."""
    from library.fp8 import t5_file_is_plain_fp8
    from library.tiny_text_encoders import write_tiny_t5

    files = {kind: str(tmp_path / f"{kind}.safetensors") for kind in ("plain", "full", "scaled", "mixed")}
    plain = write_tiny_t5(files["plain"], fp8="plain")
    write_tiny_t5(files["full"])
    write_tiny_t5(files["scaled"], fp8="scaled")
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    save_safetensors({**plain, q: plain[q].to(torch.bfloat16)}, files["mixed"])
    assert [t5_file_is_plain_fp8(files[kind]) for kind in files] == [True, False, False, False]


def test_a_file_without_t5_linear_weights_is_not_a_plain_fp8_t5(tmp_path):
    from library.fp8 import t5_file_is_plain_fp8

    path = str(tmp_path / "not_t5.safetensors")
    safetensors.torch.save_file({"shared.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, path)
    assert t5_file_is_plain_fp8(path) is False
