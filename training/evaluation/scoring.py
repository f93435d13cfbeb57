"""Every row's features and CLIP scores, and the metrics table that compares the rows (the math is ``core.metrics``).

Per row, against the reference (the first teacher row, sampled on the same prompts and noise) and, when real
images are given, against them:

- ``fd`` / ``fd_real``: the Fréchet distance in the metric model's features (FD_DINOv2 by default; lower is closer);
- ``fd_clip`` / ``fd_clip_real``: the same in CLIP's image embeddings;
- ``precision``, ``recall``, ``density``, ``coverage`` (``*_real``): the k-nearest-neighbour manifold metrics in
  the metric model's features — recall and coverage fall when a student loses variety;
- ``clip_score``: the mean of 100·max(cos(image, prompt), 0) in CLIP's embeddings (prompt adherence);
- ``seconds_per_image``: the row's sampling time (text encoding, UNet passes, VAE decoding) per image.

Images are scored batch by batch as they are sampled, so memory does not grow with the number of prompts; only the
first image of each of the first :data:`REPORT_PROMPTS` prompts is kept, for the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...core.metrics import MANIFOLD_K, clip_score, frechet_distance, manifold_metrics
from .metric_models import KIND_NAMES, FeatureNetwork

REPORT_PROMPTS = 16  # prompts shown in the report (the first image of each)
THUMBNAIL_SIZE = 256  # longest side of an image in the report
EMBED_BATCH = 32


@dataclass
class Scorer:
    """The metric model (FD's feature space) and the CLIP model (CLIP score, FD_CLIP); one model may be both."""

    features: FeatureNetwork
    clip: FeatureNetwork

    @property
    def feature_space(self) -> str:
        return KIND_NAMES[self.features.kind]

    def describe(self) -> dict:
        return {"metric_model": self.features.name, "feature_space": self.feature_space, "clip_model": self.clip.name}

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's text embeddings of the prompts, (P, E)."""
        return torch.cat([self.clip.embed_texts(prompts[i : i + 256]) for i in range(0, len(prompts), 256)])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(metric features, CLIP image embeddings) of (B, 3, H, W) images in [0, 1]."""
        chunks = [images[i : i + EMBED_BATCH] for i in range(0, len(images), EMBED_BATCH)]
        clip = torch.cat([self.clip.embed_images(chunk) for chunk in chunks])
        features = clip if self.features is self.clip else torch.cat([self.features.embed_images(c) for c in chunks])
        return features, clip


@dataclass
class RowEmbeddings:
    """What a row keeps of its images: features, CLIP embeddings and scores, sampling time and report thumbnails."""

    features: list[torch.Tensor] = field(default_factory=list)
    clip: list[torch.Tensor] = field(default_factory=list)
    clip_scores: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    thumbnails: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt index → its first image

    def add(self, scorer: Scorer, images: torch.Tensor, prompt_indices: list[int] | None = None,
            text_embeds: torch.Tensor | None = None) -> None:  # fmt: skip
        features, clip = scorer.embed(images)
        self.features.append(features)
        self.clip.append(clip)
        if text_embeds is not None:
            self.clip_scores.append(clip_score(clip, text_embeds[prompt_indices]))
        for image, index in zip(images, prompt_indices or []):
            if index < REPORT_PROMPTS and index not in self.thumbnails:
                self.thumbnails[index] = thumbnail(image)

    @property
    def count(self) -> int:
        return sum(len(f) for f in self.features)

    def feature_matrix(self) -> torch.Tensor:
        return torch.cat(self.features)

    def clip_matrix(self) -> torch.Tensor:
        return torch.cat(self.clip)


def thumbnail(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] → uint8, longest side at most :data:`THUMBNAIL_SIZE`."""
    scale = THUMBNAIL_SIZE / max(image.shape[-2:])
    if scale < 1:
        size = [max(1, round(side * scale)) for side in image.shape[-2:]]
        image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def embed_row(models, row, prompts: list[str], images_per_prompt: int, seed: int, batch_size: int, scorer: Scorer,
              text_embeds: torch.Tensor, progress: bool = True) -> RowEmbeddings:  # fmt: skip
    """Sample a row (:func:`.rows.sample_batches`) and score it batch by batch; only sampling counts as its time."""
    from tqdm import tqdm

    from .rows import sample_batches

    embeddings = RowEmbeddings()
    bar = tqdm(total=len(prompts) * images_per_prompt, desc=f"eval {row.name}", unit="img", disable=not progress)
    batches = sample_batches(models, row, prompts, images_per_prompt, seed, batch_size)
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        embeddings.seconds += time.perf_counter() - started
        indices, images = batch
        embeddings.add(scorer, images, indices, text_embeds)
        bar.update(len(indices))
    bar.close()
    return embeddings


def embed_real_images(folder: str | Path, scorer: Scorer, progress: bool = True) -> RowEmbeddings:
    """The features of every image in ``folder`` (and its sub-folders): each centre-cropped to a square at the
    metric models' input size, as generated images are by the models' own preprocessing, then embedded in batches."""
    from tqdm import tqdm

    paths = real_image_paths(folder)
    size = max(scorer.features.size, scorer.clip.size)
    embeddings = RowEmbeddings()
    bar = tqdm(total=len(paths), desc="eval real images", unit="img", disable=not progress)
    for start in range(0, len(paths), EMBED_BATCH):
        batch = torch.stack([square_image(path, size) for path in paths[start : start + EMBED_BATCH]])
        embeddings.add(scorer, batch)
        bar.update(len(batch))
    bar.close()
    return embeddings


def square_image(path: Path, size: int) -> torch.Tensor:
    """The image at ``path``, its centre square resized to ``size`` (bicubic), (3, size, size) in [0, 1]."""
    import numpy
    from PIL import Image

    from ..data.images_io import load_rgb

    try:
        image = load_rgb(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"--images: {path} cannot be read ({' '.join(str(error).split())}); remove it") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(numpy.asarray(image).copy()).permute(2, 0, 1).float() / 255


def real_image_paths(folder: str | Path) -> list[Path]:
    """The image files under ``folder``, sorted; a missing folder or one with fewer than two images is an error."""
    from ..data.images_io import IMAGE_SUFFIXES

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"--images {str(folder)!r} is not a folder; give a folder of real images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise ValueError(
            f"--images {str(folder)!r} holds {len(paths)} image(s); the Fréchet distance needs at least 2"
        )
    return paths


