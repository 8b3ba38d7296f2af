"""The single block's linear2 input without a cat: the GELU output leaves room in front
(``rest_room``) and ``place_attention`` writes the attention output there. Same numbers and
gradients as the cat, eager and in the form written out for torch.compile."""

import pytest
import torch

from library.flux_attention import _attention_inputs_composed, attention_inputs, place_attention
from tests.test_compiled_blocks import streams


@pytest.mark.parametrize("form", [attention_inputs, _attention_inputs_composed], ids=["eager", "composed"])
@pytest.mark.parametrize("queries_from", [0, 3])
def test_placed_attention_equals_the_cat(form, queries_from):
    projections, norms, pe, heads = streams(gelu_rest=True)  # streams of 5 and 12 tokens, 24 MLP channels
    g = torch.Generator().manual_seed(5)
    attentions = [torch.randn(2, n, 10, generator=g, requires_grad=True) for n in (5 - queries_from, 12)]
    params = [*projections, *(p for n in norms for p in n.parameters()), *attentions]

    _, _, _, *mlps = form(projections, norms, pe, heads, True, queries_from)
    expected = [torch.cat((a, m), dim=-1) for a, m in zip(attentions, mlps, strict=True)]
    _, _, _, *roomy = form(projections, norms, pe, heads, True, queries_from, rest_room=10)
    assert [m.shape[-1] for m in roomy] == [34, 34]
    placed = [place_attention(a, m) for a, m in zip(attentions, roomy, strict=True)]
    for a, b in zip(placed, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    weights = [torch.randn(t.shape, generator=g) for t in expected]
    # the q/k scales get no gradient from the MLP part: zeros from the eager node, none from the composed form
    grads = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(placed, weights, strict=True)), params, materialize_grads=True
    )
    expected_grads = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(expected, weights, strict=True)), params, materialize_grads=True
    )
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_placing_writes_in_place_in_eager_mode():
    projections, norms, pe, heads = streams(gelu_rest=True)
    mlp = attention_inputs(projections[:1], norms[:1], pe[:, :, :5], heads, True, rest_room=10)[3]
    attention = torch.randn(2, 5, 10)
    out = place_attention(attention, mlp)
    assert out.data_ptr() == mlp.data_ptr()
    torch.testing.assert_close(out[..., :10], attention, rtol=0, atol=0)
