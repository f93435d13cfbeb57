"""Line plots for the benchmarks' figures, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import math
from pathlib import Path

COLORS = [(40, 40, 40), (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
REFERENCE_COLOR = (150, 150, 150)


def line_plot(
    lines: dict[str, list[tuple[float, float]]], path: Path, x_label: str, y_label: str,
    size: tuple[int, int] = (640, 420), errors: dict[str, list[float]] | None = None,
    references: dict[str, float] | None = None,
) -> None:  # fmt: skip
    """One line per name through its (x, y) points on a log2 x axis and a linear y axis from 0; ``errors`` (per
    name, one half-height per point in sorted x order) draws ± bars; ``references`` (name → y) draws dashed grey
    horizontal lines, a baseline such as the teacher's."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 150, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = sorted({x for points in lines.values() for x, _ in points})
    tops = [y + ((errors or {}).get(name) or [0.0] * len(points))[i]
            for name, points in lines.items() for i, (_, y) in enumerate(sorted(points))]  # fmt: skip
    max_y = max(tops + list((references or {}).values())) * 1.05 or 1.0
    span = max(1.0, math.log2(max(xs) / min(xs))) if min(xs) > 0 else 1.0
    x_of = lambda x: left + (width - left - right) * math.log2(x / min(xs)) / span if len(xs) > 1 else left + 20
    y_of = lambda y: top + (height - top - bottom) * (1 - y / max_y)
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for x in xs:
        draw.text((x_of(x) - 4, height - bottom + 6), f"{x:g}", fill="black")
    for k in range(5):
        y = max_y * k / 4
        draw.text((8, y_of(y) - 6), f"{y:.0f}", fill="black")
    draw.text((width // 2 - 60, height - 16), x_label, fill="black")
    draw.text((8, 2), y_label, fill="black")
    for i, (name, points) in enumerate(lines.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(x_of(x), y_of(y)) for x, y in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for k, (x, y) in enumerate(xy):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            half = ((errors or {}).get(name) or [0.0] * len(xy))[k]
            if half:
                value = sorted(points)[k][1]
                draw.line([(x, y_of(value - half)), (x, y_of(value + half))], fill=color, width=1)
        draw.text((width - right + 10, top + 16 * i), name, fill=color)
    for k, (name, y) in enumerate((references or {}).items()):
        for x in range(left, width - right, 12):  # dashed
            draw.line([(x, y_of(y)), (min(x + 6, width - right), y_of(y))], fill=REFERENCE_COLOR, width=1)
        draw.text((width - right + 10, top + 16 * (len(lines) + k)), name, fill=REFERENCE_COLOR)
    image.save(path)