# ------------------------------------------------------------------------------------------ the table
def manifold_k(*counts: int) -> int:
    """Naeem et al.'s k = 5, or less when a set has too few points for k neighbours."""
    return max(1, min(MANIFOLD_K, *(count - 1 for count in counts)))


def compare(row: RowEmbeddings, reference: RowEmbeddings, k: int, suffix: str = "") -> dict[str, float]:
    """FD (metric features and CLIP's) and the manifold metrics (k neighbours) of ``row`` against ``reference``."""
    features, reference_features = row.feature_matrix(), reference.feature_matrix()
    metrics = {
        "fd": frechet_distance(features, reference_features),
        "fd_clip": frechet_distance(row.clip_matrix(), reference.clip_matrix()),
        **manifold_metrics(reference_features, features, k),
    }
    return {f"{name}{suffix}": value for name, value in metrics.items()}


def table_k(rows: dict[str, RowEmbeddings], real: RowEmbeddings | None) -> int:
    """One k for the whole table, so that its rows compare alike."""
    return manifold_k(*(row.count for row in rows.values()), *([real.count] if real is not None else []))


COMPARED = ("fd", "fd_clip", "precision", "recall", "density", "coverage")


def metrics_table(rows: dict[str, RowEmbeddings], reference: str, real: RowEmbeddings | None = None) -> dict:
    """``{row: {metric: value}}``: each row against the reference row (None for the reference itself) and the real
    images (``*_real``, when given), its CLIP score and seconds per image."""
    k = table_k(rows, real)
    table = {}
    for name, row in rows.items():
        metrics: dict = {"images": row.count}
        metrics.update(dict.fromkeys(COMPARED) if name == reference else compare(row, rows[reference], k))
        if real is not None:
            metrics.update(compare(row, real, k, "_real"))
        metrics["clip_score"] = torch.cat(row.clip_scores).mean().item() if row.clip_scores else None
        metrics["seconds_per_image"] = row.seconds / row.count if row.count else None
        table[name] = metrics
    return table


