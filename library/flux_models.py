"""The FLUX.1 DiT (dev, schnell, pruned variants), with hyper-parameters read from a state dict.

Module and parameter names are Black Forest Labs' (``src/flux/model.py``), so a BFL
checkpoint loads with ``load_state_dict`` as is. The AutoEncoder lives in
``library/flux_ae.py`` and Chroma in ``library/chroma_models.py``; both are re-exported here
for code written against sd-scripts' ``flux_models`` module.

The block loop also drives block swapping (``enable_block_swap``, ``library/offloading.py``) and
gradient checkpointing (cpu-offloaded, or keeping attention outputs); ``training_flops`` counts a
LoRA step's model FLOPs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from library.flux_ae import AutoEncoder, AutoEncoderParams  # noqa: F401  (sd-scripts' import path)
from library.flux_attention import FUSED_ATTENTION_OPS, without_hidden_text
from library.flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)
from library.fp8 import keep_dequantized_weights
from library.offloading import ModelOffloader, move_to_device_except_swapped, swap_split


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


configs = {"dev": FluxParams(guidance_embed=True), "schnell": FluxParams(guidance_embed=False)}


class Flux(nn.Module):
    """Flow-matching transformer on packed latent patches."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden size {params.hidden_size} is not divisible by {params.num_heads} heads")
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head dim {params.head_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.checkpoint_keep_attention = False
        self.compiled_block_call = None  # set by compile_blocks
        self.offloaders: tuple[ModelOffloader, ModelOffloader] | None = None

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def enable_gradient_checkpointing(
        self, cpu_offload: bool | None = None, keep_attention: bool | None = None
    ) -> None:
        """Recompute each block in backward. ``cpu_offload`` keeps the block inputs it saves on the
        CPU; ``keep_attention`` also keeps each block's attention output (and its softmax statistics),
        so that the recompute skips the attention kernel, the costliest part of a block to redo, for
        one (tokens x hidden) activation per block. None: as set before, by this call or by the
        attributes ``cpu_offload_checkpointing`` and ``checkpoint_keep_attention``."""
        self.gradient_checkpointing = True
        if cpu_offload is not None:
            self.cpu_offload_checkpointing = cpu_offload
        if keep_attention is not None:
            self.checkpoint_keep_attention = keep_attention
        if self.cpu_offload_checkpointing and self.checkpoint_keep_attention:
            raise ValueError("keeping attention outputs on the device defeats cpu-offloaded checkpointing: use one")

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.checkpoint_keep_attention = False

    def compile_blocks(self, backend: str = "inductor") -> None:
        """Runs every block through one ``torch.compile``d :func:`call_block`, checkpointing included.

        The blocks are left as they are (class, parameter names and LoRA hooks), and blocks of one
        kind share their graphs. Shapes are symbolic from the start: aspect-ratio buckets change the
        token count and a last short batch the batch size, and with shapes specialised first each
        change recompiles every variant again, soon past dynamo's recompile limit, after which
        blocks run uncompiled. With blocks swapped, checkpointing runs outside the graphs (see
        :meth:`_run`)."""
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.compiled_block_call = torch.compile(call_block, backend=backend, dynamic=True)

    # ---- block swapping (library/offloading.py) ---------------------------------------------------

    def enable_block_swap(
        self, num_blocks: int, device: str | torch.device, *, record: bool = False, simulate: bool = False
    ) -> tuple[int, int]:
        """Swap ``num_blocks`` units (sd-scripts' ``--blocks_to_swap``); returns (double, single) swapped.

        Call :meth:`move_to_device_except_swap_blocks` next to place the model.
        """
        if self.cpu_offload_checkpointing:
            raise ValueError("block swapping cannot be combined with cpu-offloaded checkpointing")
        double, single = swap_split(num_blocks, len(self.double_blocks), len(self.single_blocks))
        kw = dict(record=record, simulate=simulate)
        self.offloaders = (
            ModelOffloader("double", self.double_blocks, double, device, **kw),
            ModelOffloader("single", self.single_blocks, single, device, **kw),
        )
        return double, single

    def move_to_device_except_swap_blocks(self, device: str | torch.device) -> None:
        """``self.to(device)``, except the weights of the blocks that start on the host."""
        if self.offloaders is None:
            self.to(device)
        else:
            move_to_device_except_swapped(self, list(self.offloaders), device)

    def prepare_block_swap_before_forward(self) -> None:
        """Restores the layout a forward expects; ``forward`` calls it itself (kept for sd-scripts' callers)."""
        for offloader in self.offloaders or ():
            offloader.prepare_block_swap_before_forward()

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """img (B, L_img, 64) packed latents; txt (B, L_txt, 4096); timesteps σ in [0, 1]; y (B, 768)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (batch, tokens, channels) tensors")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this is a guidance-distilled (dev) model: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(vec.dtype))
        vec = vec + self.vector_in(y)
        txt, txt_ids, attn_mask = without_hidden_text(txt, txt_ids, txt_attention_mask, img.shape[1],
                                                      compiled=self.compiled_block_call is not None)  # fmt: skip
        txt = self.txt_in(txt)

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        self.prepare_block_swap_before_forward()
        for i in range(len(self.double_blocks)):
            img, txt = self._run(0, i, img, txt, vec, pe, attn_mask)
        x = torch.cat((txt, img), dim=1)
        for i in range(len(self.single_blocks)):
            x = self._run(1, i, x, vec, pe, attn_mask, None, self._single_output_from(i, txt))
        img = x[:, -img.shape[1] :].to(self.device)
        return self.final_layer(img, vec)

    def _single_output_from(self, index: int, txt: Tensor) -> int:
        """Where single block ``index`` starts its output: after the text tokens in the last block
        (the final layer reads the image tokens only), at the first token in the others."""
        return txt.shape[1] if index == len(self.single_blocks) - 1 else 0

    def _run(self, kind: int, index: int, *args):
        """Block ``index`` of the double (kind 0) or single (kind 1) blocks, with checkpointing,
        cpu offloading of the saved inputs and block swapping as enabled.

        With blocks swapped, no compiled graph may be what autograd keeps for a block's backward:
        it keeps aliases of the block's weights, which holds every swapped block on the device
        until backward (FLUX.1 with 28 swapped: 34.6 GiB against 6.4 eager, on an H100) and, as the
        offloader copies later uploads into freed buffers, could read another block's weights.
        So compiled calls then run without grad or inside the eager recomputation, whose backward
        follows at once; keeping attention and training without checkpointing run eagerly (the
        trainer refuses both with ``--torch_compile``)."""
        block = (self.double_blocks, self.single_blocks)[kind][index]
        offloader = self.offloaders[kind] if self.offloaders else None
        if offloader is not None:
            offloader.wait_for_block(index)
        call = self.compiled_block_call or call_block
        call_kept_for_backward = call_block if offloader is not None else call  # see the docstring
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            args = _modulation_outside_checkpoint(block, kind, args)
            if self.cpu_offload_checkpointing:  # (never with block swapping)
                out = checkpoint(_run_on_device, call, block, self.device, *args, use_reentrant=False,
                                 context_fn=_recompute_contexts)  # fmt: skip
            elif self.checkpoint_keep_attention:
                out = call_kept_for_backward(block, "keep_attention", *args)
            elif offloader is not None:
                out = recompute_in_backward(call, block, *args)
            else:
                out = call(block, "recompute", *args)
        else:
            out = (call_kept_for_backward if torch.is_grad_enabled() else call)(block, None, *args)
        if offloader is not None:
            out = offloader.mark_for_backward(index, out)
            offloader.after_forward(index)
        return out


def _modulation_outside_checkpoint(block: nn.Module, kind: int, args: tuple) -> tuple:
    """A FLUX block's arguments with its modulation computed here, outside its checkpoint, and
    passed as Chroma passes its vectors. The modulation depends on ``vec`` alone, so its
    recomputation in backward would only read the modulation weights once more."""
    vec_at, vectors_at = (2, 5) if kind == 0 else (1, 4)  # DoubleStreamBlock / SingleStreamBlock.forward
    if args[vec_at] is None:  # Chroma: the vectors are given already
        return args
    args = list(args) + [None] * (vectors_at + 1 - len(args))
    args[vectors_at] = block.modulation_vectors(args[vec_at])
    args[vec_at] = None
    return tuple(args)


def offload_activation(x: Tensor) -> Tensor:
    """Where cpu-offloaded checkpointing keeps a block's output between blocks."""
    return x.to("cpu")


def call_block(block: nn.Module, checkpointing: str | None, *args):
    """``block(*args)``, under gradient checkpointing when asked: "recompute" (everything in
    backward) or "keep_attention" (everything but the attention kernels, whose outputs are kept).

    One function for both, so that ``torch.compile`` takes the checkpoint into the block's graph:
    the compiled backward then does the recomputation and follows the selective policy, which a
    compiled block inside an eager checkpoint cannot (the replay would not see the block's ops).
    """
    if checkpointing is None:
        return block(*args)
    if checkpointing == "keep_attention":
        # chosen here, where dynamo traces: the contexts are made later, during AOT autograd's
        # tracing, where torch < 2.13 reports no compilation (and asks for the two modes themselves)
        contexts = _keep_attention_modes if torch.compiler.is_compiling() else _keep_attention_contexts
        return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)
    if torch.compiler.is_compiling():
        # no context_fn argument at all here: dynamo cannot trace an explicit default one
        return checkpoint(block, *args, use_reentrant=False)
    return recompute_in_backward(call_block, block, *args)


