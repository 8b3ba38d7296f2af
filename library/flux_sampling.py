"""The Euler flow sampler shared by training samples and ``flux_minimal_inference.py``.

Sampling integrates dx/dσ = v from pure noise at σ = 1 to the clean latent at σ = 0
(``library.flow_matching`` has the conventions). The σ grid is BFL's ``get_schedule``:
``linspace(1, 0, steps + 1)``, bent toward high noise by the resolution shift μ = lin(h·w)
for dev and Chroma, and left linear for schnell, as BFL's reference sampler does (sd-scripts
shifts schnell's training samples too).

Classifier-free guidance runs the negative and positive prompts as one batch [neg, pos] and
combines v = v_neg + cfg·(v_pos − v_neg); the embedded guidance (``--g``) feeds the DiT's
guidance input as usual. Chroma samples default to guidance 0 and CFG 4.0 with an empty
negative prompt (the settings sd-scripts' guide asks Chroma users to write on every prompt);
the T5 mask is always applied for Chroma.

Reproducibility: the initial noise comes from a CPU generator seeded with the prompt's seed, in
fp32, so a seed gives the same image on any device and dtype up to compute precision, and
sampling never draws from the global RNG. The Euler state is kept in fp32 while the DiT runs in
its own dtype. Training-time sampling also saves and restores the global RNG states anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor, nn

from library.flow_matching import euler_step, get_schedule
from library.flux_utils import prepare_img_ids, unpack_latents
from library.sample_prompts import SamplePrompt

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_STEPS = 20
DEFAULT_SAMPLE_SIZE = 512
MIN_SAMPLE_SIZE = 64
SIZE_MULTIPLE = 16  # 8x AE downsampling, then 2x2 patches
FLUX_DEFAULT_GUIDANCE = 3.5
CHROMA_DEFAULT_GUIDANCE = 0.0
CHROMA_DEFAULT_CFG = 4.0
LATENT_CHANNELS = 16

# list of texts -> [l_pooled, t5_out, txt_ids, t5_attn_mask], as FluxTextEncodingStrategy.encode_tokens
EncodePrompts = Callable[[list[str]], Sequence[Tensor | None]]


# region conditions and settings


@dataclass(frozen=True)
class TextConditions:
    """The DiT's text inputs for a batch of prompts: CLIP pooled, T5 states, their ids and mask."""

    l_pooled: Tensor | None
    t5_out: Tensor
    txt_ids: Tensor
    t5_attn_mask: Tensor | None = None

    @classmethod
    def from_outputs(cls, outputs: Sequence[Tensor | None]) -> TextConditions:
        """From ``[l_pooled, t5_out, txt_ids, t5_attn_mask]`` (the text-encoding strategy's output)."""
        l_pooled, t5_out, txt_ids, t5_attn_mask = outputs
        if t5_out is None:
            raise ValueError("sampling needs T5 outputs; the text encoder returned none")
        if txt_ids is None:
            txt_ids = torch.zeros(t5_out.shape[0], t5_out.shape[1], 3, device=t5_out.device)
        return cls(l_pooled, t5_out, txt_ids, t5_attn_mask)

    def __len__(self) -> int:
        return self.t5_out.shape[0]

    def select(self, i: int) -> TextConditions:
        """Prompt ``i`` of the batch, keeping a batch dimension of 1."""
        return TextConditions(*(None if t is None else t[i : i + 1] for t in self._tensors()))

    def to(self, device: torch.device | str | None, dtype: torch.dtype | None = None) -> TextConditions:
        """Moves to ``device``; floating tensors other than the ids also to ``dtype``. The mask keeps its type
        and goes to the host, where the DiT decides how much T5 padding to cut without waiting for the device."""

        def move(t: Tensor | None, cast: bool) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast and dtype is not None else t.dtype)

        l_pooled, t5_out, txt_ids, mask = self._tensors()
        return TextConditions(move(l_pooled, True), move(t5_out, True), move(txt_ids, False),
                              None if mask is None else mask.cpu())

    @staticmethod
    def cat(conds: Sequence[TextConditions]) -> TextConditions:
        """One batch from several; T5 lengths must match (the tokenizer pads to its full length)."""
        lengths = {c.t5_out.shape[1] for c in conds}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch prompts with different T5 lengths {sorted(lengths)}")
        fields = list(zip(*(c._tensors() for c in conds), strict=True))
        out = []
        for name, values in zip(("l_pooled", "t5_out", "txt_ids", "t5_attn_mask"), fields, strict=True):
            if all(v is None for v in values):
                out.append(None)
            elif any(v is None for v in values):
                raise ValueError(f"cannot batch prompts where only some have {name}")
            else:
                out.append(torch.cat(values, dim=0))
        return TextConditions(*out)

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return (self.l_pooled, self.t5_out, self.txt_ids, self.t5_attn_mask)


