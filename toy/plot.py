"""A dependency-free scatter plot (Pillow) of teacher vs student samples for the exact-teacher demo."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

PANEL = 360
MARGIN = 28


def _panel(points: torch.Tensor, title: str, color: tuple[int, int, int], extent: float) -> Image.Image:
    image = Image.new("RGB", (PANEL, PANEL + MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")
    scale = (PANEL - 20) / (2 * extent)
    center = PANEL / 2

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return center + x * scale, MARGIN + center - y * scale

    draw.line([to_pixel(-extent, 0), to_pixel(extent, 0)], fill=(220, 220, 220))
    draw.line([to_pixel(0, -extent), to_pixel(0, extent)], fill=(220, 220, 220))
    for x, y in points.tolist():
        px, py = to_pixel(x, y)
        draw.point((px, py), fill=color)
    return image


def scatter_png(path, panels: list[tuple[str, torch.Tensor]], extent: float = 3.0) -> None:
    """Write side-by-side scatter panels (title, (N, 2) samples) to ``path``."""
    colors = [(40, 90, 200), (200, 60, 40), (30, 150, 60), (120, 60, 160)]
    images = [_panel(p, title, colors[i % len(colors)], extent) for i, (title, p) in enumerate(panels)]
    canvas = Image.new("RGB", (PANEL * len(images), PANEL + MARGIN), "white")
    for i, image in enumerate(images):
        canvas.paste(image, (i * PANEL, 0))
    canvas.save(path)