def recompute_in_backward(call, block: nn.Module, *args):
    """``call(block, None, *args)`` (:func:`call_block` or its compiled form) checkpointed eagerly:
    the forward builds no graph and the backward runs the block again, with grad, before its own
    backward.

    torch's reentrant form, because the non-reentrant one hands every tensor the block's operators
    save (about 45 a block) through Python pack and unpack hooks: about 40% of a checkpointed
    step's host time, which on a fast GPU is time the GPU waits (``bench/RESULTS.md``). The
    reentrant form sends gradients to the parameters only through its backward, which runs only
    if one of its inputs needs a gradient, and fails there when none of its outputs does. A block
    none of whose inputs needs a gradient (the first behind frozen embedders, as in Chroma or with
    --network_train_unet_only), with or without a LoRA in it, takes the non-reentrant form: one
    block of a forward, whose hooks cost little."""
    if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return checkpoint(call, block, None, *args, use_reentrant=False, context_fn=_recompute_contexts)
    return checkpoint(_run_recomputed, call, block, *args, use_reentrant=True)


def _run_recomputed(call, block: nn.Module, *args):
    # the checkpoint's forward runs without grad, its recomputation with: only the latter keeps
    # fp8 weights dequantized for the backward that follows it
    with keep_dequantized_weights() if torch.is_grad_enabled() else contextlib.nullcontext():
        return call(block, None, *args)


