"""The ComfyUI node pack's logic that needs no ComfyUI: the entry point, the sigma-space adapter over fewstep.core,
timestep selection and validation, the version check, the shipped workflow files."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.core.distillpp import sample_distillpp
from fewstep.core.sampling import sample_ddim, sample_few_step
from fewstep.core.schedule import NoiseSchedule
from fewstep.nodes.comfyui_support import comfyui_version_problem
from fewstep.nodes.sigma_space import (
    from_sigma_space,
    sample_sigma_space,
    schedule_from_sigmas,
    scheduler_timesteps,
    sigma_of,
    step_timesteps,
    timesteps_of_sigmas,
    to_sigma_space,
    vp_denoiser,
)

REPO = Path(__file__).resolve().parents[1]
SD = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
# ComfyUI's model_sampling.sigmas for SD1.5/SDXL: σ_t = sqrt((1 − ᾱ_t)/ᾱ_t).
SIGMA_TABLE = ((1 - SD.alphas_cumprod) / SD.alphas_cumprod).sqrt()
COMFY = schedule_from_sigmas(SIGMA_TABLE)


def test_import_fewstep_stays_cheap_and_exposes_only_the_v3_entry_point():
    code = (
        "import sys, fewstep; heavy = [m for m in ('diffusers', 'transformers', 'comfy', 'comfy_api', 'peft') "
        "if m in sys.modules]; print(heavy)"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
    # ComfyUI uses V1 (and ignores comfy_entrypoint) when a pack module defines NODE_CLASS_MAPPINGS.
    assert inspect.iscoroutinefunction(fewstep.comfy_entrypoint) and not hasattr(fewstep, "NODE_CLASS_MAPPINGS")


def test_sigma_table_gives_back_the_schedule_and_dmd2_sigmas():
    torch.testing.assert_close(COMFY.alphas_cumprod, SD.alphas_cumprod, rtol=1e-6, atol=0)
    sigmas = torch.stack([sigma_of(COMFY, t) for t in (999, 749, 499, 249)])
    torch.testing.assert_close(sigmas, torch.tensor([14.6146, 4.0817, 1.6129, 0.6932]), rtol=0, atol=1e-4)
    assert timesteps_of_sigmas(sigmas, COMFY) == [999, 749, 499, 249]


def test_sigma_space_conversion_round_trips():
    x_t, sigma = torch.randn(2, 4, 3, 3), torch.tensor(4.0817)
    torch.testing.assert_close(to_sigma_space(x_t, sigma), x_t * (1 + sigma**2).sqrt())
    torch.testing.assert_close(from_sigma_space(to_sigma_space(x_t, sigma), sigma), x_t)


@pytest.mark.parametrize(
    "steps, first_timestep, custom, expected",
    [
        (1, 999, "", [999]),
        (2, 999, "", [999, 499]),
        (4, 999, "", [999, 749, 499, 249]),
        (8, 999, "", [999, 874, 749, 624, 499, 374, 249, 124]),
        (1, 399, "", [399]),
        (4, 399, "", [399, 299, 199, 99]),
        (4, 999, " 999, 500 ,100 ", [999, 500, 100]),
    ],
)
def test_scheduler_timesteps(steps, first_timestep, custom, expected):
    assert scheduler_timesteps(steps, first_timestep, custom) == expected


@pytest.mark.parametrize(
    "steps, first_timestep, custom, message",
    [
        (0, 999, "", "num_steps must be ≥ 1, got 0"),
        (4, 999, "999,999,499", "must be strictly descending"),
        (4, 999, "249,999", "must be strictly descending"),
        (4, 999, "1200,500", "must lie in [0, 999]"),
        (4, 999, "999,-5", "must lie in [0, 999]"),
        (4, 999, "999;499", "could not parse timesteps '999;499'"),
        (4, 999, "999.5", "must be integers"),
        (8, 3, "", "must be strictly descending"),
    ],
)
def test_bad_timesteps_are_one_line_errors(steps, first_timestep, custom, message):
    with pytest.raises(ValueError) as error:
        scheduler_timesteps(steps, first_timestep, custom)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_step_timesteps_rejects_sigmas_that_do_not_descend():
    sigmas = torch.stack([sigma_of(COMFY, t) for t in (499, 999)] + [torch.tensor(0.0)])
    with pytest.raises(ValueError, match="strictly descending"):
        step_timesteps(sigmas, COMFY)


def _sigma_space_model(denoise, calls):
    """A ComfyUI-style model_x0(x_σ, σ) wrapping an x_t-space denoiser, recording what it is called with."""

    def model_x0(x_sigma, sigma):
        (t,) = timesteps_of_sigmas(sigma[:1], COMFY)
        calls.append((t, x_sigma.clone(), sigma.clone()))
        return denoise(from_sigma_space(x_sigma, sigma[0]), t)

    return model_x0


def _analytic(x_t, t):
    """The exact x0 denoiser of data x0 ~ N(0, 0.25·I): E[x0 | x_t] = a·s²/(a²s² + 1 − a²)·x_t."""
    a = SD.alphas_cumprod[t].sqrt()
    return a * 0.25 / (a**2 * 0.25 + 1 - a**2) * x_t


@pytest.mark.parametrize("timesteps", [[999], [399], [999, 749, 499, 249]])
def test_sample_sigma_space_is_core_sample_few_step_behind_comfyuis_contract(timesteps):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.stack([sigma_of(COMFY, t) for t in timesteps] + [torch.tensor(0.0)])
    calls = []
    # ComfyUI hands the sampler pure noise scaled into sigma space (FewStepKSAMPLER's max_denoise start).
    x = to_sigma_space(noise, sigmas[0])
    out = sample_sigma_space(
        _sigma_space_model(_analytic, calls), x, sigmas, step_timesteps(sigmas, COMFY), COMFY,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    expected = sample_few_step(_analytic, noise, timesteps, SD, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert [t for t, _, _ in calls] == timesteps
    torch.testing.assert_close(calls[0][1], x, rtol=1e-5, atol=1e-5)  # the first input is the pure noise itself
    torch.testing.assert_close(calls[0][2], sigmas[:1].expand(2), rtol=1e-6, atol=0)


def test_a_split_schedule_hands_over_a_renoised_sample_in_sigma_space():
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.stack([sigma_of(COMFY, t) for t in (999, 749, 499)])  # ends at σ(499), not 0
    out = sample_sigma_space(
        _sigma_space_model(_analytic, []), to_sigma_space(noise, sigmas[0]), sigmas, [999, 749], COMFY,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    x0 = sample_few_step(_analytic, noise, [999, 749], SD, generator)
    expected = to_sigma_space(SD.add_noise(x0, torch.randn(x0.shape, generator=generator), 499), sigmas[-1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timesteps", [[999], [999, 499], [999, 749, 499, 249]])
def test_ddim_through_the_adapter_is_core_sample_ddim(timesteps):
    """The FewStep Sampler's ``ddim`` choice (Progressive Distillation students) is the pipelines' sampler."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.stack([sigma_of(COMFY, t) for t in timesteps] + [torch.tensor(0.0)])
    student = lambda x_t, t: 0.5 * _analytic(x_t, t)  # not the exact denoiser, so DDIM and re-noising differ
    out = sample_sigma_space(
        _sigma_space_model(student, []), to_sigma_space(noise, sigmas[0]), sigmas, timesteps, COMFY,
        torch.Generator().manual_seed(1), sampler="ddim",
    )  # fmt: skip
    torch.testing.assert_close(out, sample_ddim(student, noise, timesteps, SD), rtol=1e-5, atol=1e-5)
    if len(timesteps) > 1:
        renoised = sample_few_step(student, noise, timesteps, SD, torch.Generator().manual_seed(1))
        assert (out - renoised).abs().max() > 1e-2


