"""Sample images during training: which process draws which prompt, file names (spec §h.2),
and leaving the run's RNG and the models' train/eval modes as they were."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from PIL import Image
from torch import nn

from library.flux_sampling import (
    EncodePrompts,
    TextConditions,
    generate_image,
    png_text_chunks,
    resolve_sample_settings,
    save_png,
)
from library.sample_prompts import SamplePrompt

logger = logging.getLogger(__name__)

SAMPLE_SUBDIR = "sample"  # under --output_dir, as sd-scripts


def sample_image_filename(
    output_name: str | None,
    epoch: int | None,
    steps: int,
    prompt_index: int,
    seed: int | None,
    timestamp: str | None = None,
) -> str:
    """``{output_name}_{e%06d epoch | %06d step}_{index:02d}_{YYYYmmddHHMMSS}[_{seed}].png`` (spec §h.2).

    Without an output name there is no prefix; the seed suffix appears only when the prompt set it.
    """
    timestamp = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    prefix = "" if output_name is None else f"{output_name}_"
    number = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{prompt_index:02d}_{timestamp}{seed_suffix}.png"


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restores the torch CPU and CUDA RNG states (and Python's ``random``) on exit."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(python_state)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Puts modules in eval mode and restores each one's own training flag on exit."""
    present = [m for m in modules if m is not None]
    flags = [{sub: sub.training for sub in m.modules()} for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for saved in flags:
            for sub, training in saved.items():
                sub.train(training)


def wandb_sample_logger(accelerator) -> Callable[[SamplePrompt, Image.Image, str], None] | None:
    """An ``on_image`` for :func:`sample_images` that logs each image to the run's wandb tracker as
    ``sample_<index>``, the prompt as its caption (as sd-scripts); None when wandb does not log this
    run (or not on this process). Logged uncommitted, so it lands on the step's row of the losses."""
    if "wandb" not in [tracker.name for tracker in accelerator.trackers]:
        return None
    import wandb

    tracker = accelerator.get_tracker("wandb")

    def log(prompt: SamplePrompt, image: Image.Image, path: str) -> None:
        tracker.log({f"sample_{prompt.index}": wandb.Image(image, caption=prompt.prompt)}, commit=False)

    return log


def sample_images(
    flux: nn.Module,
    ae: nn.Module,
    prompts: Sequence[SamplePrompt],
    *,
    output_dir: str,
    output_name: str | None,
    epoch: int | None,
    steps: int,
    encode_prompts: EncodePrompts | None = None,
    conditions: Mapping[str, TextConditions] | None = None,
    model_type: str = "flux",
    is_schnell: bool = False,
    apply_t5_attn_mask: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    loras: Sequence[tuple[str, float]] = (),
    eval_modules: Sequence[nn.Module] = (),
    autocast: Callable[[], AbstractContextManager] | None = None,
    on_image: Callable[[SamplePrompt, Image.Image, str], None] | None = None,
    progress: bool = False,
) -> list[str]:
    """Writes this process's share of the sample images; returns their paths.

    The caller decides *when* (:class:`~library.sample_prompts.SampleTriggers`). Process ``process_index`` of
    ``num_processes`` takes prompts ``process_index::num_processes``. Files go to
    ``{output_dir}/sample/`` named by :func:`sample_image_filename`, written atomically with
    :func:`png_text_chunks` (plus ``epoch`` and ``step``). ``flux``, ``ae`` and ``eval_modules``
    (e.g. the LoRA network, whose dropout follows its own mode) are in eval mode meanwhile; the
    global RNG states are restored afterwards, so the run continues as if no samples were made.
    ``on_image(prompt, image, path)`` is called per image (e.g. to log it to wandb).
    """
    mine = list(prompts)[process_index::num_processes]
    if not mine:
        return []
    save_dir = os.path.join(output_dir, SAMPLE_SUBDIR)
    os.makedirs(save_dir, exist_ok=True)
    when = f"epoch {epoch} (step {steps})" if epoch is not None else f"step {steps}"  # as the files are named
    logger.info("generating %d sample image(s) at %s", len(mine), when)
    written = []
    with preserved_rng_state(), eval_mode(flux, ae, *eval_modules), torch.no_grad():
        for prompt in mine:
            settings = resolve_sample_settings(prompt, model_type)
            if not settings.use_cfg and settings.negative_prompt:
                logger.info("prompt %d: the negative prompt is ignored because the CFG scale (--l) is 1", prompt.index)
            logger.info("sample %d: %s", prompt.index, settings)
            image = generate_image(
                flux,
                ae,
                settings,
                encode_prompts=encode_prompts,
                conditions=conditions,
                model_type=model_type,
                is_schnell=is_schnell,
                apply_t5_attn_mask=apply_t5_attn_mask,
                device=device,
                dtype=dtype,
                autocast=autocast,
                progress=progress,
            )
            name = sample_image_filename(output_name, epoch, steps, prompt.index, prompt.seed)
            extra = {"step": steps} if epoch is None else {"epoch": epoch, "step": steps}
            text = png_text_chunks(settings, model_type=model_type, is_schnell=is_schnell, loras=loras, extra=extra)
            path = save_png(image, os.path.join(save_dir, name), text)
            written.append(path)
            if on_image is not None:
                on_image(prompt, image, path)
    return written


