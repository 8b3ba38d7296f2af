"""The tiny-model generator writes every real format, and each file loads through the user-facing loaders."""

import subprocess
import sys

import torch

from library.flux_utils import load_ae, load_clip_l, load_flow_model, load_t5xxl
from library.safetensors_io import read_keys
from library.text_encoders import FluxTextEncodingStrategy
from library.tiny_models import write_tiny_models
from library.tokenizers_flux import FluxTokenizeStrategy


def test_generated_files_load_and_run_together(tmp_path):
    files = write_tiny_models(str(tmp_path))
    assert any(k.startswith("text_model.") for k in read_keys(files.clip_l))
    assert "shared.weight" in read_keys(files.t5xxl)
    assert not any(k.startswith("model.diffusion_model.") for k in read_keys(files.flux_dev))

    is_schnell, dev = load_flow_model(files.flux_dev, torch.float32, "cpu")
    assert not is_schnell and dev.params.guidance_embed
    assert load_flow_model(files.flux_schnell, torch.float32, "cpu")[0]
    _, chroma = load_flow_model(files.chroma, torch.float32, "cpu", model_type="chroma")
    ae = load_ae(files.ae, torch.float32, "cpu")
    clip = load_clip_l(files.clip_l, torch.float32, "cpu")
    t5 = load_t5xxl(files.t5xxl, torch.float32, "cpu")

    tokenizer = FluxTokenizeStrategy(16, files.tokenizer_cache_dir)
    tokens = tokenizer.tokenize(["a red circle", "a dog"])
    l_pooled, t5_out, txt_ids, mask = FluxTextEncodingStrategy(True).encode_tokens(tokenizer, [clip, t5], tokens)
    assert l_pooled.shape == (2, dev.params.vec_in_dim) and t5_out.shape == (2, 16, dev.params.context_in_dim)

    from library.flux_utils import pack_latents, prepare_img_ids

    with torch.no_grad():
        latents = ae.encode(torch.zeros(2, 3, 32, 48))
        assert latents.shape == (2, 16, 4, 6)
        img, ids = pack_latents(latents), prepare_img_ids(2, 2, 3)
        common = dict(img=img, img_ids=ids, txt=t5_out, txt_ids=txt_ids, timesteps=torch.tensor([0.5, 0.5]))
        out = dev(**common, y=l_pooled, guidance=torch.tensor([3.5, 3.5]), txt_attention_mask=mask)
        assert out.shape == img.shape and torch.isfinite(out).all()
        out = chroma(**common, txt_attention_mask=mask)
        assert out.shape == img.shape and torch.isfinite(out).all()


def test_command_line_writes_the_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "library.tiny_models", str(tmp_path / "m")],
                            capture_output=True, text=True, check=True)
    for name in ("flux1-dev", "flux1-schnell", "chroma", "ae", "clip_l", "t5xxl"):
        assert (tmp_path / "m" / f"{name}.safetensors").is_file()
        assert f"{name}.safetensors" in result.stdout
    assert (tmp_path / "m" / "tokenizers" / "openai_clip-vit-large-patch14").is_dir()
    assert (tmp_path / "m" / "tokenizers" / "google_t5-v1_1-xxl").is_dir()
