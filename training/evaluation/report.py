"""The metrics table as text (stdout) and Markdown (the model card), and the report a person reads: ``report.html``
(self-contained: the settings, the table, what each number means, and the prompts with every row's image side by
side, embedded as PNG), ``report.png`` (the same images as one grid: a line per prompt, a column per row) and
``metrics.json`` (for scripts)."""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
from pathlib import Path

import torch

from .scoring import REPORT_PROMPTS

REPORT_FILES = ("report.html", "report.png", "metrics.json")

# (metric key, column title; "{space}" is the metric model's feature space, e.g. DINOv2)
COLUMNS = [
    ("fd", "FD_{space} ↓"),
    ("fd_clip", "FD_CLIP ↓"),
    ("fd_real", "FD_{space} real ↓"),
    ("fd_clip_real", "FD_CLIP real ↓"),
    ("clip_score", "CLIP score ↑"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("density", "density"),
    ("coverage", "coverage ↑"),
    ("seconds_per_image", "s/image"),
]
MEANINGS = {
    "fd": "Fréchet distance to the reference row's images in the metric model's features (FD_DINOv2 by default; "
    "Stein et al. 2023). 0 = the same distribution; biased upward at small n, so compare rows of one report only",
    "fd_clip": "the same distance in CLIP's image embeddings",
    "fd_real": "the Fréchet distance to the real images (--images), an FID analogue",
    "fd_clip_real": "the same in CLIP's image embeddings",
    "clip_score": "prompt adherence: mean of 100·max(cos(CLIP image, CLIP prompt), 0) (Hessel et al. 2021, "
    "torchmetrics' scale)",
    "precision": "share of the row's images inside the reference's k-NN manifold (fidelity; Kynkäänniemi et al. "
    "2019)",
    "recall": "share of the reference's images inside the row's manifold: variety, falls when a student collapses",
    "density": "how many reference neighbourhoods hold each image, ÷ k (≈ 1 for matching distributions; Naeem et "
    "al. 2020)",
    "coverage": "share of reference neighbourhoods holding at least one of the row's images (variety, robust to "
    "outliers)",
    "seconds_per_image": "sampling time per image: text encoding, UNet passes and VAE decoding, batched",
}


def _columns(result: dict) -> list[tuple[str, str]]:
    """The columns that have a value in some row, titled for the feature space."""
    space = result["settings"].get("feature_space", "DINOv2")
    present = [key for key, _ in COLUMNS if any(row.get(key) is not None for row in result["rows"].values())]
    return [(key, title.format(space=space)) for key, title in COLUMNS if key in present]


def format_value(key: str, value) -> str:
    if value is None:
        return "–"
    if key in ("precision", "recall", "density", "coverage"):
        return f"{value:.3f}"
    if key == "seconds_per_image":
        return f"{value:.3g}"
    return f"{value:.4g}"


def summary(result: dict) -> str:
    s = result["settings"]
    real = s.get("real_images")
    against = f"{result['reference']}" + (f" and {real['count']} real images" if real else "")
    return (
        f"{s['prompts']} prompts × {s['images_per_prompt']} image(s), seed {s['seed']}, {s['resolution']} px; "
        f"compared with {against}; FD_{s['feature_space']} in {s['metric_model']}, CLIP score with {s['clip_model']}, "
        f"k = {s['manifold_k']}"
    )


def format_table(result: dict) -> str:
    """The table as fixed-width text."""
    columns = _columns(result)
    width = max(len(name) for name in result["rows"]) + 2
    header = f"{'row':<{width}}" + "".join(f"{title:>{len(title) + 2}}" for _, title in columns)
    lines = [f"fewstep eval: {summary(result)}", header]
    for name, row in result["rows"].items():
        cells = "".join(f"{format_value(key, row.get(key)):>{len(title) + 2}}" for key, title in columns)
        lines.append(f"{name:<{width}}{cells}")
    lines += [f"  {name}: {title}" for name, title in result["titles"].items()]
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The table in Markdown (the model card's "Metrics" section), with what each row is and the settings."""
    columns = _columns(result)
    header = "| row | " + " | ".join(title for _, title in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(format_value(key, row.get(key)) for key, _ in columns) + " |")
    rows = "\n".join(f"- `{name}`: {title}" for name, title in result["titles"].items())
    return "\n".join(lines) + f"\n\n{summary(result)}.\n\n{rows}"


# ------------------------------------------------------------------------------------------ the files
def _png(image: torch.Tensor) -> bytes:
    from ..loop.images import to_pil

    buffer = io.BytesIO()
    to_pil(image.float() / 255).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples_html(result: dict, thumbnails: dict) -> str:
    names = list(result["rows"])
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    lines = []
    for index in sorted({i for images in thumbnails.values() for i in images}):
        cells = []
        for name in names:
            image = thumbnails[name].get(index)
            if image is None:
                cells.append("<td></td>")
                continue
            data = base64.b64encode(_png(image)).decode()
            cells.append(f'<td><img src="data:image/png;base64,{data}" alt="{html.escape(name)}"></td>')
        lines.append(f"<tr><td class=prompt>{html.escape(result['prompts'][index])}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(lines)}</table>"


def report_html(result: dict, thumbnails: dict) -> str:
    columns = _columns(result)
    metric_head = "<tr><th>row</th><th>what</th>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in columns) + "</tr>"
    metric_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=what>{html.escape(result['titles'][name])}</td>"
        + "".join(f"<td class=num>{format_value(key, row.get(key))}</td>" for key, _ in columns) + "</tr>"
        for name, row in result["rows"].items()
    )  # fmt: skip
    meanings = "".join(f"<li><b>{html.escape(title)}</b>: {html.escape(MEANINGS[key])}</li>" for key, title in columns)
    settings = "".join(
        f"<tr><td>{html.escape(key)}</td><td>{html.escape(json.dumps(value))}</td></tr>"
        for key, value in result["settings"].items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}td.num{text-align:right;font-family:monospace}"
        "td.prompt{max-width:18em}td.what{max-width:24em;font-size:90%}img{max-width:256px;display:block}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>fewstep eval</title><style>{style}</style></head>'
        f"<body><h1>fewstep eval</h1><p>{html.escape(summary(result))}</p>"
        f"<h2>Metrics</h2><table>{metric_head}{metric_rows}</table><ul>{meanings}</ul>"
        f"<h2>Samples</h2><p>The first image of each prompt (up to {REPORT_PROMPTS}), the same initial noise in every column; the "
        f'same images as one grid: <a href="report.png">report.png</a>.</p>{_samples_html(result, thumbnails)}'
        f"<h2>Settings</h2><table>{settings}</table></body></html>\n"
    )


def report_png(result: dict, thumbnails: dict, path: Path) -> None:
    """A grid: one line per prompt (its text on the left), one column per row (its name on top)."""
    from PIL import Image, ImageDraw

    from ..loop.images import to_pil

    names, pad, label_width, header = list(result["rows"]), 4, 200, 20
    indices = sorted({i for images in thumbnails.values() for i in images})
    first = next(image for images in thumbnails.values() for image in images.values())
    h = first.shape[-2]
    w = max(first.shape[-1], 7 * max(len(name) for name in names))  # a column fits its name (~6 px a character)
    size = (label_width + len(names) * (w + pad) + pad, header + len(indices) * (h + pad) + pad)
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(names):
        draw.text((label_width + pad + column * (w + pad), 4), name, fill="black")
    for line, index in enumerate(indices):
        top = header + pad + line * (h + pad)
        prompt = textwrap.fill(result["prompts"][index], width=label_width // 6 - 1)
        draw.multiline_text((pad, top), "\n".join(prompt.splitlines()[: max(1, h // 12)]), fill="black")
        for column, name in enumerate(names):
            image = thumbnails[name].get(index)
            if image is not None:
                grid.paste(to_pil(image.float() / 255), (label_width + pad + column * (w + pad), top))
    grid.save(path)


def write_report(out: str | Path, result: dict, thumbnails: dict) -> list[Path]:
    """``report.html``, ``report.png`` and ``metrics.json`` in ``out`` (created if missing); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html_path, png_path, json_path = (out / name for name in REPORT_FILES)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    report_png(result, thumbnails, png_path)
    html_path.write_text(report_html(result, thumbnails), encoding="utf-8")
    return [html_path, png_path, json_path]