def test_a_split_ddim_schedule_hands_over_its_deterministic_step():
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.stack([sigma_of(COMFY, t) for t in (999, 749, 499)])  # ends at σ(499), not 0
    out = sample_sigma_space(
        _sigma_space_model(_analytic, []), to_sigma_space(noise, sigmas[0]), sigmas, [999, 749], COMFY, sampler="ddim"
    )
    expected = to_sigma_space(sample_ddim(_analytic, noise, [999, 749], SD, end_timestep=499), sigmas[-1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_distillpp_through_the_adapter_is_core_sample_distillpp():
    from fewstep.core.distillpp import distillpp_refiner

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = [999, 749, 499, 249]
    sigmas = torch.stack([sigma_of(COMFY, t) for t in timesteps] + [torch.tensor(0.0)])
    student = lambda x_t, t: 0.5 * _analytic(x_t, t)
    teacher_model = _sigma_space_model(_analytic, [])
    generator = torch.Generator().manual_seed(1)
    refine = distillpp_refiner(vp_denoiser(teacher_model, COMFY), timesteps, 0.3, 2, COMFY, generator)
    out = sample_sigma_space(
        _sigma_space_model(student, []), to_sigma_space(noise, sigmas[0]), sigmas, timesteps, COMFY, generator, refine
    )  # fmt: skip
    expected = sample_distillpp(student, _analytic, noise, timesteps, SD, 0.3, 2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "version, too_old", [("0.3.40", True), ("0.3.63", True), ("0.3.64", False), ("0.4.0", False), ("1.0.0", False),
                         ("v0.3.64", False), (None, False), ("nightly", False)],
)  # fmt: skip
def test_comfyui_version_check(version, too_old):
    problem = comfyui_version_problem(version)
    assert (problem is not None) == too_old
    if too_old:
        assert "need ComfyUI ≥ 0.3.64" in problem and version in problem and "\n" not in problem


def test_too_old_comfyui_gets_a_clear_message_at_load_time():
    fake = "import sys, types; sys.modules['comfyui_version'] = types.SimpleNamespace(__version__='0.3.40'); "
    # Imported by an old ComfyUI: logged at import (pre-V3 releases never call comfy_entrypoint) ...
    logged = subprocess.run([sys.executable, "-c", fake + "import fewstep"], capture_output=True, text=True, check=True)
    assert "fewstep's nodes need ComfyUI ≥ 0.3.64 (V3 node API); this is ComfyUI 0.3.40" in logged.stderr
    # ... and raised by the entry point, which ComfyUI reports as the pack's load error.
    entry = "import asyncio, fewstep; asyncio.run(fewstep.comfy_entrypoint())"
    raised = subprocess.run([sys.executable, "-c", fake + entry], capture_output=True, text=True)
    assert raised.returncode != 0 and "RuntimeError: fewstep's nodes need ComfyUI ≥ 0.3.64" in raised.stderr


def test_workflows_ship_in_ui_and_api_format_with_a_note():
    names = sorted(path.name for path in (REPO / "workflows").glob("*.json"))
    assert names == sorted(path.name for path in (REPO / "workflows" / "api").glob("*.json")) and len(names) == 3
    for name in names:
        ui = json.loads((REPO / "workflows" / name).read_text())
        api = json.loads((REPO / "workflows" / "api" / name).read_text())
        graph = {str(node["id"]): node["type"] for node in ui["nodes"] if node["type"] != "Note"}
        assert graph == {node_id: node["class_type"] for node_id, node in api.items()}
        (note,) = [node["widgets_values"][0] for node in ui["nodes"] if node["type"] == "Note"]
        assert "Checkpoint" in note and "LoRA" in note
