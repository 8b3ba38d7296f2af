"""A tiny image/caption dataset, its dataset TOML and a sample-prompts file, for the demo and tests.

Images are simple drawn scenes (a coloured shape on a background), so that captions describe
them and a LoRA has something learnable; sizes vary so that bucketing is exercised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image, ImageDraw

_SCENES = [
    ("red", "circle", "blue", (64, 64)),
    ("green", "square", "white", (80, 64)),
    ("blue", "triangle", "yellow", (64, 80)),
    ("yellow", "circle", "green", (64, 64)),
    ("white", "square", "red", (96, 64)),
    ("red", "triangle", "black", (64, 64)),
]
_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15),
}  # fmt: skip


@dataclass
class DemoDataset:
    image_dir: str
    dataset_toml: str
    sample_prompts: str
    num_images: int


def draw_scene(shape: str, colour: str, background: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, _COLOURS[background])
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w * 0.25, h * 0.25, w * 0.75, h * 0.75)
    if shape == "circle":
        draw.ellipse(box, fill=_COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=_COLOURS[colour])
    else:
        draw.polygon([(w * 0.5, h * 0.2), (w * 0.8, h * 0.8), (w * 0.2, h * 0.8)], fill=_COLOURS[colour])
    return image


def write_demo_dataset(
    folder: str,
    resolution: int = 64,
    batch_size: int = 2,
    num_repeats: int = 1,
    validation_split: float = 0.0,
    num_images: int | None = None,
) -> DemoDataset:
    """Writes images with .txt captions, ``dataset.toml`` and ``sample_prompts.txt`` into ``folder``."""
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    scenes = _SCENES[:num_images] if num_images else _SCENES
    for i, (colour, shape, background, size) in enumerate(scenes):
        stem = os.path.join(image_dir, f"{i:02d}_{colour}_{shape}")
        draw_scene(shape, colour, background, size).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(f"a {colour} {shape} on a {background} background")
    toml_path = os.path.join(folder, "dataset.toml")
    with open(toml_path, "w", encoding="utf-8") as f:
        f.write(
            "[general]\n"
            'caption_extension = ".txt"\n'
            "enable_bucket = true\n"
            "bucket_reso_steps = 16\n"
            f"min_bucket_reso = {resolution // 2}\n"
            f"max_bucket_reso = {resolution * 2}\n\n"
            "[[datasets]]\n"
            f"resolution = {resolution}\n"
            f"batch_size = {batch_size}\n"
            f"validation_split = {validation_split}\n\n"
            "  [[datasets.subsets]]\n"
            f"  image_dir = '{image_dir}'\n"
            f"  num_repeats = {num_repeats}\n"
        )
    prompts_path = os.path.join(folder, "sample_prompts.txt")
    with open(prompts_path, "w", encoding="utf-8") as f:
        f.write(f"a red circle on a blue background --w {resolution} --h {resolution} --d 42 --s 4\n")
    return DemoDataset(image_dir, toml_path, prompts_path, len(scenes))
