"""``fewstep bench memory``'s layouts on a tiny SD1.5-shaped UNet (the real sizes are a benchmark, not a test)."""

import pytest

from fewstep.benchmarks import memory, sd15

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
SETTINGS = dict(
    family="sd15", rank=4, resolution=64, device="cpu", precision="fp32", gradient_checkpointing=True, iterations=1
)


@pytest.fixture(autouse=True)
def tiny_unet(monkeypatch):
    monkeypatch.setattr(sd15, "SD15_UNET", TINY_UNET)


@pytest.mark.parametrize("layout, unets", [("shared", 1), ("reference", 3)])
def test_each_layout_runs_a_finite_dmd2_iteration(layout, unets):
    result = memory.measure_layout(SETTINGS, layout)
    assert result["unets"] == unets and result["finite"] and result["peak_gb"] > 0
    assert "profile" not in result


def test_profile_names_every_network_role():
    profile = memory.measure_layout({**SETTINGS, "profile": 5}, "shared")["profile"]
    for role in ("generator", "real_score", "fake_score", "discriminator"):
        assert f"fewstep::{role}" in profile
    assert "per role" in profile
