"""The last single block outputs the image tokens only (the final layer never reads the text ones):
the same numbers and gradients as computing every token and dropping the text, and the work it
skips is really skipped."""

import pytest
import torch

from library.flux_attention import _attention_inputs_composed, attention_inputs
from library.flux_layers import SingleStreamBlock
from library.tiny_models import random_model, randomize_, tiny_chroma_params, tiny_flux_params
from tests.test_compiled_blocks import block_inputs, streams
from tests.test_flux_models import chroma_mask, dit_inputs


def weighted_sum(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))


@pytest.mark.parametrize("form", [attention_inputs, _attention_inputs_composed], ids=["eager", "composed"])
@pytest.mark.parametrize("gelu_rest", [False, True], ids=["double", "single"])
@pytest.mark.parametrize("queries_from", [3, 5])  # part of the first stream, all of it
def test_queries_from_equals_dropping_query_and_mlp_rows(form, gelu_rest, queries_from):
    projections, norms, pe, heads = streams(gelu_rest)  # two streams, of 5 and 12 tokens
    full = form(projections, norms, pe, heads, gelu_rest)
    expected = [full[0][:, queries_from:], full[1], full[2]]
    if gelu_rest:
        expected += [full[3][:, queries_from:], full[4]]  # only the first stream's rows are dropped
    ours = form(projections, norms, pe, heads, gelu_rest, queries_from)
    assert [t.shape for t in ours] == [t.shape for t in expected]
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    weights = [torch.randn_like(t) for t in expected]
    params = [*projections, *(p for n in norms for p in n.parameters())]
    grads = torch.autograd.grad(weighted_sum(ours, weights), params)
    expected_grads = torch.autograd.grad(weighted_sum(expected, weights), params)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_queries_from_beyond_the_first_stream_is_refused():
    projections, norms, pe, heads = streams(True)
    with pytest.raises(ValueError, match="queries_from=6 lies outside the first stream's 5 tokens"):
        attention_inputs(projections, norms, pe, heads, True, 6)


@pytest.mark.parametrize("gelu", ["tanh", "none"], ids=["tanh_gelu", "other_activation"])
def test_single_block_output_from_equals_the_tail_of_the_full_output(gelu):
    p = tiny_flux_params()
    block = randomize_(SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio), 4)
    if gelu == "none":
        block.mlp_act = WrappedTanhGelu()  # takes the path without the fused GELU
    x, vec, pe = block_inputs(p, double=False)  # 5 text + 12 image tokens
    full = block(x, vec, pe)
    tail = block(x, vec, pe, None, None, 5)
    assert tail.shape == (1, 12, p.hidden_size)
    torch.testing.assert_close(tail, full[:, 5:], rtol=1e-6, atol=1e-6)

    weight = torch.randn_like(tail)
    params = [x, *block.parameters()]
    grads = torch.autograd.grad((tail * weight).sum(), params)
    expected = torch.autograd.grad((full[:, 5:] * weight).sum(), params)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_only_the_last_single_block_skips_the_text_tokens(kind):
    params = tiny_flux_params(depth_single=3) if kind == "flux" else tiny_chroma_params(depth_single=3)
    model = random_model(params, seed=7)
    x = dit_inputs(params, batch=2, txt_len=8)
    extra = {"guidance": torch.tensor([3.5, 2.0])} if kind == "flux" else {"txt_attention_mask": chroma_mask([3, 6], 8)}
    rows_into_linear2 = []
    hooks = [b.linear2.register_forward_hook(lambda m, args, out: rows_into_linear2.append(args[0].shape[1]))
             for b in model.single_blocks]  # fmt: skip
    out = model(**x, **extra)
    for h in hooks:
        h.remove()
    img_tokens = x["img"].shape[1]
    txt_tokens = 7 if kind == "chroma" else 8  # Chroma's text runs to its longest prompt (6) and one pad
    assert out.shape == x["img"].shape
    assert rows_into_linear2 == [txt_tokens + img_tokens, txt_tokens + img_tokens, img_tokens]


class WrappedTanhGelu(torch.nn.Module):
    """The same activation in a module the block does not recognise, so it skips its fused GELU."""

    def forward(self, x):
        return torch.nn.functional.gelu(x, approximate="tanh")


def test_single_block_without_the_fused_gelu_has_the_same_gradients():
    """The MLP channels of the projection get their gradient from the activation alone (the q/k/v
    node once left them unwritten on this path: NaN gradients)."""
    p = tiny_flux_params()
    block = randomize_(SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio), 4)
    x, vec, pe = block_inputs(p, double=False)
    weight = torch.randn(1, 17, p.hidden_size, generator=torch.Generator().manual_seed(1))
    params = [x, *block.parameters()]
    fused = torch.autograd.grad((block(x, vec, pe) * weight).sum(), params)
    block.mlp_act = WrappedTanhGelu()
    plain = torch.autograd.grad((block(x, vec, pe) * weight).sum(), params)
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
