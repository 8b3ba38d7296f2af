"""Edges of the LoRA module math that a mutation round found untested: every forward path and its
gradients against the formula, dropouts replayed from the same seed, GGPO's norms and perturbation,
split modules' fused state, merging and max-norm, each against a reference computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from networks.lora_modules import LoRAInfModule, LoRAModule, _SharedInput, resolve_alpha, split_fused

IN, OUT, RANK = 8, 6, 2


def adapted(out=OUT, rank=RANK, alpha=1.0, bias=True, seed=0, up_std=1.0, **kwargs):
    torch.manual_seed(seed)
    base = nn.Linear(IN, out, bias=bias)
    lora = LoRAModule("lora_unet_x", base, lora_dim=rank, alpha=alpha, **kwargs)
    with torch.no_grad():
        for _, up in lora.pairs():
            up.weight.normal_(std=up_std)
    lora.apply_to()
    return base, lora.eval()


def by_hand(base, lora, x, multiplier=None):
    """base(x) + multiplier * alpha / rank * x (U D)ᵀ, in fp32."""
    multiplier = lora.multiplier if multiplier is None else multiplier
    with torch.no_grad():
        delta = torch.cat([u.weight.float() @ d.weight.float() for d, u in lora.pairs()])
        bias = None if base.bias is None else base.bias.float()
        return F.linear(x.float(), base.weight.float(), bias) + multiplier * lora.scale * x.float() @ delta.T


def test_resolve_alpha_follows_sd_scripts():
    assert resolve_alpha(None, 4) == 4.0 and resolve_alpha(0, 4) == 4.0 and resolve_alpha(torch.tensor(0.0), 4) == 4.0
    assert resolve_alpha(3, 4) == 3.0 and resolve_alpha(torch.tensor(2.5, dtype=torch.bfloat16), 4) == 2.5


def block_diagonal_pair(rank=2, dims=(4, 4, 4)):
    torch.manual_seed(1)
    downs = [torch.randn(rank, IN) for _ in dims]
    ups = [torch.randn(d, rank) for d in dims]
    return downs, ups, torch.cat(downs), torch.block_diag(*ups)


def test_split_fused_recovers_the_chunks():
    downs, ups, down, up = block_diagonal_pair()
    got_downs, got_ups = split_fused(down, up, [4, 4, 4])
    assert all(torch.equal(a, b) for a, b in zip(got_downs + got_ups, downs + ups, strict=True))


def test_split_fused_refuses_what_does_not_split():
    _, _, down, up = block_diagonal_pair()
    with pytest.raises(UserError, match=r"m: rank 5 and output 12 cannot be split into 3 chunks of \[4, 4, 4\]"):
        split_fused(down[:5], up[:, :5], [4, 4, 4], "m")
    with pytest.raises(UserError, match="rank 6 and output 13 cannot be split"):
        split_fused(down, torch.cat([up, up[:1]]), [4, 4, 4], "m")
    for row, column in ((0, 2), (4, 0), (4, 4), (11, 0)):  # just beside a block, or far from it
        bad = up.clone()
        bad[row, column] = 1.0
        with pytest.raises(UserError, match="m is a plain LoRA"):
            split_fused(down, bad, [4, 4, 4], "m")


def test_split_dims_must_add_up():
    with pytest.raises(ValueError, match=r"lora_unet_x: split dims \[4, 4\] do not add up to 12"):
        LoRAModule("lora_unet_x", nn.Linear(IN, 12), lora_dim=2, split_dims=[4, 4])


def test_a_new_module_changes_nothing_and_scales_by_alpha_over_rank():
    base = nn.Linear(IN, OUT)
    lora = LoRAModule("lora_unet_x", base, lora_dim=4, alpha=2)
    assert lora.scale == 0.5 and lora.alpha.item() == 2.0
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    lora.apply_to()
    x = torch.randn(3, IN)
    assert torch.equal(base(x), F.linear(x, base.weight, base.bias))
    with pytest.raises(RuntimeError, match="lora_unet_x is already applied"):
        lora.apply_to()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_forward_matches_the_formula_with_a_multiplier(bias, training):
    base, lora = adapted(alpha=3.0, bias=bias, multiplier=0.7)
    lora.train(training)
    x = torch.randn(2, 3, IN)
    assert torch.allclose(base(x), by_hand(base, lora, x), atol=1e-5)
    assert torch.allclose(base(x.requires_grad_()), by_hand(base, lora, x), atol=1e-5)


def test_split_modules_forward_each_chunk_in_place():
    base, lora = adapted(out=12, alpha=3.0, split_dims=[4, 4, 4], multiplier=0.7)
    x = torch.randn(3, IN)
    assert torch.allclose(base(x), by_hand(base, lora, x), atol=1e-5)
    assert len(LoRAInfModule("lora_unet_y", nn.Linear(IN, 12), 1.0, 2, 1, split_dims=[4, 4, 4]).pairs()) == 3


def test_gradients_match_plain_autograd():
    base, lora = adapted(alpha=3.0, multiplier=0.7)
    lora.train()
    x = torch.randn(2, 3, IN, requires_grad=True)
    g = torch.randn(2, 3, OUT)
    base(x).backward(g)
    got = (x.grad, lora.lora_down.weight.grad, lora.lora_up.weight.grad)
    x2 = x.detach().clone().requires_grad_()
    down = lora.lora_down.weight.detach().clone().requires_grad_()
    up = lora.lora_up.weight.detach().clone().requires_grad_()
    y = F.linear(x2, base.weight, base.bias) + 0.7 * lora.scale * F.linear(F.linear(x2, down), up)
    y.backward(g)
    for a, b in zip(got, (x2.grad, down.grad, up.grad), strict=True):
        assert a is not None and torch.allclose(a, b, atol=1e-5)


def test_the_shared_input_alone():
    x = torch.randn(3, IN, requires_grad=True)
    down = torch.randn(RANK, IN)
    _, lx = _SharedInput.apply(x, down, torch.float32)
    lx.sum().backward()  # the base's output unused
    assert torch.allclose(x.grad, torch.ones(3, RANK) @ down, atol=1e-6)
    x.grad = None
    passed, _ = _SharedInput.apply(x, down, torch.float32)
    (passed * 2).sum().backward()  # the update unused
    assert torch.equal(x.grad, torch.full((3, IN), 2.0))


def test_the_bases_gradient_is_not_rounded_to_a_bf16_lora():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    lora = LoRAModule("lora_unet_x", base, lora_dim=RANK).to(torch.bfloat16)  # up is zero: no LoRA gradient
    lora.apply_to()
    x = torch.randn(4, IN, requires_grad=True)
    g = torch.randn(4, OUT)
    base(x).backward(g)
    assert x.grad.dtype == torch.float32 and torch.allclose(x.grad, g @ base.weight.detach(), rtol=1e-6, atol=1e-7)
    assert lora.lora_down.weight.grad.dtype == torch.bfloat16


def test_a_bf16_base_with_an_fp32_lora():
    base, lora = adapted(alpha=2.0, up_std=30.0, multiplier=0.7)
    base.to(torch.bfloat16)
    x = torch.randn(64, IN, dtype=torch.bfloat16)
    y = base(x)
    assert y.dtype == torch.bfloat16
    org = F.linear(x, base.weight, base.bias)
    update = 0.7 * lora.scale * (x.float() @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
    reference = (org.float() + update.detach()).to(torch.bfloat16)
    assert (y != reference).float().mean() < 0.05  # computed in fp32 and rounded once


def test_multiplier_0_gives_exactly_the_base_even_with_ggpo():
    base, lora = adapted(ggpo_sigma=0.5, ggpo_beta=0.5)
    lora.train()
    lora.update_norms()
    lora.grad_norms = torch.ones(OUT, 1)
    lora.multiplier = 0
    x = torch.randn(3, IN)
    assert torch.equal(base(x), F.linear(x, base.weight, base.bias))


def test_a_disabled_module_gives_exactly_the_base():
    base, lora = adapted(multiplier=0.7)
    lora.enabled = False
    x = torch.randn(3, IN)
    assert torch.equal(base(x), F.linear(x, base.weight, base.bias))


def test_module_dropout_drops_only_in_training():
    base, lora = adapted(module_dropout=0.999)
    x = torch.randn(3, IN)
    assert torch.allclose(base(x), by_hand(base, lora, x), atol=1e-5)  # eval: applied
    lora.train()
    torch.manual_seed(0)
    assert torch.equal(base(x), F.linear(x, base.weight, base.bias))


def test_neuron_dropout_replays_from_its_seed_and_is_off_in_eval():
    base, lora = adapted(dropout=0.5, bias=False)
    x = torch.randn(4, IN)
    assert torch.allclose(base(x), by_hand(base, lora, x), atol=1e-5)
    lora.train()
    torch.manual_seed(3)
    y = base(x)
    torch.manual_seed(3)
    lx = F.dropout(x @ lora.lora_down.weight.T, p=0.5)
    reference = x @ base.weight.T + lora.scale * lx @ lora.lora_up.weight.T
    assert torch.allclose(y, reference.detach(), atol=1e-5)


def test_rank_dropout_keeps_the_expected_update_and_is_off_in_eval():
    base, lora = adapted(rank_dropout=0.25, bias=False, rank=4, alpha=2.0)
    x = torch.randn(8, 3, IN)
    assert torch.allclose(base(x), by_hand(base, lora, x), atol=1e-5)
    lora.train()
    torch.manual_seed(5)
    y = base(x)
    torch.manual_seed(5)
    keep = (torch.rand(8, 4) > 0.25).float().view(8, 1, 4)
    lx = (x @ lora.lora_down.weight.T) * keep
    reference = x @ base.weight.T + lora.scale / 0.75 * lx @ lora.lora_up.weight.T
    assert torch.allclose(y, reference.detach(), atol=1e-5)


def ggpo_module(split=False):
    base, lora = adapted(out=12 if split else OUT, alpha=3.0, ggpo_sigma=0.3, ggpo_beta=0.2, multiplier=0.7,
                         split_dims=[4, 4, 4] if split else None)  # fmt: skip
    lora.train()
    return base, lora


def test_ggpo_norms_follow_the_formulas():
    base, lora = ggpo_module()
    assert lora.perturbation_norm_factor == 1 / math.sqrt(OUT)
    assert math.isclose(lora.org_weight_norm_estimate, base.weight.norm(dim=1).mean().item(), rel_tol=1e-6)
    lora.update_grad_norms()
    assert lora.grad_norms is None  # no gradients yet
    lora.update_norms()
    delta = lora.scale * lora.lora_up.weight @ lora.lora_down.weight
    assert torch.allclose(lora.weight_norms, delta.norm(dim=1, keepdim=True))
    expected = (lora.org_weight_norm_estimate**2 + (delta**2).sum(1, keepdim=True)).sqrt()
    assert torch.allclose(lora.combined_weight_norms, expected)
    base(torch.randn(3, IN, requires_grad=True)).square().sum().backward()
    lora.update_grad_norms()
    d, u = lora.lora_down.weight, lora.lora_up.weight
    grad = lora.scale * (u @ d.grad + u.grad @ d)
    assert torch.allclose(lora.grad_norms, grad.norm(dim=1, keepdim=True).detach())
    lora.eval()
    lora.combined_weight_norms = lora.grad_norms = None
    lora.update_norms()
    lora.update_grad_norms()
    assert lora.combined_weight_norms is None and lora.grad_norms is None


def test_ggpo_split_modules_need_every_chunks_gradients():
    base, lora = ggpo_module(split=True)
    base(torch.randn(3, IN, requires_grad=True)).square().sum().backward()
    lora.lora_up[1].weight.grad = None
    lora.update_grad_norms()
    assert lora.grad_norms is None


def test_ggpo_perturbation_replays_from_its_seed():
    base, lora = ggpo_module()
    lora.update_norms()
    lora.grad_norms = torch.rand(OUT, 1) + 0.5
    x = torch.randn(3, IN)
    torch.manual_seed(7)
    y = base(x)
    torch.manual_seed(7)
    noise = torch.randn(OUT, IN)
    row_scale = 0.3 * lora.combined_weight_norms + 0.2 * lora.grad_norms**2
    reference = by_hand(base, lora, x) + x @ (noise * row_scale / math.sqrt(OUT)).T
    assert torch.allclose(y, reference, atol=1e-5)
    lora.eval()
    assert torch.allclose(base(x), by_hand(base, lora, x), atol=1e-5)  # no perturbation outside training


def test_ggpo_on_a_meta_model_measures_nothing():
    with torch.device("meta"):
        lora = LoRAModule("lora_unet_x", nn.Linear(IN, OUT), lora_dim=2, ggpo_sigma=0.1, ggpo_beta=0.1)
    assert lora.org_weight_norm_estimate is None


def test_weights_of_the_update():
    _, lora = adapted(alpha=3.0, multiplier=0.7)
    delta = lora.scale * lora.lora_up.weight @ lora.lora_down.weight
    assert torch.allclose(lora.delta_weight(), delta)
    assert torch.allclose(lora.get_weight(), 0.7 * delta) and torch.allclose(lora.get_weight(2.0), 2 * delta)


def test_split_state_is_the_fused_lora_and_loads_back():
    _, lora = adapted(out=12, alpha=3.0, split_dims=[4, 4, 4])
    sd = lora.state_dict()
    assert set(sd) == {"alpha", "lora_down.weight", "lora_up.weight"}
    assert sd["alpha"].item() == 9.0 and sd["lora_down.weight"].shape == (6, IN)
    assert torch.equal(sd["lora_up.weight"], torch.block_diag(*[u.weight for u in lora.lora_up]))
    fused = sd["alpha"] / 6 * sd["lora_up.weight"] @ sd["lora_down.weight"]
    assert torch.allclose(fused, lora.delta_weight(), atol=1e-6)  # a plain loader applies the trained update
    _, again = adapted(out=12, alpha=1.0, split_dims=[4, 4, 4], seed=9)
    again.load_state_dict({k: v.clone() for k, v in sd.items()})
    assert again.alpha.item() == 3.0 and again.scale == 1.5
    assert torch.allclose(again.delta_weight(), lora.delta_weight())
    missing = again.load_state_dict({"lora_down.weight": sd["lora_down.weight"]}, strict=False).missing_keys
    assert "lora_up.0.weight" in missing and "alpha" in missing


def test_a_loaded_alpha_sets_the_scale():
    _, lora = adapted(rank=4, alpha=1.0)
    sd = lora.state_dict()
    sd["alpha"] = torch.tensor(2.0)
    lora.load_state_dict(sd)
    assert lora.scale == 0.5


def test_merging_a_files_weights_scales_by_its_alpha_and_the_multiplier():
    base, lora = adapted(rank=4, multiplier=0.5)
    before = base.weight.detach().clone()
    down, up = torch.randn(4, IN), torch.randn(OUT, 4)
    lora.merge_to({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0)})
    assert torch.allclose(base.weight, before + 0.5 * 0.5 * up @ down, atol=1e-5)
    base2, lora2 = adapted(rank=4, multiplier=0.5, alpha=2.0)
    before = base2.weight.detach().clone()
    lora2.merge_to(dtype=torch.bfloat16)
    assert base2.weight.dtype == torch.bfloat16
    assert torch.allclose(base2.weight.float(), before + 0.5 * lora2.delta_weight(), atol=2e-2)


def test_max_norm_scales_both_factors_and_reports_the_norm_after():
    _, lora = adapted(alpha=3.0, up_std=5.0)
    norm = lora.delta_weight().detach().norm()
    down, up = lora.lora_down.weight.detach().clone(), lora.lora_up.weight.detach().clone()
    scaled, after = lora.apply_max_norm(float(norm))  # at the cap: not over it
    assert not scaled and torch.equal(after, norm)
    scaled, after = lora.apply_max_norm(float(norm) * 2)
    assert not scaled and torch.allclose(after, norm) and torch.equal(lora.lora_down.weight, down)
    scaled, after = lora.apply_max_norm(float(norm) / 4)
    assert scaled and torch.allclose(after, norm / 4) and torch.allclose(lora.delta_weight().norm(), norm / 4)
    assert torch.allclose(lora.lora_down.weight, down / 2) and torch.allclose(lora.lora_up.weight, up / 2)
