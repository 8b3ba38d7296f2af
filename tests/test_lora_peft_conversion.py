"""library.lora_formats conversions checked against diffusers' FluxTransformer2DModel with peft adapters.

Each test makes a LoRA with peft on the diffusers model (or an sd-scripts LoRA for the reverse
direction), converts it with library.lora_formats and compares with what peft itself computes:
the model output (the sd-scripts file applied to our BFL model) and each module's weight change
(peft's get_delta_weight, mapped to BFL's layout by flux_key_mapping.diffusers_to_bfl).
"""

import json

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from library.flux_key_mapping import bfl_to_diffusers, diffusers_to_bfl
from library.lora_formats import PEFT_METADATA_KEY, to_ai_toolkit, to_sd_scripts
from library.tiny_models import random_model, tiny_flux_params
from networks.lora_flux import create_network_from_weights
from tests.test_lora_math import dit_inputs
from tests.test_merge_lora import deltas, diffusers_flux, run_diffusers


def twins(mlp_ratio: float = 4.0, seed: int = 11):
    """Our tiny BFL model and a diffusers model with the same weights (one double, one single block);
    diffusers' model class hard-codes an MLP of 4 x hidden, so other ratios get their MLPs replaced."""
    params = tiny_flux_params(depth=1, depth_single=1, mlp_ratio=mlp_ratio)
    ours = random_model(params, seed=seed)
    reference = diffusers_flux(params, 1, 1)
    if mlp_ratio != 4.0:
        dim = params.hidden_size
        for block in reference.transformer_blocks:
            block.ff = FeedForward(dim=dim, dim_out=dim, mult=mlp_ratio, activation_fn="gelu-approximate")
            block.ff_context = FeedForward(dim=dim, dim_out=dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        reference.single_transformer_blocks = torch.nn.ModuleList(
            FluxSingleTransformerBlock(dim, params.num_heads, params.head_dim, mlp_ratio=mlp_ratio) for _ in range(1)
        )
    reference.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)
    x = dit_inputs(params, batch=1)
    x.pop("txt_attention_mask")
    return ours, reference.eval(), x


