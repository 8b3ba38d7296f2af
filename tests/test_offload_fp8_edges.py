"""Edges of block swapping, fp8 storage and ComfyUI's scaled fp8 layouts that the broader tests pass over
(found by a mutation round over library/offloading.py, library/fp8.py and library/comfy_fp8.py): the
offloader's bounds and safety nets, its CUDA path's stream order and buffer reuse, the header-only depth
check, fp8 scales and conversions, and the recognition of ComfyUI's markers."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from library import comfy_fp8, fp8, offloading
from library.errors import CheckpointError, UserError
from library.offloading import ModelOffloader, PinnedArena, move_to_device_except_swapped
from library.safetensors_io import save_safetensors
from library.tiny_models import random_model, tiny_flux_params
from tests.cuda_fakes import FakeEvent
from tests.test_block_swap_device_path import CudaPathOffloader

FP8 = torch.float8_e4m3fn


def linear_blocks(*shapes, seed=0):
    """A ModuleList of one-Linear blocks, ``shapes`` as (in, out)."""
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(i, o)) for i, o in shapes).requires_grad_(False)


class Holder(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks


def cuda_path(blocks, num_swap):
    """A CUDA-path offloader over ``blocks``, placed as on a GPU (device tensors apart from the host copies)."""
    holder = Holder(blocks)
    offloader = CudaPathOffloader("blocks", blocks, num_swap)
    holder.to = lambda device: holder._apply(torch.clone)
    move_to_device_except_swapped(holder, [offloader], "cpu")
    return offloader


# ---- the offloader ---------------------------------------------------------------------------------------


def test_the_offloader_refuses_to_swap_every_block_or_a_negative_count():
    blocks = linear_blocks(*[(4, 4)] * 3)
    for count in (3, 4, -1):
        with pytest.raises(ValueError, match=f"cannot swap {count} of 3 double blocks"):
            ModelOffloader("double", blocks, count, "cpu")
    assert ModelOffloader("double", blocks, 0, "cpu").swappable == []
    assert ModelOffloader("double", blocks, 2, "cpu").swappable == [0, 1, 2]


def test_only_the_first_and_last_num_swap_blocks_get_host_copies():
    offloader = ModelOffloader("single", linear_blocks(*[(4, 4)] * 6), 2, "cpu")
    assert offloader.swappable == [0, 1, 4, 5] and sorted(offloader.host) == [0, 1, 4, 5]
    assert offloader.forward_start_layout() == [True, True, True, True, False, False]


def test_a_block_used_while_on_the_host_is_uploaded_on_the_spot():
    blocks = linear_blocks(*[(4, 4)] * 4)
    weights = [b[0].weight.clone() for b in blocks]
    offloader = ModelOffloader("double", blocks, 1, "cpu", record=True, simulate=True)
    move_to_device_except_swapped(Holder(blocks), [offloader], "cpu")
    assert offloader.placement() == "DDDH" and blocks[3][0].weight.isnan().all()
    offloader.log.clear()
    offloader.wait_for_block(3)  # a schedule mistake: costs an upload, never a NaN result
    assert offloader.placement() == "DDDD" and offloader.log == [("upload", 3), ("wait", 3)]
    assert torch.equal(blocks[3][0].weight, weights[3])
    offloader.log.clear()
    offloader._upload(3)  # already there: nothing happens
    offloader._offload(0)
    offloader._offload(0)  # already gone: nothing happens
    assert offloader.log == [("offload", 0)] and offloader.placement() == "HDDD"


def test_placing_the_model_never_puts_a_host_block_on_the_device_nor_keeps_its_buffers(fake_cuda):
    blocks = linear_blocks(*[(4, 4)] * 4)
    holder = Holder(blocks)
    offloader = CudaPathOffloader("blocks", blocks, 1)
    sizes = []

    def to(device):
        sizes.append([b[0].weight.numel() for b in blocks])
        return holder._apply(torch.clone)

    holder.to = to
    move_to_device_except_swapped(holder, [offloader], "cpu")
    assert sizes == [[16, 16, 16, 0]]  # the host block's weight was parked while the model moved
    assert offloader.placement() == "DDDH" and blocks[3][0].weight.shape == (4, 4)
    assert offloader.free_buffers == []  # its device buffers were freed, not kept for reuse
    # the resident blocks' weights are new device tensors: known as placed by the offloader, not as replaced
    for i in offloader.swappable:
        assert offloader.placed[i] == offloading._pointers(lin.weight.data for lin in offloader.linears[i]), i
    hosts = {i: offloading._pointers(offloader.host[i]) for i in offloader.swappable}
    offloader.after_forward(0)
    assert {i: offloading._pointers(offloader.host[i]) for i in offloader.swappable} == hosts  # nothing adopted


def test_an_upload_waits_on_the_side_stream_for_the_buffers_last_users(fake_cuda):
    offloader = cuda_path(linear_blocks(*[(4, 4)] * 4), 1)
    fake_cuda.log.clear()
    offloader.after_forward(0)  # block 0 leaves, block 3 is uploaded into its buffers
    side_waits = [(stream, event) for what, stream, event in fake_cuda.log if stream is offloader.stream]
    assert len(side_waits) == 1
    ready = side_waits[0][1]
    assert isinstance(ready, FakeEvent) and ready.stream is fake_cuda.current  # recorded on the compute stream
    assert offloader.pending[3] is not ready and offloader.pending[3].stream is offloader.stream


def test_freed_buffers_are_reused_only_by_a_block_of_the_same_shapes(fake_cuda):
    blocks = linear_blocks((4, 4), (4, 4), (4, 8))
    host = blocks[2][0].weight.clone()
    offloader = cuda_path(blocks, 1)
    freed = offloading._pointers(lin.weight.data for lin in offloader.linears[0])
    offloader.after_forward(0)
    assert blocks[2][0].weight.shape == (8, 4) and torch.equal(blocks[2][0].weight, host)
    assert offloading._pointers(lin.weight.data for lin in offloader.linears[2]) != freed
    assert [offloading._pointers(b) for b in offloader.free_buffers] == [freed]  # kept for a 4 x 4 block


def test_arena_copies_fill_slabs_exactly_first_fit_on_512_byte_boundaries():
    sizes = []

    def allocate(n):
        sizes.append(n)
        return torch.empty(n, dtype=torch.uint8)

    arena = PinnedArena(slab_bytes=1024, allocate=allocate)
    copies = [arena.copy_of(torch.zeros(n)) for n in (25, 200, 1, 128, 128, 256)]  # 100, 800, 4, 512, 512, 1024 B
    # 100 bytes take up to a 512-byte boundary; 800 do not fit after them, the 4 that follow do (first fit, not
    # the last slab); two of 512 fill a slab exactly; 1024, a slab's size, are a slab (in the list) of their own
    assert sizes == [1024] * 4 and [used for _, used in arena.slabs] == [1024] * 4
    slabs = [c.untyped_storage().data_ptr() for c in copies]
    assert slabs[0] == slabs[2] and slabs[3] == slabs[4] and len({slabs[0], slabs[1], slabs[3], slabs[5]}) == 4
    assert [c.storage_offset() * c.element_size() for c in copies] == [0, 0, 512, 0, 512, 0]


# ---- the depth check -------------------------------------------------------------------------------------


def header_only_file(path, double, single, prefix="", names=("double_blocks", "single_blocks")):
    keys = [f"{prefix}{names[0]}.{i}.attn.weight" for i in range(double)]
    keys += [f"{prefix}{names[1]}.{i}.linear1.weight" for i in range(single)]
    save_safetensors({k: torch.zeros(1) for k in keys + [f"{prefix}img_in.weight"]}, path)
    return str(path)


@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
def test_block_counts_are_read_from_the_header_of_every_layout(tmp_path, layout):
    prefix = "model.diffusion_model." if layout == "comfyui" else ""
    names = (
        ("transformer_blocks", "single_transformer_blocks")
        if layout == "diffusers"
        else ("double_blocks", "single_blocks")
    )
    path = header_only_file(tmp_path / "dit.safetensors", 12, 3, prefix, names)  # 12 > 10: "11" sorts before "2"
    assert offloading.checkpoint_block_counts(path) == (12, 3)


def offload_args(path, **flags):
    defaults = dict(cpu_offload_checkpointing=False, gradient_checkpointing=False, torch_compile=False,
                    gradient_checkpointing_keep_attention=False, blocks_to_swap=None, split_mode=False,
                    pretrained_model_name_or_path=path)  # fmt: skip
    return SimpleNamespace(**{**defaults, **flags})


def test_the_swap_bound_uses_the_double_and_single_counts_each_in_its_place(tmp_path):
    path = header_only_file(tmp_path / "pruned.safetensors", 3, 12)  # 1 double + 10 single swappable: at most 6
    offloading.check_offload_args(offload_args(path, blocks_to_swap=6))
    with pytest.raises(UserError) as error:
        offloading.check_offload_args(offload_args(path, blocks_to_swap=7))
    assert str(error.value).startswith(f"{path}: --blocks_to_swap 7 is more than this model allows: it has 3 double")
    assert str(error.value).endswith("so at most 6")


def test_options_that_can_work_together_are_not_refused(tmp_path):
    path = header_only_file(tmp_path / "dit.safetensors", 4, 6)
    for flags in (
        dict(cpu_offload_checkpointing=True, gradient_checkpointing=True, blocks_to_swap=0),
        dict(torch_compile=True),
        dict(torch_compile=True, blocks_to_swap=2, gradient_checkpointing=True),
    ):
        offloading.check_offload_args(offload_args(path, **flags))  # fmt: skip
    with pytest.raises(UserError, match=r"^--blocks_to_swap must be 0 or more, not -1$"):
        offloading.check_offload_args(offload_args(path, blocks_to_swap=-1))
    with pytest.raises(UserError, match=r"^--torch_compile with --blocks_to_swap needs --gradient_checkpointing: .*"
                                        r"so every swapped block would stay on the GPU$"):  # fmt: skip
        offloading.check_offload_args(offload_args(path, torch_compile=True, blocks_to_swap=2))
    compiled = dict(torch_compile=True, blocks_to_swap=2, gradient_checkpointing=True)
    with pytest.raises(UserError, match=r"^--gradient_checkpointing_keep_attention cannot be combined with "
                                        r"--torch_compile and --blocks_to_swap: .* Drop one of them$"):  # fmt: skip
        offloading.check_offload_args(offload_args(path, gradient_checkpointing_keep_attention=True, **compiled))
    with pytest.raises(ValueError, match=r"^--blocks_to_swap must be 0 or more, not -1$"):  # enable_block_swap calls it
        offloading.swap_split(-1, 19, 38)


# ---- fp8 -------------------------------------------------------------------------------------------------


def test_row_scales_put_each_rows_largest_magnitude_in_the_top_binade_and_keep_zero_rows_zero():
    weight = torch.tensor([[0.01, -0.003], [300.0, 1.0], [0.0, 0.0], [-1e-30, 0.0]])
    scales = fp8.row_scales(weight)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.equal(torch.log2(scales), torch.log2(scales).round())  # powers of two
    top = weight.abs().amax(dim=1)[[0, 1]] / scales[[0, 1]]
    assert ((top > 224) & (top <= 448)).all(), top
    assert scales[3] == 2.0**-24  # a row too small for the top binade keeps a scale fp16 can hold
    quantized, _ = fp8.quantize_weight(weight, scaled=True)
    assert torch.equal(quantized[2].float(), torch.zeros(2)) and not quantized.float().isnan().any()


def test_a_row_of_tiny_weights_dequantizes_in_fp16_as_in_fp32():
    """Its scale (2**-29) rounded to 0 in fp16, zeroing the row, where fp16 holds its values."""
    linear = torch.nn.Linear(4, 2, bias=False)
    linear.weight.data = torch.tensor([[1e-5, 5e-6, -8e-6, 2e-6], [0.5, 0.1, -0.2, 0.3]])
    fp8.make_fp8_linear(linear, scaled=True)
    half = fp8.dequantize_weight(linear.weight, linear.weight_scale, torch.float16)
    wide = fp8.dequantize_weight(linear.weight, linear.weight_scale, torch.float32)
    assert torch.equal(half, wide.half())
    torch.testing.assert_close(wide[0], torch.tensor([1e-5, 5e-6, -8e-6, 2e-6]), rtol=0.07, atol=0)


def test_keeping_dequantized_weights_nests():
    with fp8.keep_dequantized_weights():
        with fp8.keep_dequantized_weights():
            pass
        assert fp8._recomputation.keep is True
    assert fp8._recomputation.keep is False


def saved_bytes(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, [t.untyped_storage().nbytes() for t in saved if t is not None]


def test_an_fp8_linear_trains_its_bias_and_keeps_no_weight_for_an_input_without_gradient():
    torch.manual_seed(0)
    linear = fp8.make_fp8_linear(nn.Linear(8, 6), scaled=True)
    linear.bias.requires_grad_(True)
    x = torch.randn(2, 3, 8)
    linear(x).square().sum().backward()
    w = linear.weight.float() * linear.weight_scale[:, None]
    expected = nn.functional.linear(x, w, linear.bias.detach())
    torch.testing.assert_close(linear.bias.grad, (2 * expected).sum((0, 1)), rtol=1e-5, atol=1e-5)
    with fp8.keep_dequantized_weights():  # even in a recomputation: a backward that never reads it
        _, sizes = saved_bytes(lambda: linear(x))
    assert max(sizes, default=0) <= 4  # nothing weight-sized (a 6 x 8 weight is 48 bytes in fp8)
    with fp8.keep_dequantized_weights():
        _, sizes = saved_bytes(lambda: linear(x.requires_grad_(True)))
    assert 6 * 8 * 4 in sizes  # with an input gradient, the recomputation's fp32 weight is kept


def test_under_autocast_an_fp8_linear_dequantizes_to_the_autocast_dtype_not_the_inputs():
    torch.manual_seed(0)
    linear = fp8.make_fp8_linear(nn.Linear(8, 6), scaled=True)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), fp8.keep_dequantized_weights():
        out, sizes = saved_bytes(lambda: linear(x))
    assert out.dtype == torch.bfloat16 and 6 * 8 * 2 in sizes and 6 * 8 * 4 not in sizes  # a bf16 weight, no fp32
    grad = torch.randn(3, 6).bfloat16()
    out.backward(grad)
    w = (linear.weight.float() * linear.weight_scale[:, None]).bfloat16()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, (grad @ w).float())  # computed in bf16


def test_matmul_plus_adds_its_addend_and_the_bytes_count_what_the_weights_take():
    torch.manual_seed(0)
    linear = fp8.make_fp8_linear(nn.Linear(8, 6), scaled=True)
    x, addend = torch.randn(2, 3, 8), torch.randn(2, 3, 6)
    w = linear.weight.float() * linear.weight_scale[:, None]
    torch.testing.assert_close(fp8.fp8_matmul_plus(linear, x, addend), x @ w.t() + addend, rtol=1e-6, atol=1e-6)
    model = random_model(tiny_flux_params(), seed=1).to(torch.bfloat16)
    now, fp32 = fp8.fp8_weight_bytes(model)
    assert now > 0 and fp32 == 2 * now  # bf16 weights: half of what fp32 would take
    assert fp8.fp8_weight_bytes(fp8.quantize_dit_(model, torch.bfloat16)) == (now // 2, fp32)


def test_the_bias_goes_inside_the_addend():
    linear = fp8.make_fp8_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="give the bias inside the addend"):
        fp8._Fp8Linear.apply(torch.randn(2, 4), linear.weight, None, linear.bias, torch.float32, torch.zeros(2, 4))


def test_converting_between_scaled_and_plain_fp8_starts_from_the_dequantized_values():
    torch.manual_seed(0)
    source = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        source.weight.mul_(torch.tensor([[0.01], [0.1], [1.0], [10.0]]))
    scaled = fp8.make_fp8_linear(source, scaled=True)
    values = scaled.weight.float() * scaled.weight_scale[:, None]
    plain = fp8.make_fp8_linear(scaled, scaled=False)
    assert "weight_scale" not in plain._buffers and not hasattr(plain, "weight_scale")
    assert torch.equal(plain.weight.view(torch.uint8), values.to(FP8).view(torch.uint8))
    torch.testing.assert_close(plain(torch.eye(16)), values.to(FP8).float().t(), rtol=0, atol=0)


def test_quantize_dit_keeps_the_row_scales_in_fp32():
    model = fp8.quantize_dit_(random_model(tiny_flux_params(), seed=1), torch.bfloat16, scaled=True)
    scales = {m.weight_scale.dtype for _, m in fp8.block_linears(model)}
    assert scales == {torch.float32} and model.img_in.weight.dtype == torch.bfloat16


def write_dit(path, block_dtypes, other=torch.bfloat16):
    tensors = {f"double_blocks.{i}.img_attn.qkv.weight": torch.ones(2, 2).to(d) for i, d in enumerate(block_dtypes)}
    save_safetensors({**tensors, "img_in.weight": torch.ones(2, 2).to(other)}, path)
    return str(path)


def test_only_a_dit_whose_block_weights_are_all_fp8_loads_as_stored(tmp_path):
    assert fp8.dit_load_dtype(write_dit(tmp_path / "a.safetensors", [FP8, FP8]), torch.bfloat16) is None
    mixed = write_dit(tmp_path / "b.safetensors", [FP8, torch.bfloat16])
    assert fp8.dit_load_dtype(mixed, torch.bfloat16) == torch.bfloat16
    no_blocks = write_dit(tmp_path / "c.safetensors", [], other=FP8)
    assert fp8.dit_load_dtype(no_blocks, torch.float16) == torch.float16


def test_store_linears_in_fp8_uses_the_fp8_dtype_asked_for_and_keeps_t5s_activations_wide(tmp_path):
    from library.text_encoders import _gated_ff_forward_fp8, load_t5xxl
    from library.tiny_text_encoders import write_tiny_t5

    encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    fp8.store_linears_in_fp8(encoder, torch.float8_e5m2)
    assert encoder[0].weight.dtype == torch.float8_e5m2 and encoder[1].weight.dtype == torch.float32
    write_tiny_t5(tmp_path / "t5.safetensors")
    t5 = fp8.store_linears_in_fp8(load_t5xxl(str(tmp_path / "t5.safetensors"), torch.float32, "cpu"))
    ff = [block.layer[-1].DenseReluDense for block in t5.encoder.block]
    assert ff and all(f.wo.weight.dtype == FP8 and f.forward.__func__ is _gated_ff_forward_fp8 for f in ff)
    hidden = torch.randn(1, 3, ff[0].wi_0.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # wo's input is not rounded to fp8 first
        wide = ff[0].wo(ff[0].act(ff[0].wi_0(hidden)) * ff[0].wi_1(hidden))
        assert torch.equal(ff[0](hidden), wide)


# ---- ComfyUI's layouts -----------------------------------------------------------------------------------


def quantization_metadata(layers):
    return {"_quantization_metadata": json.dumps({"layers": layers})}


def test_malformed_quantization_metadata_lists_no_layers():
    for layers in ([], "x", {"a": "float8_e4m3fn"}, None):
        assert comfy_fp8.metadata_layers(quantization_metadata(layers)) == {}
    assert comfy_fp8.metadata_layers({"_quantization_metadata": "{"}) == {}
    assert comfy_fp8.metadata_layers(quantization_metadata({"a": {"format": "float8_e5m2"}})) == {"a": "float8_e5m2"}


@pytest.mark.parametrize("keys, metadata, expected", [
    (["scaled_fp8", "a.weight"], None, True),
    (["model.diffusion_model.scaled_fp8", "a.weight"], None, True),
    (["a.weight", "a.scale_weight"], None, True),
    (["a.weight", "a.weight_scale", "a.comfy_quant"], None, True),
    (["a.weight", "a.weight_scale"], quantization_metadata({"a": {"format": "float8_e4m3fn"}}), True),
    (["a.weight", "a.weight_scale"], None, False),  # this project's own per-row scaled fp8
], ids=["marker", "prefixed-marker", "scale_weight", "comfy_quant", "metadata", "own-scaled"])  # fmt: skip
def test_each_comfy_marker_alone_is_recognised(keys, metadata, expected):
    assert comfy_fp8.is_comfy_scaled_fp8(keys, metadata) is expected


def test_scale_keys_are_comfys_and_never_this_projects_own_row_scales():
    keys = [
        "a.weight",
        "a.weight_scale",
        "a.input_scale",
        "a.comfy_quant",
        "b.weight",
        "b.weight_scale",
        "b.input_scale",
        "c.weight",
        "c.scale_weight",
        "c.scale_input",
        "d.weight",
        "d.weight_scale",
    ]
    metadata = quantization_metadata({"b": {"format": "float8_e4m3fn"}})
    assert comfy_fp8.comfy_scale_keys(keys, metadata) == {
        "a.weight_scale", "a.input_scale", "a.comfy_quant", "b.weight_scale", "b.input_scale", "c.scale_weight",
        "c.scale_input"}  # fmt: skip
    scale_of = {k: comfy_fp8.comfy_weight_scale_key(k, keys, metadata) for k in keys if k.endswith(".weight")}
    assert scale_of == {"a.weight": "a.weight_scale", "b.weight": "b.weight_scale", "c.weight": "c.scale_weight",
                        "d.weight": None}  # fmt: skip


def test_dequantizing_drops_every_marker_and_scale_and_applies_each_scale_once():
    w = torch.tensor([[1.0, -2.0]]).to(FP8)
    sd = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=FP8), "a.weight": w,
          "a.scale_weight": torch.tensor(0.5), "a.scale_input": torch.tensor(1.0),
          "b.weight": w, "b.weight_scale": torch.tensor(4.0), "b.input_scale": torch.tensor(1.0),
          "b.comfy_quant": torch.tensor(list(b'{"format": "float8_e5m2"}'), dtype=torch.uint8),
          "c.weight": torch.tensor([[3.0]]), "e.scale_weight": torch.tensor(2.0)}  # fmt: skip
    metadata = quantization_metadata({"elsewhere": {"format": "nvfp4"}})  # a layer of another shard: not read here
    out = comfy_fp8.dequantize_comfy_scaled_fp8(sd, torch.float32, "dit.safetensors", metadata)
    assert sorted(out) == ["a.weight", "b.weight", "c.weight"]  # e's scale dropped: its weight is in another shard
    assert out["a.weight"].tolist() == [[0.5, -1.0]] and out["b.weight"].tolist() == [[4.0, -8.0]]
    assert out["c.weight"].tolist() == [[3.0]]


@pytest.mark.parametrize("marker, scale, fmt", [
    (b'{"format": "float8_e4m3fn"}', torch.ones(2), "float8_e4m3fn"),  # block (per-row) scales
    (b"not json", torch.tensor(1.0), "an unreadable format"),
], ids=["per-row-scale", "unreadable"])  # fmt: skip
def test_other_comfy_layouts_stop_naming_the_file_and_the_layer(marker, scale, fmt):
    sd = {"a.weight": torch.ones(2, 2).to(FP8), "a.weight_scale": scale,
          "a.comfy_quant": torch.tensor(list(marker), dtype=torch.uint8)}  # fmt: skip
    with pytest.raises(CheckpointError) as error:
        comfy_fp8.dequantize_comfy_scaled_fp8(sd, torch.float32, "dit.safetensors")
    assert str(error.value) == (f"dit.safetensors: a is quantized as {fmt} (ComfyUI's quantized layout), which this "
                                "trainer does not read; give a bf16, fp16 or fp8 file")  # fmt: skip
