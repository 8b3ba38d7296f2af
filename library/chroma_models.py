"""Chroma: FLUX.1-schnell's transformer with the per-block modulation Linears replaced by one
"approximator" MLP (``distilled_guidance_layer``) that produces every modulation vector.

The approximator maps [emb(σ) | emb(guidance) | emb(k)] to vector k, one row per modulated
quantity. The rows are laid out in this fixed order: single blocks (shift, scale, gate), double
blocks' image stream (2 triples), double blocks' text stream (2 triples), final layer
(shift, scale): 344 vectors at full depth. Chroma attends over the T5 tokens up to and
including the first padding token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from library.flux_attention import without_hidden_text
from library.flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)
from library.flux_models import Flux, FluxParams, block_counts, default_axes_dim, parse_axes_dim

CHROMA_ATTN_PADDING = 1


@dataclass
class ChromaParams(FluxParams):
    vec_in_dim: int = 0
    approximator_in_dim: int = 64
    approximator_depth: int = 5
    approximator_hidden_size: int = 5120

    @property
    def mod_index_length(self) -> int:
        return 3 * self.depth_single_blocks + 2 * 6 * self.depth + 2


class Approximator(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


class Chroma(Flux):
    """Same call signature as :class:`Flux`, plus optional precomputed ``mod_vectors``."""

    def __init__(self, params: ChromaParams):
        nn.Module.__init__(self)
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.distilled_guidance_layer = Approximator(
            params.approximator_in_dim, self.hidden_size, params.approximator_hidden_size, params.approximator_depth
        )
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias, modulated=False)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, modulated=False)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels, modulated=False)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.checkpoint_keep_attention = False
        self.compiled_block_call = None
        self.offloaders = None

    @torch.no_grad()
    def get_mod_vectors(self, timesteps: Tensor, guidance: Tensor | None, batch_size: int) -> Tensor:
        """All modulation vectors (B, mod_index_length, hidden). No gradient: the approximator is frozen."""
        quarter = self.params.approximator_in_dim // 4
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        time_and_guidance = torch.cat(
            [timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)], dim=-1
        )
        n = self.params.mod_index_length
        index = timestep_embedding(torch.arange(n, device=timesteps.device), 2 * quarter)
        rows = torch.cat(
            [time_and_guidance[:, None, :].expand(batch_size, n, -1), index[None].expand(batch_size, n, -1)], dim=-1
        )
        return self.distilled_guidance_layer(rows.to(self.img_in.weight.dtype))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor | None = None,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
        mod_vectors: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`Flux.forward`; ``y`` is ignored (Chroma has no CLIP), the T5 mask is required."""
        if txt_attention_mask is None:
            raise ValueError("Chroma needs the T5 attention mask (--apply_t5_attn_mask)")
        if mod_vectors is None:
            mod_vectors = self.get_mod_vectors(timesteps, guidance, img.shape[0])
        mod_vectors = mod_vectors.to(img.dtype)
        n_single, n_double = self.params.depth_single_blocks, self.params.depth
        img_offset = 3 * n_single
        txt_offset = img_offset + 6 * n_double

        txt, txt_ids, attn_mask = without_hidden_text(txt, txt_ids, txt_attention_mask, img.shape[1],
                                                      CHROMA_ATTN_PADDING, self.compiled_block_call is not None)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        self.prepare_block_swap_before_forward()
        for i in range(len(self.double_blocks)):
            img_vectors = mod_vectors[:, img_offset + 6 * i : img_offset + 6 * (i + 1)]
            txt_vectors = mod_vectors[:, txt_offset + 6 * i : txt_offset + 6 * (i + 1)]
            block_vectors = torch.cat((img_vectors, txt_vectors), dim=1)
            img, txt = self._run(0, i, img, txt, None, pe, attn_mask, block_vectors)
        x = torch.cat((txt, img), dim=1)
        for i in range(len(self.single_blocks)):
            block_vectors = mod_vectors[:, 3 * i : 3 * (i + 1)]
            x = self._run(1, i, x, None, pe, attn_mask, block_vectors, self._single_output_from(i, txt))
        img = x[:, -img.shape[1] :].to(self.device)
        return self.final_layer(img, None, mod_vectors[:, -2:])


def is_chroma_state_dict(keys) -> bool:
    return any(k.startswith("distilled_guidance_layer.") for k in keys)


def infer_chroma_params(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> ChromaParams:
    """ChromaParams from the parameter shapes of a Chroma state dict."""
    hidden, in_channels = shapes["img_in.weight"]
    depth, depth_single = block_counts(shapes)
    if depth:
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
    else:
        head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
    approximator_hidden, approximator_in = shapes["distilled_guidance_layer.in_proj.weight"]
    approximator_depth = len({k.split(".")[2] for k in shapes if k.startswith("distilled_guidance_layer.layers.")})
    return ChromaParams(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=parse_axes_dim(metadata) or default_axes_dim(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes or not depth,
        guidance_embed=False,
        approximator_in_dim=approximator_in,
        approximator_depth=approximator_depth,
        approximator_hidden_size=approximator_hidden,
    )