def floor_size(value: int) -> int:
    """Image side floored to a multiple of 16, at least 64 (as sd-scripts)."""
    return max(MIN_SAMPLE_SIZE, value - value % SIZE_MULTIPLE)


def random_seed() -> int:
    """A fresh seed for prompts without ``--d``, drawn without touching any seeded RNG."""
    return random.SystemRandom().randrange(2**32)


@dataclass(frozen=True)
class SampleSettings:
    """Everything that determines one image besides the models. Sizes are floored on creation."""

    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SAMPLE_SIZE
    height: int = DEFAULT_SAMPLE_SIZE
    steps: int = DEFAULT_SAMPLE_STEPS
    seed: int = 0
    guidance: float = FLUX_DEFAULT_GUIDANCE
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling needs at least 1 step, not {self.steps}")
        object.__setattr__(self, "width", floor_size(int(self.width)))
        object.__setattr__(self, "height", floor_size(int(self.height)))

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0


def resolve_sample_settings(prompt: SamplePrompt, model_type: str = "flux", seed: int | None = None) -> SampleSettings:
    """A prompt's settings with the model's defaults for what it leaves out.

    FLUX: 20 steps, 512×512, guidance 3.5, CFG 1.0 (sd-scripts' defaults). Chroma: guidance 0
    and CFG 4.0 with an empty negative prompt unless given. Without ``--d`` the seed is
    ``seed`` if given, else random.
    """
    chroma = model_type == "chroma"
    default_guidance = CHROMA_DEFAULT_GUIDANCE if chroma else FLUX_DEFAULT_GUIDANCE
    default_cfg = CHROMA_DEFAULT_CFG if chroma else 1.0
    if prompt.seed is not None:
        seed = prompt.seed
    elif seed is None:
        seed = random_seed()
    return SampleSettings(
        prompt=prompt.prompt,
        negative_prompt=prompt.negative_prompt or "",
        width=prompt.width if prompt.width is not None else DEFAULT_SAMPLE_SIZE,
        height=prompt.height if prompt.height is not None else DEFAULT_SAMPLE_SIZE,
        steps=prompt.sample_steps if prompt.sample_steps is not None else DEFAULT_SAMPLE_STEPS,
        seed=seed,
        guidance=prompt.guidance_scale if prompt.guidance_scale is not None else default_guidance,
        cfg_scale=prompt.cfg_scale if prompt.cfg_scale is not None else default_cfg,
    )


def texts_to_encode(prompts: Sequence[SamplePrompt], model_type: str = "flux") -> list[str]:
    """Every distinct positive and negative text the prompts will need, in first-seen order.

    The trainer encodes these with :func:`encode_texts` before it frees the text encoders.
    """
    texts: dict[str, None] = {}
    for p in prompts:
        settings = resolve_sample_settings(p, model_type, seed=0)
        texts[settings.prompt] = None
        if settings.use_cfg:
            texts[settings.negative_prompt] = None
    return list(texts)


def make_encode_prompts(tokenize_strategy: Any, encoding_strategy: Any, text_encoders: Sequence[Any]) -> EncodePrompts:
    """An :data:`EncodePrompts` from sd-scripts-style strategies: ``tokenize`` then ``encode_tokens``."""

    def encode(texts: list[str]) -> Sequence[Tensor | None]:
        with torch.no_grad():
            tokens = tokenize_strategy.tokenize(list(texts))
            return encoding_strategy.encode_tokens(tokenize_strategy, list(text_encoders), tokens)

    return encode


def encode_texts(texts: Sequence[str], encode_prompts: EncodePrompts) -> dict[str, TextConditions]:
    """Encodes each text on its own (small peak memory) and keeps the result on the CPU."""
    return {text: TextConditions.from_outputs(encode_prompts([text])).to("cpu") for text in dict.fromkeys(texts)}


def conditions_for(
    texts: Sequence[str],
    encode_prompts: EncodePrompts | None = None,
    cache: Mapping[str, TextConditions] | None = None,
) -> TextConditions:
    """A batch of conditions for ``texts``, from ``cache`` where present, else encoded."""
    cache = cache or {}
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing and encode_prompts is None:
        raise ValueError(f"no text encoder and no precomputed conditions for {missing[0]!r}")
    found = dict(cache)
    if missing:
        encoded = TextConditions.from_outputs(encode_prompts(missing))
        found.update({t: encoded.select(i) for i, t in enumerate(missing)})
    return TextConditions.cat([found[t].to(found[texts[0]].t5_out.device) for t in texts])


