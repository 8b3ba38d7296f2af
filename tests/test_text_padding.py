"""T5 padding that the attention hides is cut before the blocks run (library.flux_attention.without_hidden_text):
the output and the gradients are those of the full padded sequence, the blocks see the shorter one, and
where nothing is left to hide they get no mask (so SDPA may pick its flash kernel)."""

import pytest
import torch

from library import chroma_models, flux_attention, flux_models
from library.flux_attention import text_key_mask
from library.tiny_models import random_model, tiny_chroma_params, tiny_flux_params
from networks.lora_flux import create_network
from tests.test_lora_math import dit_inputs, randomize_lora

EXTRA = {"flux": 0, "chroma": chroma_models.CHROMA_ATTN_PADDING}  # Chroma attends to one padding token


def uncut(txt, txt_ids, txt_attention_mask, num_img_tokens, extra_tokens=0, compiled=False):
    """The forward before the cut: every token, the padding hidden by the mask alone."""
    return txt, txt_ids, text_key_mask(txt_attention_mask, num_img_tokens, extra_tokens)


def padded_inputs(p, lengths: list[int], txt_len: int = 12) -> dict:
    x = dit_inputs(p, batch=len(lengths), txt_len=txt_len)
    x["txt_attention_mask"] = (torch.arange(txt_len)[None] < torch.tensor(lengths)[:, None]).long()
    x["timesteps"] = torch.full((len(lengths),), 0.6)
    if "guidance" in x:
        x["guidance"] = torch.full((len(lengths),), 3.5)
    return x


def loss_and_grads(model, network, x):
    inputs = {**x, "img": x["img"].clone().requires_grad_(True)}
    loss = model(**inputs).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad()
    return loss.detach(), inputs["img"].grad, grads


