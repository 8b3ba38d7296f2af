"""The FLUX autoencoder (``ae.safetensors``; shared by dev, schnell and Chroma), BFL's key names.

``encoder(x)`` returns the posterior's moments (mean, log-variance), ``encode(x)`` samples the
posterior and applies the latent scale and shift, ``decode(z)`` takes such scaled latents.
GroupNorm uses 32 groups as in BFL's code (the count is not stored in the file), so every
width must be a multiple of 32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

NORM_GROUPS = 32


@dataclass
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c").contiguous() for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width, c=c, b=b)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        block_out = p.ch
        for level, mult in enumerate(p.ch_mult):
            block_in, block_out = p.ch * in_ch_mult[level], p.ch * mult
            down = nn.Module()
            down.block = nn.ModuleList(
                ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(p.num_res_blocks)
            )
            if level != len(p.ch_mult) - 1:
                down.downsample = Downsample(block_out)
            self.down.append(down)
        self.mid = MidBlock(block_out)
        self.norm_out = group_norm(block_out)
        self.conv_out = nn.Conv2d(block_out, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in)
        up_levels = []
        for level in reversed(range(len(p.ch_mult))):
            block_out = p.ch * p.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList(
                ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(p.num_res_blocks + 1)
            )
            block_in = block_out
            if level != 0:
                up.upsample = Upsample(block_in)
            up_levels.insert(0, up)  # keys count levels from the highest resolution
        self.up = nn.ModuleList(up_levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussian(nn.Module):
    def __init__(self, sample: bool = True, chunk_dim: int = 1):
        super().__init__()
        self.sample = sample
        self.chunk_dim = chunk_dim

    def forward(self, z: Tensor) -> Tensor:
        mean, logvar = torch.chunk(z, 2, dim=self.chunk_dim)
        if self.sample:
            std = torch.exp(0.5 * logvar)
            return mean + std * torch.randn_like(mean)
        return mean


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.reg = DiagonalGaussian()
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: Tensor, sample: bool = True) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, 16, H/8, W/8).

        ``sample=True`` draws from the posterior (BFL's behaviour); ``sample=False`` takes its mean,
        which the trainer uses so that latents do not depend on the RNG state or process count.
        """
        moments = self.encoder(x)
        z = self.reg(moments) if sample else torch.chunk(moments, 2, dim=1)[0]
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def infer_ae_params(shapes: dict[str, tuple[int, ...]]) -> AutoEncoderParams:
    """Widths and depths of an ``ae.safetensors``-format state dict."""
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = [shapes[f"encoder.down.{level}.block.0.conv1.weight"][0] // ch for level in levels]
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    params = AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=shapes["decoder.conv_out.weight"][0],
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=shapes["decoder.conv_in.weight"][1],
    )
    widths = {ch * m for m in ch_mult}
    if any(w % NORM_GROUPS for w in widths):
        raise ValueError(f"AE widths {sorted(widths)} must be multiples of {NORM_GROUPS} (GroupNorm groups)")
    return params


class PosteriorMeanEncoder:
    """The AE as the latent cache sees it: the posterior mean, so that cached latents are the same
    whatever the RNG state, the batch or the number of processes (sd-scripts samples the posterior)."""

    def __init__(self, ae):
        self.ae = ae

    @property
    def device(self):
        return self.ae.device

    @property
    def dtype(self):
        return self.ae.dtype

    def encode(self, images):
        return self.ae.encode(images, sample=False)
