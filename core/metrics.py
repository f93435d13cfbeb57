"""Distances between two sets of image features: Fréchet distance, and the k-nearest-neighbour manifold metrics.

Any front end's features go in (the digits classifier's, DINOv2's, CLIP's); these functions only see (N, D)
tensors, and none of them depends on the order of the rows.

- :func:`frechet_distance`: FD between Gaussians fitted to each set (Heusel et al. 2017, FID's formula).
- :func:`manifold_metrics`: precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al.
  2020). Each set's manifold is the union of balls around its points, of radius the distance to the point's k-th
  nearest neighbour in its own set. Precision: the share of generated points inside the real manifold (fidelity);
  recall: the share of real points inside the generated manifold (variety: a generator that collapses to a few
  modes has a small manifold and low recall). Density counts how many real balls hold each generated point (÷ k;
  ≈ 1 for matching distributions, unbounded above); coverage is the share of real balls holding at least one
  generated point, which outliers among the generated points cannot inflate.
- :func:`clip_score`: prompt adherence, 100·max(cos(image embedding, text embedding), 0) per image (Hessel et al.
  2021, scaled as torchmetrics' ``CLIPScore``).
- :func:`kde_log_likelihood`: the mean log-density of points under a Gaussian kernel density estimate on samples:
  the data's likelihood under a generator's samples, low where the generator leaves gaps (for low-dimensional
  features, where a kernel density estimate is meaningful).
- :func:`matched_manifold_metrics`: the same four between sets of equal size and equal class counts. The k-NN
  radii shrink as a set grows, so the metrics between sets of different sizes are biased (a generated set 10× the
  real one covers every real ball: coverage → 1 whatever its variety).
"""

from __future__ import annotations

import math

import torch

MANIFOLD_K = 5  # Naeem et al.'s k for density and coverage; used for precision and recall too


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FD between Gaussians fitted to two (N, D) feature sets (float64).

    tr((Σ₁Σ₂)^½) is computed as Σ√λ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues), which
    stays real and exact where a general matrix square root would not; FD(a, a) is 0 up to round-off.
    """
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(sigma_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * trace_sqrt
    return max(0.0, distance.item())


def _distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(len(a), len(b)) Euclidean distances in float64, a chunk of a's rows at a time."""
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)])


def nearest_neighbour_radii(features: torch.Tensor, k: int = MANIFOLD_K) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour in its own set (itself excluded)."""
    if not 1 <= k < len(features):
        raise ValueError(f"the k-nearest-neighbour radius needs 1 ≤ k < {len(features)} points, got k = {k}")
    distances = _distances(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st is the point itself, at distance 0


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = MANIFOLD_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real``, both (N, D) features."""
    real, fake = real.double(), fake.double()
    real_radii = nearest_neighbour_radii(real, k)
    fake_radii = nearest_neighbour_radii(fake, k)
    distances = _distances(real, fake)  # (N_real, N_fake)
    inside_real_balls = distances <= real_radii[:, None]  # [i, j]: fake j lies in real i's ball
    inside_fake_balls = distances <= fake_radii[None, :]  # [i, j]: real i lies in fake j's ball
    return {
        "precision": inside_real_balls.any(dim=0).double().mean().item(),
        "recall": inside_fake_balls.any(dim=1).double().mean().item(),
        "density": (inside_real_balls.sum(dim=0).double() / k).mean().item(),
        "coverage": inside_real_balls.any(dim=1).double().mean().item(),
    }


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP score of each (image, prompt) pair, (N,) from two (N, D) embeddings: 100·max(cos(e_image, e_text), 0).

    Hessel et al. 2021 define CLIP-S = w·max(cos, 0) with w = 2.5; torchmetrics' ``CLIPScore`` uses w = 100, as here
    (papers that report the cosine itself, 0.32, mean 32 on this scale). Embeddings need not be normalized.
    """
    cosine = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cosine.clamp(min=0)
def kde_log_likelihood(samples: torch.Tensor, points: torch.Tensor, bandwidth: float) -> float:
    """Mean over ``points`` of log (1/M) Σ_j N(x; s_j, h²I), the Gaussian KDE on M ``samples``; both (N, D)."""
    if bandwidth <= 0:
        raise ValueError(f"the kernel bandwidth must be > 0, got {bandwidth}")
    samples, points = samples.double(), points.double()
    dim = points.shape[1]
    squared = _distances(points, samples).square()  # (N_points, M)
    log_kernel = -0.5 * squared / bandwidth**2 - 0.5 * dim * math.log(2 * math.pi * bandwidth**2)
    return (torch.logsumexp(log_kernel, dim=1) - math.log(len(samples))).mean().item()


def _class_chunks(labels: torch.Tensor, sizes: dict[int, int]) -> list[torch.Tensor]:
    """Disjoint index sets holding ``sizes[c]`` indices of each class c (in the order given), as many as all allow."""
    members = {c: (labels == c).nonzero().flatten() for c in sizes}
    count = min(len(members[c]) // size for c, size in sizes.items())
    return [torch.cat([members[c][i * size : (i + 1) * size] for c, size in sizes.items()]) for i in range(count)]


def matched_manifold_metrics(
    real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor, k: int = MANIFOLD_K
) -> dict[str, float]:
    """:func:`manifold_metrics` between chunks of equal size and equal class counts, averaged over the chunks.

    Class c puts s_c = min(#real of c, #fake of c) points into every chunk; each set is cut into as many disjoint
    chunks as its rarest class (relative to s_c) allows, and chunk i of the set with more chunks is scored against
    chunk i mod m of the other (m chunks), so every chunk counts once and all pairs compare equal sizes. Within a
    class, points are taken in the order given.
    """
    real_classes, fake_classes = sorted(set(real_labels.tolist())), sorted(set(fake_labels.tolist()))
    if real_classes != fake_classes:
        raise ValueError(f"real and generated sets must hold the same classes, got {real_classes} and {fake_classes}")
    sizes = {c: min(int((real_labels == c).sum()), int((fake_labels == c).sum())) for c in real_classes}
    real_chunks, fake_chunks = _class_chunks(real_labels, sizes), _class_chunks(fake_labels, sizes)
    pairs = max(len(real_chunks), len(fake_chunks))
    scores = [
        manifold_metrics(real[real_chunks[i % len(real_chunks)]], fake[fake_chunks[i % len(fake_chunks)]], k)
        for i in range(pairs)
    ]
    return {key: sum(s[key] for s in scores) / pairs for key in scores[0]}