def _recompute_contexts():
    """The recomputation keeps fp8 weights dequantized for the backward that follows it."""
    return contextlib.nullcontext(), keep_dequantized_weights()


def _keep_attention_modes():
    """Selective checkpointing: the recompute takes the fused attention kernels' outputs as kept."""
    return create_selective_checkpoint_contexts(_keep_attention_policy)


def _keep_attention_contexts():
    """:func:`_keep_attention_modes`, eager: the recompute also keeps fp8 weights dequantized for the
    backward that follows it."""
    forward, recompute = _keep_attention_modes()
    return forward, _entered_together(recompute, keep_dequantized_weights())


@contextlib.contextmanager
def _entered_together(first, second):
    with first, second:
        yield


def _keep_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in FUSED_ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _run_on_device(call, block: nn.Module, device: torch.device, *args):
    args = [a.to(device) if isinstance(a, Tensor) else a for a in args]
    out = call(block, None, *args)
    return tuple(offload_activation(o) for o in out) if isinstance(out, tuple) else offload_activation(out)


_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")


def block_counts(keys) -> tuple[int, int]:
    """(number of double blocks, number of single blocks) from BFL-format keys."""
    double = [int(m.group(1)) for k in keys if (m := _DOUBLE.match(k))]
    single = [int(m.group(1)) for k in keys if (m := _SINGLE.match(k))]
    return (max(double) + 1 if double else 0), (max(single) + 1 if single else 0)


