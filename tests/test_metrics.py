"""The feature-space metrics (core/metrics.py) against closed forms and known cases."""

import math

import pytest
import torch

from fewstep.core.metrics import (
    frechet_distance, kde_log_likelihood, manifold_metrics, matched_manifold_metrics, nearest_neighbour_radii,
)  # fmt: skip


def _gaussian(n, d=8, seed=0, mean=0.0, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) * std + mean


def _mixture(n, modes, seed=0, spread=0.3):
    """n points around ``modes`` (M, D) centres, equally many per centre."""
    generator = torch.Generator().manual_seed(seed)
    centres = modes.repeat_interleave(n // len(modes), dim=0)
    return centres + spread * torch.randn(centres.shape, generator=generator, dtype=torch.float64)


MODES = 4.0 * torch.eye(10, dtype=torch.float64)  # ten well-separated modes in 10 dimensions


def test_frechet_distance_of_a_set_to_itself_is_zero():
    a = _gaussian(2000)
    assert frechet_distance(a, a) < 1e-8


def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    # N(0, I) against N(m, s²I) in d dimensions: |m|² + d·(1 + s² − 2s).
    d, shift, std = 8, 3.0, 2.0
    a = _gaussian(40000, d, seed=1)
    b = _gaussian(40000, d, seed=2, std=std) + torch.tensor([shift] + [0.0] * (d - 1), dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(shift**2 + d * (1 + std**2 - 2 * std), rel=0.03)


def test_frechet_distance_does_not_depend_on_the_order_of_images():
    a, b = _gaussian(500, seed=3), _gaussian(500, seed=4, mean=0.5)
    shuffled = b[torch.randperm(len(b), generator=torch.Generator().manual_seed(0))]
    assert frechet_distance(a, shuffled) == pytest.approx(frechet_distance(a, b), rel=1e-9)


def test_frechet_distance_grows_with_the_difference():
    a = _gaussian(2000)
    noise = _gaussian(2000, seed=5)
    assert 0 < frechet_distance(a, a + 0.1 * noise) < frechet_distance(a, a + noise)


def test_nearest_neighbour_radius_excludes_the_point_itself():
    points = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert nearest_neighbour_radii(points, k=1).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="k < 3"):
        nearest_neighbour_radii(points, k=3)


def test_identical_sets_score_one_on_every_manifold_metric():
    a = _mixture(1000, MODES)
    scores = manifold_metrics(a, a)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] >= 1.0  # every point sits in its own ball and its k neighbours'


def test_two_samples_of_the_same_distribution_score_high():
    scores = manifold_metrics(_mixture(2000, MODES, seed=1), _mixture(2000, MODES, seed=2))
    assert scores["precision"] > 0.8 and scores["recall"] > 0.8 and scores["coverage"] > 0.8
    assert 0.7 < scores["density"] < 1.3


def test_a_collapsed_generator_keeps_precision_and_loses_recall():
    # Every generated point near one of the ten modes: sharp but without variety (mode-seeking).
    real = _mixture(2000, MODES, seed=1)
    collapsed = _mixture(2000, MODES[:1], seed=2)
    scores = manifold_metrics(real, collapsed)
    assert scores["precision"] > 0.8
    assert scores["recall"] < 0.15 and scores["coverage"] < 0.15


def test_a_generator_off_the_data_loses_precision_and_density():
    real = _mixture(2000, MODES, seed=1)
    scores = manifold_metrics(real, _mixture(2000, MODES + 2.0, seed=2))
    assert scores["precision"] < 0.05 and scores["density"] < 0.05


def test_manifold_metrics_do_not_depend_on_the_order_of_images():
    real, fake = _mixture(600, MODES, seed=1), _mixture(600, MODES[:5], seed=2, spread=0.5)
    order = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    assert manifold_metrics(real[order], fake.flip(0)) == pytest.approx(manifold_metrics(real, fake))


def test_matched_metrics_of_sets_with_equal_class_counts_are_the_plain_metrics():
    real, fake = _mixture(600, MODES, seed=1), _mixture(600, MODES[:5], seed=2, spread=0.5)
    labels = torch.arange(600) % 3  # any labels with equal counts in both sets: one chunk each
    assert matched_manifold_metrics(real, labels, fake, labels) == pytest.approx(manifold_metrics(real, fake))


def test_a_larger_generated_set_is_scored_in_chunks_of_the_real_sets_size():
    # The plain metrics of a set 20× the real one, from the same distribution: every real ball holds a generated
    # point (coverage 1) whatever the generator's variety. The matched ones are those of its 20 equal slices.
    real, fake = _gaussian(100, d=64, seed=1), _gaussian(2000, d=64, seed=2)
    real_labels, fake_labels = torch.arange(100) % 2, torch.arange(2000) % 2
    matched = matched_manifold_metrics(real, real_labels, fake, fake_labels)
    slices = [manifold_metrics(real, fake[i : i + 100]) for i in range(0, 2000, 100)]
    for key in ("precision", "recall", "density", "coverage"):
        assert matched[key] == pytest.approx(sum(s[key] for s in slices) / len(slices)), key
    assert manifold_metrics(real, fake)["coverage"] == 1.0 and matched["coverage"] < 0.99


def test_every_chunk_of_the_larger_real_set_is_scored():
    # The generated set matches the real set's first half and is far from its second half: precision is their mean.
    first = _mixture(500, MODES, seed=1)
    real, labels = torch.cat([first, first + 100.0]), torch.arange(1000) % 10
    scores = matched_manifold_metrics(real, labels, first, labels[:500])
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.5)


def test_a_collapsed_generator_scores_low_recall_and_coverage_at_full_precision_class_by_class():
    labels = torch.arange(1000) % 10
    real = MODES[labels] + 0.3 * _gaussian(1000, d=10, seed=2)  # class c around mode c
    collapsed = real[:10].repeat(100, 1)  # one real point per class, repeated: no variety at all
    scores = matched_manifold_metrics(real, labels, collapsed, labels)
    assert scores["precision"] == 1.0 and scores["recall"] < 0.05 and scores["coverage"] < 0.15


def test_classes_missing_from_one_set_are_refused_naming_both():
    real, fake = _gaussian(40), _gaussian(40, seed=1)
    with pytest.raises(ValueError, match=r"same classes, got \[0, 1, 2, 3\] and \[0, 1\]"):
        matched_manifold_metrics(real, torch.arange(40) % 4, fake, torch.arange(40) % 2)


def test_kde_on_one_sample_is_the_gaussian_log_density():
    points = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    h = 0.5  # log N(x; 0, h²I) in 2-D: −|x|²/(2h²) − log(2πh²)
    expected = (-points.square().sum(1) / (2 * h**2) - math.log(2 * math.pi * h**2)).mean().item()
    assert kde_log_likelihood(torch.zeros(1, 2), points, h) == pytest.approx(expected)


def test_kde_of_a_collapsed_generator_gives_the_data_a_lower_likelihood():
    data, matching = _mixture(1000, MODES, seed=1), _mixture(1000, MODES, seed=2)
    collapsed = _mixture(1000, MODES, seed=3, spread=0.03)  # the right modes, a tenth of their spread
    assert kde_log_likelihood(collapsed, data, 0.1) < kde_log_likelihood(matching, data, 0.1) - 10
    with pytest.raises(ValueError, match="bandwidth must be > 0, got 0"):
        kde_log_likelihood(matching, data, 0.0)
