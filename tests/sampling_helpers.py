"""Stand-ins for the sampler tests: a deterministic text encoder, a velocity model and an AE."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from library.tiny_models import TINY_CLIP_DIM, TINY_T5_DIM

TXT_LEN = 8


def fake_encoder(chroma: bool = False):
    """Deterministic per-text stand-in for CLIP-L + T5; records the batches it was asked for."""
    calls: list[list[str]] = []

    def encode(texts: list[str]):
        calls.append(list(texts))
        pooled, t5, masks = [], [], []
        for text in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
            pooled.append(torch.zeros(77, 1) if chroma else torch.randn(TINY_CLIP_DIM, generator=g))
            t5.append(torch.randn(TXT_LEN, TINY_T5_DIM, generator=g))
            n = min(TXT_LEN, 1 + len(text.split()))
            masks.append((torch.arange(TXT_LEN) < n).long())
        t5_out = torch.stack(t5)
        return [torch.stack(pooled), t5_out, torch.zeros(len(texts), TXT_LEN, 3), torch.stack(masks)]

    encode.calls = calls
    return encode


class ToyVelocity(nn.Module):
    """A DiT stand-in whose velocity is txt[:, 0, 0] everywhere; records each call's inputs."""

    def __init__(self, consume_rng: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []
        self.consume_rng = consume_rng

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None):
        self.calls.append(
            dict(
                batch=img.shape[0],
                t=timesteps.clone(),
                guidance=guidance.clone(),
                mask=txt_attention_mask,
                txt=txt.clone(),
                training=self.training,
            )
        )
        if self.consume_rng:
            torch.rand(3)  # like dropout would, if it were on
        return txt[:, :1, :1].expand_as(img) + 0 * self.weight


class ToyAE(nn.Module):
    """An AE stand-in that decodes by 8x nearest upsampling of three latent channels: fast and exact."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def decode(self, z):
        return torch.tanh(z[:, :3]).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3) + 0 * self.weight