# ------------------------------------------------------------------------------------------ a whole evaluation
@dataclass
class Evaluation:
    """The result (JSON-able: rows, their titles, settings, prompts) and the report's thumbnails per row."""

    result: dict
    thumbnails: dict[str, dict[int, torch.Tensor]]


def evaluate(models, rows: list, prompts: list[str], scorer: Scorer, images_per_prompt: int = 1, seed: int = 0,
             batch_size: int = 8, real_images: str | Path | None = None, settings: dict | None = None,
             progress: bool = True) -> Evaluation:  # fmt: skip
    """Sample and score every row (the first is the reference) on the same prompts and noise.

    ``models`` is a :class:`.rows.SDModels`; ``settings`` (what the caller wants on record: teacher, LoRA, ...) are
    stored in the result beside the sampling and metric settings.
    """
    names = [row.name for row in rows]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two rows are named {', '.join(repeated)}; give each --distillpp row its own NAME:")
    if len(prompts) * images_per_prompt < 2:
        raise ValueError("the metrics need at least 2 images per row; give more prompts or --images-per-prompt")
    real = embed_real_images(real_images, scorer, progress) if real_images is not None else None
    text_embeds = scorer.embed_texts(prompts)
    embedded = {
        row.name: embed_row(models, row, prompts, images_per_prompt, seed, batch_size, scorer, text_embeds, progress)
        for row in rows
    }
    settings = {**(settings or {}), "family": models.family, "resolution": models.resolution, "seed": seed,
                "images_per_prompt": images_per_prompt, "batch_size": batch_size}  # fmt: skip
    titles = {row.name: row.describe() for row in rows}
    result = result_of(embedded, titles, prompts, settings, scorer, real, str(real_images) if real else None)
    return Evaluation(result, {name: row.thumbnails for name, row in embedded.items()})


def result_of(embedded: dict[str, RowEmbeddings], titles: dict[str, str], prompts: list[str], settings: dict,
              scorer: Scorer, real: RowEmbeddings | None = None, real_folder: str | None = None) -> dict:  # fmt: skip
    """The JSON record of an evaluation (``fewstep eval`` and ``--eval-every`` alike): the table (the first row is
    the reference), what each row is, the settings, the prompts."""
    reference = next(iter(embedded))
    record = {
        **settings, "prompts": len(prompts), **scorer.describe(), "manifold_k": table_k(embedded, real),
        "real_images": None if real is None else {"folder": real_folder, "count": real.count},
    }  # fmt: skip
    return {
        "rows": metrics_table(embedded, reference, real),
        "titles": titles,
        "reference": reference,
        "settings": record,
        "prompts": list(prompts),
    }


def load_scorer(metric_model: str, clip_model: str, device: str | torch.device = "cpu",
                options: tuple[str, str] = ("--metric-model", "--clip-model")) -> Scorer:  # fmt: skip
    """The metric model (DINOv2 or CLIP) and the CLIP model, each loaded once; ``options`` name the flags that set
    them, for the one-line error when one cannot be loaded."""
    from .metric_models import load_clip, load_feature_network

    features = load_feature_network(metric_model, options[0], device)
    same = clip_model == metric_model and features.kind == "clip"
    clip = features if same else load_clip(clip_model, options[1], device)
    return Scorer(features, clip)