def add_peft_lora(reference, config: LoraConfig, seed: int = 5, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Adds a peft adapter with random non-zero A and B; returns the file diffusers' FluxPipeline writes
    (``transformer.`` keys) and its ``lora_adapter_metadata``."""
    reference.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    sd = {f"transformer.{k}": v.clone() for k, v in get_peft_model_state_dict(reference).items()}
    meta = {f"transformer.{k}": (list(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    return sd, {PEFT_METADATA_KEY: json.dumps(meta, default=str)}


def peft_deltas_in_bfl_layout(reference) -> dict[str, torch.Tensor]:
    """peft's own weight change of every adapted Linear, as sd-scripts module name -> BFL-layout delta
    (fused q, k, v (+ MLP) rows concatenated, the final modulation's halves in BFL's order)."""
    full = {k: torch.zeros_like(v) for k, v in reference.state_dict().items() if ".lora_" not in k}
    full = {k.replace(".base_layer.", "."): v for k, v in full.items()}
    for name, module in reference.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            full[f"{name}.weight"] = module.get_delta_weight("default").detach().double()
    return {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_"): v
        for k, v in diffusers_to_bfl(full).items()
        if k.endswith(".weight") and v.abs().max() > 0
    }


def run_ours_with(ours, lora: dict[str, torch.Tensor], x) -> torch.Tensor:
    network, weights = create_network_from_weights(1.0, "converted", None, [None, None], ours, weights_sd=lora)
    network.apply_to([None, None], ours)
    network.load_state_dict(weights)
    try:
        with torch.no_grad():
            return ours(**x)
    finally:
        network.set_enabled(False)


def assert_deltas_match(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    got = deltas(converted)
    assert got.keys() == expected.keys()
    for name, delta in expected.items():
        assert got[name].shape == delta.shape, name
        torch.testing.assert_close(got[name], delta, rtol=1e-5, atol=1e-6 * delta.abs().max().item(), msg=name)


def assert_same_output(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)
    assert (expected - base).abs().max().item() > 1e-2 * scale, "the LoRA barely changes the output"


def test_final_modulation_lora_has_its_halves_swapped_both_ways():
    """diffusers' norm_out.linear gives (scale, shift), BFL's final_layer.adaLN_modulation.1 (shift, scale):
    a LoRA on it must have its up rows' halves swapped, or scale and shift trade places."""
    ours, reference, x = twins()
    with torch.no_grad():
        base = ours(**x)
    peft_file, meta = add_peft_lora(reference, LoraConfig(r=4, lora_alpha=4, target_modules=["norm_out.linear"]))
    expected = run_diffusers(reference, x)
    converted = to_sd_scripts(peft_file, meta).state_dict
    assert_deltas_match(converted, peft_deltas_in_bfl_layout(reference))
    assert_same_output(run_ours_with(ours, converted, x), expected, base)
    reference.delete_adapters("default")

    # sd-scripts -> diffusers: an sd-scripts LoRA on the BFL layer gives our output in diffusers + peft
    g = torch.Generator().manual_seed(9)
    sd_scripts = {
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.randn(4, 64, generator=g) * 0.1,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.randn(128, 4, generator=g) * 0.1,
        "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(2.0),
    }
    expected = run_ours_with(ours, sd_scripts, x)
    reference.load_lora_adapter(to_ai_toolkit(sd_scripts).state_dict, prefix="transformer", adapter_name="back")
    try:
        assert_same_output(run_diffusers(reference, x), expected, base)
    finally:
        reference.delete_adapters("back")


def test_rslora_adapter_keeps_peft_scale_alpha_over_sqrt_rank():
    """peft's rsLoRA scale is lora_alpha / sqrt(r), sd-scripts' alpha / r: the converted alpha must be
    lora_alpha * sqrt(r) (here r = 4, so a missing sqrt halves every change)."""
    ours, reference, x = twins()
    with torch.no_grad():
        base = ours(**x)
    config = LoraConfig(
        r=4, lora_alpha=3, use_rslora=True,
        target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_mlp", "norm_out.linear"],
    )  # fmt: skip
    peft_file, meta = add_peft_lora(reference, config)
    expected_deltas = peft_deltas_in_bfl_layout(reference)
    # peft's delta is B @ A * 3 / sqrt(4), independently of get_delta_weight
    to_out = reference.transformer_blocks[0].attn.to_out[0]
    closed_form = to_out.lora_B["default"].weight.double() @ to_out.lora_A["default"].weight.double() * 1.5
    torch.testing.assert_close(expected_deltas["lora_unet_double_blocks_0_img_attn_proj"], closed_form)
    converted = to_sd_scripts(peft_file, meta).state_dict
    assert_deltas_match(converted, expected_deltas)
    assert_same_output(run_ours_with(ours, converted, x), run_diffusers(reference, x), base)


def test_single_block_lora_without_proj_mlp_fuses_at_the_model_mlp_width():
    """A diffusers LoRA on a single block's q, k, v but not proj_mlp becomes a linear1 LoRA whose MLP rows
    stay zero: their number is the model's MLP width (here 2 x hidden, read from proj_out), not 4 x hidden."""
    ours, reference, x = twins(mlp_ratio=2.0)
    assert ours.single_blocks[0].linear1.out_features == 3 * 64 + 128
    with torch.no_grad():
        base = ours(**x)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*single_transformer_blocks\.0\.(attn\.to_[qkv]|proj_out)")
    peft_file, meta = add_peft_lora(reference, config)
    assert not any("proj_mlp" in k for k in peft_file)
    converted = to_sd_scripts(peft_file, meta).state_dict
    assert converted["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 64 + 128, 12)
    assert_deltas_match(converted, peft_deltas_in_bfl_layout(reference))
    assert_same_output(run_ours_with(ours, converted, x), run_diffusers(reference, x), base)
