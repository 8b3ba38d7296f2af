"""Tiny random FLUX.1 / Chroma model files in the real checkpoint formats, for tests and the demo.

``python -m library.tiny_models DIR`` writes into DIR:

- ``flux1-dev.safetensors``, ``flux1-schnell.safetensors``, ``chroma.safetensors`` (BFL keys),
- ``ae.safetensors``, ``clip_l.safetensors`` (``text_model.*`` keys), ``t5xxl.safetensors``,
- ``tokenizers/`` laid out as ``--tokenizer_cache_dir`` expects.

They load through exactly the code that loads users' 24 GB files.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from library.chroma_models import Chroma, ChromaParams
from library.flux_ae import AutoEncoder, AutoEncoderParams
from library.flux_models import Flux, FluxParams
from library.safetensors_io import save_safetensors

TINY_T5_DIM = 32
TINY_CLIP_DIM = 32


def tiny_flux_params(guidance_embed: bool = True, depth: int = 2, depth_single: int = 2, **overrides) -> FluxParams:
    """hidden 64, 4 heads of 16 (RoPE axes [4, 6, 6]), text widths matching the tiny encoders."""
    values = dict(
        in_channels=64,
        out_channels=64,
        vec_in_dim=TINY_CLIP_DIM,
        context_in_dim=TINY_T5_DIM,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=4,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=[4, 6, 6],
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )
    values.update(overrides)
    return FluxParams(**values)


def tiny_chroma_params(depth: int = 2, depth_single: int = 2, **overrides) -> ChromaParams:
    base = tiny_flux_params(guidance_embed=False, depth=depth, depth_single=depth_single).__dict__
    values = dict(base, vec_in_dim=0, approximator_in_dim=64, approximator_depth=2, approximator_hidden_size=64)
    values.update(overrides)
    return ChromaParams(**values)


def tiny_ae_params(**overrides) -> AutoEncoderParams:
    """Four levels (so 8x downsampling as the real AE), widths 32 and 64 (GroupNorm needs multiples of 32)."""
    values = dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)
    values.update(overrides)
    return AutoEncoderParams(**values)


def randomize_(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Fills every parameter with seeded noise; norm scales stay near 1 so activations stay sane."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            is_scale = name.endswith(".scale") or (p.ndim == 1 and ("norm" in name and name.endswith("weight")))
            p.copy_(1.0 + noise if is_scale else noise)
    return model


def random_model(params, seed: int = 0) -> nn.Module:
    """A randomly initialised Flux, Chroma or AutoEncoder for the given params."""
    cls = {FluxParams: Flux, ChromaParams: Chroma, AutoEncoderParams: AutoEncoder}[type(params)]
    return randomize_(cls(params), seed).eval()


@dataclass
class TinyModelFiles:
    folder: str
    flux_dev: str
    flux_schnell: str
    chroma: str
    ae: str
    clip_l: str
    t5xxl: str
    tokenizer_cache_dir: str
    extra: dict = field(default_factory=dict)


def write_model(model: nn.Module, path: str, metadata: dict[str, str] | None = None) -> str:
    save_safetensors(model.state_dict(), path, metadata=metadata)
    return path


def write_tiny_models(folder: str, seed: int = 0) -> TinyModelFiles:
    """Writes every tiny model file into ``folder`` and returns their paths."""
    from library.tiny_text_encoders import write_tiny_clip_l, write_tiny_t5
    from library.tokenizers_flux import write_tiny_tokenizers

    os.makedirs(folder, exist_ok=True)
    tokenizer_dir = os.path.join(folder, "tokenizers")
    clip_vocab, t5_vocab = write_tiny_tokenizers(tokenizer_dir)
    files = TinyModelFiles(
        folder=folder,
        flux_dev=write_model(random_model(tiny_flux_params(True), seed), os.path.join(folder, "flux1-dev.safetensors")),
        flux_schnell=write_model(
            random_model(tiny_flux_params(False), seed + 1), os.path.join(folder, "flux1-schnell.safetensors")
        ),
        chroma=write_model(random_model(tiny_chroma_params(), seed + 2), os.path.join(folder, "chroma.safetensors")),
        ae=write_model(random_model(tiny_ae_params(), seed + 3), os.path.join(folder, "ae.safetensors")),
        clip_l=os.path.join(folder, "clip_l.safetensors"),
        t5xxl=os.path.join(folder, "t5xxl.safetensors"),
        tokenizer_cache_dir=tokenizer_dir,
    )
    write_tiny_clip_l(files.clip_l, hidden=TINY_CLIP_DIM, vocab=clip_vocab, seed=seed + 4)
    write_tiny_t5(files.t5xxl, d_model=TINY_T5_DIM, vocab=t5_vocab, seed=seed + 5)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where to write the tiny model files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    files = write_tiny_models(args.folder, args.seed)
    for name, path in files.__dict__.items():
        if name not in ("folder", "extra"):
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