@pytest.mark.parametrize("kind", ["flux", "chroma"])
@pytest.mark.parametrize("lengths", [[3], [3, 7], [12, 2]], ids=["one", "two", "one_full"])
def test_cut_padding_leaves_the_output_and_the_gradients_as_they_were(kind, lengths, monkeypatch):
    p = tiny_chroma_params() if kind == "chroma" else tiny_flux_params()
    model = random_model(p, seed=3).requires_grad_(False)
    network = create_network(1.0, 4, 4.0, None, [None, None], model)
    network.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
    randomize_lora(network)
    x = padded_inputs(p, lengths)
    cut = loss_and_grads(model, network, x)
    module = chroma_models if kind == "chroma" else flux_models
    monkeypatch.setattr(module, "without_hidden_text", uncut)
    full = loss_and_grads(model, network, x)
    torch.testing.assert_close(cut[0], full[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(cut[1], full[1], rtol=1e-5, atol=1e-7)
    for name, grad in full[2].items():
        torch.testing.assert_close(cut[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
@pytest.mark.parametrize("lengths, tokens, masked", [
    ([3], 3, False),  # one prompt: nothing left to hide, no mask
    ([3, 3], 3, False),
    ([3, 7], 7, True),  # the shorter prompt's padding is still hidden
    ([12, 2], 12, True),  # a prompt that fills the sequence: nothing to cut
])  # fmt: skip
def test_the_blocks_see_the_tokens_up_to_the_longest_prompt(kind, lengths, tokens, masked, monkeypatch):
    p = tiny_chroma_params() if kind == "chroma" else tiny_flux_params()
    model = random_model(p, seed=3).requires_grad_(False)
    seen = []
    real_sdpa = flux_attention.sdpa

    def recording(q, k, v, attn_mask=None):
        seen.append((k.shape[2], attn_mask is not None))
        return real_sdpa(q, k, v, attn_mask)

    monkeypatch.setattr(flux_attention, "sdpa", recording)
    x = padded_inputs(p, lengths)
    with torch.no_grad():
        model(**x)
    visible = min(tokens + EXTRA[kind], 12)
    img_tokens = x["img"].shape[1]
    assert seen and set(seen) == {(visible + img_tokens, masked)}


def test_a_batch_without_visible_text_keeps_one_hidden_token():
    """A mask of zeros (FLUX, no padding seen): the text is cut to one token, hidden; the image still attends."""
    txt, ids = torch.randn(2, 5, 8), torch.zeros(2, 5, 3)
    cut_txt, cut_ids, mask = flux_attention.without_hidden_text(txt, ids, torch.zeros(2, 5), 4)
    assert cut_txt.shape == (2, 1, 8) and cut_ids.shape == (2, 1, 3)
    assert mask.shape == (2, 1, 1, 5) and not mask[..., 0].any() and mask[..., 1:].all()


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_compiled_blocks_trace_no_more_graphs_for_the_cut_text(kind, monkeypatch):
    """A mask or none, and text lengths dynamo specialises, are graphs of their own: with buckets and a last
    short batch the cut text ran past dynamo's recompile limit (blocks then run uncompiled). Compiled, the text
    is not cut: no more graphs than before."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    p = tiny_chroma_params() if kind == "chroma" else tiny_flux_params()
    frames = {}
    for name in ("cut", "uncut"):
        if name == "uncut":
            monkeypatch.setattr(chroma_models if kind == "chroma" else flux_models, "without_hidden_text", uncut)
        model = random_model(p, seed=3).requires_grad_(False)
        model.txt_in.requires_grad_(True)
        counter = CompileCounter()
        torch._dynamo.reset()
        model.compile_blocks(backend=counter)
        for lengths in ([3, 7], [1, 1], [4]):  # unequal prompts, empty captions, a last batch of one
            model(**padded_inputs(p, lengths)).square().mean().backward()
        frames[name] = counter.frame_count
    assert 0 < frames["cut"] == frames["uncut"], frames


class DeviceWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that make the host wait for the device they read from (a CUDA sync), by device."""

    WAITING = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WAITING:
            self.devices.append(args[0].device.type)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [0, 1])
def test_the_cut_is_decided_on_the_host_mask_and_the_key_mask_goes_to_the_text_device(extra):
    # txt on another device than the mask ("meta" stands in for the GPU): the decision reads the host mask only
    txt, txt_ids = torch.empty(2, 12, 8, device="meta"), torch.empty(2, 12, 3, device="meta")
    mask = (torch.arange(12)[None] < torch.tensor([3, 7])[:, None]).long()
    with DeviceWaits() as waits:
        cut, cut_ids, key_mask = flux_attention.without_hidden_text(txt, txt_ids, mask, 5, extra)
    assert waits.devices and set(waits.devices) == {"cpu"}
    assert cut.shape == (2, 7 + extra, 8) and cut_ids.shape == (2, 7 + extra, 3) and cut.device.type == "meta"
    assert key_mask.device.type == "meta" and key_mask.shape == (2, 1, 1, 7 + extra + 5)
    compiled = flux_attention.without_hidden_text(txt, txt_ids, mask, 5, extra, compiled=True)[2]
    assert compiled.device.type == "meta" and compiled.shape == (2, 1, 1, 12 + 5)


def test_the_trainer_and_the_sampler_give_the_dit_the_t5_mask_on_the_host():
    import types

    import flux_train_network
    from library.flux_sampling import TextConditions

    mask = torch.ones(2, 6, dtype=torch.long)
    cached = {"l_pooled": torch.zeros(2, 4), "t5_out": torch.zeros(2, 6, 4), "txt_ids": torch.zeros(2, 6, 3),
              "t5_attn_mask": mask}  # fmt: skip
    ctx = types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("meta")),
                                weight_dtype=torch.bfloat16, train_text_encoder=False)  # fmt: skip
    l_pooled, t5_out, txt_ids, t5_mask = flux_train_network.FluxNetworkTrainer().text_conditions(
        ctx, {"text_encoder_outputs": cached})
    assert {t.device.type for t in (l_pooled, t5_out, txt_ids)} == {"meta"} and t5_mask.device.type == "cpu"
    moved = TextConditions(*cached.values()).to("meta", torch.bfloat16)
    assert moved.t5_out.device.type == "meta" and moved.t5_attn_mask.device.type == "cpu"
    assert torch.equal(moved.t5_attn_mask, mask)