# endregion

# region sampling


def sampling_schedule(steps: int, width: int, height: int, shift: bool = True) -> list[float]:
    """The ``steps + 1`` σ values, 1 to 0, for an image of ``width × height`` pixels."""
    image_seq_len = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
    return get_schedule(steps, image_seq_len, shift=shift)


def make_noise(seed: int, width: int, height: int) -> Tensor:
    """The initial packed latent (1, (h/16)·(w/16), 64) in fp32, from a CPU generator seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
    return torch.randn(1, tokens, LATENT_CHANNELS * 4, generator=generator, dtype=torch.float32)


def combine_cfg(v_neg: Tensor, v_pos: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance: v_neg + cfg·(v_pos − v_neg)."""
    return v_neg + cfg_scale * (v_pos - v_neg)


@torch.no_grad()
def denoise(
    model: Callable[..., Tensor],
    img: Tensor,
    img_ids: Tensor,
    cond: TextConditions,
    timesteps: Sequence[float],
    guidance: float,
    *,
    neg_cond: TextConditions | None = None,
    cfg_scale: float = 1.0,
    apply_t5_attn_mask: bool = False,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler integration of the DiT's velocity over ``timesteps`` (σ from 1 to 0).

    ``img`` is the packed noise (B, L, 64); the state is kept in fp32 and the DiT is fed
    ``dtype`` (default: ``img``'s). With ``neg_cond``, each step runs [neg, pos] as one batch and
    combines the velocities with ``cfg_scale``. The T5 mask reaches the DiT only with
    ``apply_t5_attn_mask``. Returns the fp32 packed latent at σ = 0.
    """
    dtype = dtype or img.dtype
    batch = img.shape[0]
    x = img.float()
    if neg_cond is not None:
        cond = TextConditions.cat([neg_cond, cond])
        img_ids = torch.cat([img_ids, img_ids], dim=0)
    cond = cond.to(img.device, dtype)
    mask = cond.t5_attn_mask if apply_t5_attn_mask else None
    model_batch = len(cond)
    img_ids = img_ids.to(img.device)
    guidance_vec = torch.full((model_batch,), guidance, device=img.device, dtype=dtype)
    prepare_block_swap = getattr(model, "prepare_block_swap_before_forward", None)

    pairs = list(zip(timesteps[:-1], timesteps[1:], strict=True))
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, desc="sampling", leave=False)
    for t_curr, t_next in pairs:
        if prepare_block_swap is not None:
            prepare_block_swap()
        model_in = x.to(dtype)
        if neg_cond is not None:
            model_in = torch.cat([model_in, model_in], dim=0)
        pred = model(
            img=model_in,
            img_ids=img_ids,
            txt=cond.t5_out,
            txt_ids=cond.txt_ids,
            timesteps=torch.full((model_batch,), t_curr, device=img.device, dtype=dtype),
            y=cond.l_pooled,
            guidance=guidance_vec,
            txt_attention_mask=mask,
        ).float()
        if neg_cond is not None:
            v_neg, v_pos = pred[:batch], pred[batch:]
            pred = combine_cfg(v_neg, v_pos, cfg_scale)
        x = euler_step(x, pred, t_curr, t_next)
    return x


def model_compute_dtype(model: nn.Module, fallback: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype to feed a DiT: its weights' dtype, or ``fallback`` for fp8 weights."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else fallback


def generate_latents(
    model: nn.Module,
    settings: SampleSettings,
    cond: TextConditions,
    neg_cond: TextConditions | None = None,
    *,
    shift: bool = True,
    apply_t5_attn_mask: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Samples one image's latent (1, 16, H/8, W/8), fp32, ready for ``AutoEncoder.decode``.

    ``neg_cond`` is used only when ``settings.cfg_scale != 1``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or model_compute_dtype(model)
    h, w = settings.height // SIZE_MULTIPLE, settings.width // SIZE_MULTIPLE
    noise = make_noise(settings.seed, settings.width, settings.height).to(device)
    timesteps = sampling_schedule(settings.steps, settings.width, settings.height, shift=shift)
    x = denoise(
        model,
        noise,
        prepare_img_ids(1, h, w).to(device),
        cond,
        timesteps,
        settings.guidance,
        neg_cond=neg_cond if settings.use_cfg else None,
        cfg_scale=settings.cfg_scale,
        apply_t5_attn_mask=apply_t5_attn_mask,
        dtype=dtype,
        progress=progress,
    )
    return unpack_latents(x, h, w)


@torch.no_grad()
def decode_image(ae: nn.Module, latents: Tensor, device: torch.device | str | None = None) -> Image.Image:
    """Decodes a (1, 16, h, w) latent to an RGB image; the AE visits ``device`` and goes back."""
    ae_device = next(ae.parameters()).device
    device = torch.device(device) if device is not None else ae_device
    ae_dtype = next(ae.parameters()).dtype
    if ae_device != device:
        ae.to(device)
    try:
        pixels = ae.decode(latents.to(device, ae_dtype))
    finally:
        if ae_device != device:
            ae.to(ae_device)
    pixels = pixels[0].float()
    if not torch.isfinite(pixels).all():  # NaN would silently become a black image
        logger.warning("the image came out non-finite (NaN or inf; saved as black): the model or LoRA weights, or the "
                       "dtype, overflowed; try another LoRA file, a lower multiplier or bf16")  # fmt: skip
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@torch.no_grad()
def generate_image(
    model: nn.Module,
    ae: nn.Module,
    settings: SampleSettings,
    *,
    encode_prompts: EncodePrompts | None = None,
    conditions: Mapping[str, TextConditions] | None = None,
    model_type: str = "flux",
    is_schnell: bool = False,
    apply_t5_attn_mask: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    autocast: Callable[[], AbstractContextManager] | None = None,
    progress: bool = False,
) -> Image.Image:
    """One image for ``settings``: encode (or look up) the prompts, sample, decode.

    The schedule is shifted for dev and Chroma and linear for schnell; Chroma always gets the
    T5 mask. ``device`` defaults to the DiT's; the AE is moved there to decode and back.
    ``autocast`` is a context-manager factory (e.g. ``accelerator.autocast``).
    """
    # decode where the DiT runs (sd-scripts too), not where the AE waits (often the CPU)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    texts = [settings.negative_prompt, settings.prompt] if settings.use_cfg else [settings.prompt]
    batch = conditions_for(texts, encode_prompts, conditions)
    cond = batch.select(len(texts) - 1)
    neg_cond = batch.select(0) if settings.use_cfg else None
    chroma = model_type == "chroma"
    with autocast() if autocast is not None else contextlib.nullcontext():
        latents = generate_latents(
            model,
            settings,
            cond,
            neg_cond,
            shift=not is_schnell,
            apply_t5_attn_mask=apply_t5_attn_mask or chroma,
            device=device,
            dtype=dtype,
            progress=progress,
        )
        return decode_image(ae, latents, device)


# endregion

# region PNG files


def model_label(model_type: str, is_schnell: bool) -> str:
    return "chroma" if model_type == "chroma" else ("flux1-schnell" if is_schnell else "flux1-dev")


def png_text_chunks(
    settings: SampleSettings,
    *,
    model_type: str = "flux",
    is_schnell: bool = False,
    loras: Sequence[tuple[str, float]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The PNG text chunks that make an image reproducible.

    One chunk per setting (``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``width``,
    ``height``, ``guidance``, ``cfg_scale``, ``sampler``, ``schedule``, ``model``, ``loras`` as
    JSON ``[{"name": ..., "multiplier": ...}]``), any ``extra`` items, and a ``parameters`` chunk
    in the A1111/Forge layout that image browsers and sharing sites display.
    """
    schedule = "linear" if is_schnell else "shifted"
    model = model_label(model_type, is_schnell)
    chunks = {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": str(settings.seed),
        "steps": str(settings.steps),
        "width": str(settings.width),
        "height": str(settings.height),
        "guidance": str(settings.guidance),
        "cfg_scale": str(settings.cfg_scale),
        "sampler": "euler",
        "schedule": schedule,
        "model": model,
        "loras": json.dumps([{"name": name, "multiplier": float(m)} for name, m in loras], ensure_ascii=False),
    }
    chunks.update({str(k): str(v) for k, v in (extra or {}).items()})
    lora_text = "".join(f", Lora: {name}:{float(m):g}" for name, m in loras)
    chunks["parameters"] = (
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\n"
        f"Steps: {settings.steps}, Sampler: Euler, Schedule type: {schedule}, CFG scale: {settings.cfg_scale:g}, "
        f"Distilled CFG Scale: {settings.guidance:g}, Seed: {settings.seed}, "
        f"Size: {settings.width}x{settings.height}, Model: {model}{lora_text}"
    )
    return chunks


def save_png(image: Image.Image, path: str | os.PathLike, text: Mapping[str, str] | None = None) -> str:
    """Writes ``image`` with ``text`` chunks to a temporary name beside ``path``, then renames it.

    A crash mid-write leaves no truncated PNG under the final name. Non-Latin-1 text goes into
    iTXt chunks (UTF-8), which ``Image.open(path).text`` reads back.
    """
    path = os.fspath(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)  # a folder in the name (an --output_name of "run1/lora")
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# endregion
