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


def test_cpu_tensor_peak_counts_what_is_live_from_the_mark_on():
    import torch

    with memory.CPUTensorPeak() as tracker:
        kept = torch.empty(1_000_000, dtype=torch.uint8)  # live at the mark: counts
        before = torch.empty(5_000_000, dtype=torch.uint8)  # freed before the mark: does not
        del before
        tracker.reset_peak()
        transient = torch.empty(2_000_000, dtype=torch.uint8)
        del transient
        after = torch.empty(500_000, dtype=torch.uint8)
    assert tracker.peak_bytes() == 3_000_000
    del kept, after


def _profiler_peak(prof, mark_ns: int) -> int:
    """The oracle: torch.profiler's CPU allocation events (address, ±size), summed in time order from ``mark_ns``."""
    from torch._C._profiler import _EventType

    allocations, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            allocations.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
    sizes, live, peak = {}, 0, None
    for start_ns, ptr, size in sorted(allocations, key=lambda a: a[0]):
        if peak is None and start_ns >= mark_ns:
            peak = live
        if size > 0:
            sizes[ptr] = size
            live += size
        elif ptr in sizes:
            live -= sizes.pop(ptr)
        if peak is not None:
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize("layout", ["shared", "reference"])
def test_cpu_tensor_peak_agrees_with_the_profilers_allocation_events(layout):
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, memory.CPUTensorPeak() as tracker:
        iteration = memory._build_layout(SETTINGS, layout, torch.device("cpu")).iteration
        iteration()
        time.sleep(0.01)
        mark_ns = time.time_ns()
        tracker.reset_peak()
        time.sleep(0.01)
        iteration()
    oracle = _profiler_peak(prof, mark_ns)
    assert 0.97 * oracle <= tracker.peak_bytes() <= oracle  # the profiler also sees scratch inside kernels


def test_shared_layout_holds_less_tensor_memory_than_the_reference():
    shared, reference = (memory.measure_layout(SETTINGS, layout) for layout in ("shared", "reference"))
    assert shared["peak_kind"] == reference["peak_kind"] == "live CPU tensors (counted per storage)"
    assert shared["peak_gb"] < 0.5 * reference["peak_gb"]


def test_breakdown_times_each_roles_forwards_and_each_optimizer_step():
    breakdown = memory.measure_layout(SETTINGS, "reference")["breakdown"]
    roles = ("generator", "real_score", "fake_score", "discriminator")
    parts = [f"{role} forward" for role in roles] + ["generator optimizer step", "fake_score optimizer step"]
    assert all(breakdown[part] > 0 for part in parts)
    assert 0 < breakdown[memory.BREAKDOWN_REST] < breakdown["iteration"]  # nothing counted twice


def test_table_puts_the_layouts_breakdowns_side_by_side():
    parts = {"generator forward": 1.0, "fake_score optimizer step": 0.5, memory.BREAKDOWN_REST: 2.0, "iteration": 3.5}
    row = lambda scale: {
        "gradient_checkpointing": True, "unets": 1, "peak_gb": scale, "peak_rss_gb": 2 * scale, "peak_kind": "k",
        "seconds_per_iteration": scale, "trainable_params": 1, "breakdown": {k: scale * v for k, v in parts.items()},
    }  # fmt: skip
    result = {
        "architecture": "sd15 UNet", "settings": SETTINGS, "machine": "2 CPU cores", "ratio": 0.5, "time_ratio": 0.5,
        "ratios": {"shared": {"peak": 0.5, "time": 0.5}},
        "layouts": {"shared": row(1.0), "reference": row(2.0)},
        "sdxl_counted": {
            "unet_params": 1e9, "note": "counted", "shared_state_gb": 1, "reference_state_gb": 5, "ratio": 0.2
        },
    }  # fmt: skip
    lines = memory.format_table(result).splitlines()
    optimizer = next(line for line in lines if line.startswith("fake_score optimizer step"))
    assert optimizer.split()[-3:] == ["0.500", "1.000", "0.500"]


def test_an_iteration_leaves_no_autocast_copies_of_the_adapters_alive():
    import torch

    with memory.CPUTensorPeak() as tracker:
        iteration = memory._build_layout({**SETTINGS, "precision": "bf16"}, "shared", torch.device("cpu")).iteration
        iteration()  # AdamW states
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's region: the cache would live until its end
            before = tracker.live
            iteration()
            assert tracker.live == before


def test_the_no_checkpointing_layout_is_the_shared_one_without_checkpointing():
    row = memory.measure_layout(SETTINGS, "shared-no-checkpointing")
    assert row["unets"] == 1 and row["finite"] and not row["gradient_checkpointing"]
    assert memory.measure_layout(SETTINGS, "shared")["gradient_checkpointing"]


def test_an_unknown_layout_is_refused_before_anything_runs():
    import argparse

    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    with pytest.raises(ValueError, match="unknown layout shraed; use shared, reference, shared-no-checkpointing"):
        memory._settings(parser.parse_args(["--layouts", "shared,shraed", "--device", "cpu"]))


@pytest.mark.parametrize("layout", ["shared", "reference"])
def test_the_discriminator_stops_at_the_mid_block_in_both_layouts(layout):
    import torch

    networks = memory._build_layout(SETTINGS, layout, torch.device("cpu")).networks._networks
    fake_unet = networks.unet if layout == "shared" else networks.fake
    up_block_calls = []
    fake_unet.up_blocks[0].register_forward_hook(lambda *args: up_block_calls.append(1))
    cond, _ = memory._conditioning("sd15", 64, torch.device("cpu"))
    x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    assert networks.discriminator(x_t, t, cond).shape == (1,) and up_block_calls == []
    networks.fake_score(x_t, t, cond)
    assert up_block_calls == [1]  # the hook sees a full pass
