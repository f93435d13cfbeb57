"""Image grids for validation samples and demos."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → PIL."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> None:
    """Save images as a grid: one row per (N, 3, H, W) tensor."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    grid = Image.new("RGB", (n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(to_pil(image), (pad + j * (w + pad), pad + i * (h + pad)))
    grid.save(path)
