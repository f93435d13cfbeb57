"""Sampling settings and Distillation++ inputs, each settled by one core function for every front end.

``core.sampling.resolve_sampling``: explicit arguments > the LoRA's recipe (``fewstep_recipe.json``) > defaults.
``core.distillpp.check_teacher_guidance``: λ, K, the rule and the teacher's CFG scale, with one message style.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fewstep.commands.sample import run_recipe
from fewstep.core.distillpp import check_teacher_guidance
from fewstep.core.sampling import SAMPLERS, SamplingSettings, resolve_sampling

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PROGRESSIVE = {"method": "progressive", "timesteps": [999, 499], "sampler": "ddim"}


# ------------------------------------------------------------------------------------------ resolve_sampling
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, ([999], "few_step")),  # the defaults: one step at T − 1, DMD2's rule
        ({"recipe": PROGRESSIVE}, ([999, 499], "ddim")),  # the LoRA's recipe
        ({"num_steps": 4, "recipe": PROGRESSIVE}, ([999, 749, 499, 249], "ddim")),  # a step count beats its timesteps
        ({"num_steps": 4, "timesteps": [399]}, ([399], "few_step")),  # explicit timesteps beat a step count
        ({"timesteps": (999, 499), "sampler": "few_step", "recipe": PROGRESSIVE}, ([999, 499], "few_step")),
        ({"num_steps": 2, "num_train_timesteps": 500}, ([499, 249], "few_step")),
        ({"num_steps": 4, "first_timestep": 399}, ([399, 299, 199, 99], "few_step")),  # the ComfyUI scheduler's shift
        ({"recipe": {"timesteps": [999.0, 499.0]}}, ([999, 499], "few_step")),  # a recipe without a sampler
    ],
)
def test_explicit_arguments_win_then_the_recipe_then_the_defaults(kwargs, expected):
    assert resolve_sampling(**kwargs) == SamplingSettings(*expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_steps": 0}, "num_steps must be ≥ 1, got 0"),
        ({"num_steps": 1.5}, "num_steps must be an integer, got 1.5"),
        ({"num_steps": True}, "num_steps must be an integer, got True"),
        ({"timesteps": [499, 999]}, "strictly descending"),
        ({"timesteps": [1000]}, "must lie in [0, 999]"),
        ({"sampler": "euler"}, "sampler must be one of few_step, ddim, got 'euler'"),
        ({"recipe": {"timesteps": [999], "sampler": "karras"}}, "sampler must be one of few_step, ddim, got 'karras'"),
        ({"recipe": {"timesteps": [999, 999]}}, "strictly descending"),
    ],
)
def test_bad_settings_are_one_line_errors_quoting_the_value(kwargs, message):
    with pytest.raises(ValueError) as error:
        resolve_sampling(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_samplers_are_the_ones_the_nodes_offer():
    """The nodes' ``sampling`` choices map onto exactly the core's samplers (read without importing ComfyUI)."""
    tree = ast.parse((PACKAGE_ROOT / "nodes" / "comfy_nodes.py").read_text(encoding="utf-8"))
    (samplings,) = [
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SAMPLINGS"]
    ]  # fmt: skip
    assert sorted(samplings.values()) == sorted(SAMPLERS)


def test_the_nodes_scheduler_timesteps_go_through_the_resolver():
    from fewstep.nodes.sigma_space import scheduler_timesteps

    assert scheduler_timesteps(4, 399) == resolve_sampling(4, first_timestep=399).timesteps == [399, 299, 199, 99]
    assert scheduler_timesteps(4, 999, " 999, 499 ") == [999, 499]


def test_fewstep_sample_reads_a_run_config_as_its_fallback_recipe():
    """``fewstep sample``: flags > the LoRA's recipe > the run's training config > one step."""
    assert run_recipe({"timesteps": [999, 399]}, 1000) == {"timesteps": [999, 399]}
    assert run_recipe({"num_steps": 2, "timesteps": None}, 1000) == {"timesteps": [999, 499]}
    assert run_recipe({}, 1000) is None
    fallback = run_recipe({"num_steps": 4}, 1000)
    assert resolve_sampling(None, None, None, fallback).timesteps == [999, 749, 499, 249]
    assert resolve_sampling(2, None, None, fallback).timesteps == [999, 499]


# ------------------------------------------------------------------------------------------ Distillation++ inputs
@pytest.mark.parametrize(
    "args, message",
    [
        ((1.5, 1), "Distillation++ λ must be in [0, 1], got 1.5"),
        ((-0.1, 1), "Distillation++ λ must be in [0, 1], got -0.1"),
        ((float("nan"), 1), "Distillation++ λ must be in [0, 1], got nan"),
        ((0.1, -1), "Distillation++ guided steps must be ≥ 0, got -1"),
        ((0.1, 1.5), "Distillation++ guided steps must be an integer, got 1.5"),
        ((0.1, 1, "lerp"), "Distillation++ rule must be one of x0_lerp, eps_mix, got 'lerp'"),
        ((0.1, 1, "eps_mix", -1.0), "Distillation++ teacher CFG scale must be ≥ 0, got -1.0"),
    ],
)
def test_distillpp_inputs_are_checked_with_one_message_style(args, message):
    with pytest.raises(ValueError) as error:
        check_teacher_guidance(*args)
    assert str(error.value) == message


def test_good_distillpp_inputs_pass():
    check_teacher_guidance(0.0, 0)
    check_teacher_guidance(1, 2, "eps_mix", 0)
    check_teacher_guidance(0.15, 1, "x0_lerp", None)  # no teacher CFG scale: not checked (the core samplers)


FRONT_ENDS = ["pipelines", "nodes", "commands/sample.py", "commands/eval.py"]


def test_no_front_end_checks_distillpp_inputs_itself():
    """The pipelines, nodes and ``fewstep sample`` call ``check_teacher_guidance``; none raises its own λ error."""
    files = [p for entry in FRONT_ENDS for p in sorted((PACKAGE_ROOT / entry).glob("*.py"))] + [
        PACKAGE_ROOT / entry for entry in FRONT_ENDS if entry.endswith(".py")
    ]
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Raise) and node.exc is not None:
                source = ast.get_source_segment(text, node.exc) or ""
                checks_an_input = "must be" in source
                if checks_an_input and any(word in source for word in ("λ", "lambda", "guided", "teacher_guidance", "CFG")):
                    found.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno}")
    assert not found, f"Distillation++ inputs checked outside core.distillpp.check_teacher_guidance: {found}"