def default_axes_dim(head_dim: int) -> list[int]:
    """BFL's [16, 56, 56] at head dim 128; the same proportions (1/4, 3/8, 3/8) elsewhere."""
    if head_dim == 128:
        return [16, 56, 56]
    if head_dim % 8:
        raise ValueError(f"head dim {head_dim} is not a multiple of 8: give axes_dim in the file's metadata")
    return [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]


def parse_axes_dim(metadata: dict[str, str] | None) -> list[int] | None:
    value = (metadata or {}).get("axes_dim")
    if value is None:
        return None
    return [int(v) for v in re.findall(r"\d+", value)]


def infer_flux_params(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> FluxParams:
    """FluxParams from the parameter shapes of a BFL-format state dict (no tensor data needed)."""
    hidden, in_channels = shapes["img_in.weight"]
    depth, depth_single = block_counts(shapes)
    if depth:
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
        qkv_bias = True
    else:
        raise ValueError("the state dict has neither double_blocks nor single_blocks")
    return FluxParams(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1] if "vector_in.in_layer.weight" in shapes else 0,
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=parse_axes_dim(metadata) or default_axes_dim(head_dim),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def training_flops(
    params: FluxParams,
    img_tokens: int,
    txt_tokens: int,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    lora_rank: int = 0,
    keep_attention: bool = False,
) -> float:
    """Model FLOPs of one LoRA training step with a frozen base: forward, backward and, with
    checkpointing, the blocks' second forward. Counted as torchtitan and landscape.md §2.4 do:
    2 FLOPs per multiply-add; a token goes through one stream of each double block; attention is
    4·L²·hidden forward and twice that backward; a frozen Linear needs only its input gradient
    (1x its forward); a LoRA on each block Linear costs 3x its forward (input and weight
    gradients). The per-sample modulation Linears are counted; Chroma's approximator is not.
    ``keep_attention``: checkpointing keeps the attention outputs, so the recompute has no attention.
    Every token is counted in every block, though the last single block skips the text tokens'
    queries, MLP and output projection (0.1% of FLUX.1's FLOPs at 1024², 0.3% at 512²): the nominal count.
    """
    h, mlp = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    tokens = img_tokens + txt_tokens
    stream = [(h, 3 * h), (h, h), (h, mlp), (mlp, h)]  # (in, out) of each Linear a token passes
    single = [(h, 3 * h + mlp), (h + mlp, h)]
    modulated = not hasattr(params, "approximator_depth")  # Chroma's blocks have no modulation Linears
    mods = [(h, 6 * h)] * 2 * params.depth + [(h, 3 * h)] * params.depth_single_blocks if modulated else []

    def matmul(shapes, n):
        return sum(2 * i * o * n for i, o in shapes)

    def lora(shapes, n):
        return sum(2 * lora_rank * (i + o) * n for i, o in shapes)

    base = params.depth * matmul(stream, tokens) + params.depth_single_blocks * matmul(single, tokens)
    base += matmul(mods, 1)
    adapters = params.depth * lora(stream, tokens) + params.depth_single_blocks * lora(single, tokens) + lora(mods, 1)
    attention = (params.depth + params.depth_single_blocks) * 4 * tokens**2 * h
    outside = matmul([(params.in_channels, h), (h, params.out_channels)], img_tokens)
    outside += matmul([(params.context_in_dim, h)], txt_tokens)
    forward = base + adapters + attention + outside
    backward = base + 2 * adapters + 2 * attention
    recompute = base + adapters + (0 if keep_attention else attention) if gradient_checkpointing else 0
    return float(batch_size * (forward + backward + recompute))


def __getattr__(name: str):
    # Chroma imports this module, so re-export it lazily to avoid an import cycle.
    if name in ("Chroma", "ChromaParams"):
        from library import chroma_models

        return getattr(chroma_models, name)
    raise AttributeError(name)
