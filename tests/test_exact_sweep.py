"""The exact-teacher sweep's command line and summary (its runs: ``python -m fewstep.benchmarks.exact_sweep``)."""

import pytest

from fewstep.benchmarks.exact_sweep import KEYS, format_summary, parse_variant, summarise


def test_variant_parses_to_settings_typed_like_the_config():
    name, overrides = parse_variant("batch 512:batch_size=512,lr=5e-4,cosine_decay=false")
    assert name == "batch 512" and overrides == {"batch_size": 512, "lr": 5e-4, "cosine_decay": False}
    assert parse_variant("defaults:") == ("defaults", {})


def test_unknown_variant_setting_is_refused_naming_the_known_ones():
    with pytest.raises(SystemExit, match="unknown setting 'batch'.*batch_size"):
        parse_variant("x:batch=512")


def test_summary_is_mean_and_sd_over_seeds_per_variant():
    rows = [{"variant": "a", "seed": seed, **{key: 1.0 for key in KEYS}, "coverage_ratio": ratio}
            for seed, ratio in ((0, 0.9), (1, 1.0))]  # fmt: skip
    summary = summarise(rows)
    assert summary["a"]["seeds"] == [0, 1] and summary["a"]["coverage_ratio"] == pytest.approx(0.95)
    assert summary["a"]["coverage_ratio_sd"] == pytest.approx(0.0707, abs=1e-4) and summary["a"]["recall_sd"] == 0
    assert "0.950 ± 0.071" in format_summary(summary).splitlines()[1]
