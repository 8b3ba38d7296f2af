"""The FLUX.1 DiT (dev, schnell, pruned variants), with hyper-parameters read from a state dict.

Module and parameter names are Black Forest Labs' (``src/flux/model.py``), so a BFL
checkpoint loads with ``load_state_dict`` as is. The AutoEncoder lives in
``library/flux_ae.py`` and Chroma in ``library/chroma_models.py``; both are re-exported here
for code written against sd-scripts' ``flux_models`` module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from library.flux_ae import AutoEncoder, AutoEncoderParams  # noqa: F401  (sd-scripts' import path)
from library.flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    text_key_mask,
    timestep_embedding,
)


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

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

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
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attn_mask = text_key_mask(txt_attention_mask, img.shape[1])

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe, attn_mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, attn_mask)
        img = x[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


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


def __getattr__(name: str):
    # Chroma imports this module, so re-export it lazily to avoid an import cycle.
    if name in ("Chroma", "ChromaParams"):
        from library import chroma_models

        return getattr(chroma_models, name)
    raise AttributeError(name)
