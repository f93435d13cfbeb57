"""The repository loads as a ComfyUI node pack, registers its nodes, and rejects bad input with clear messages."""

from comfyui_env import PACK_NODE_IDS, REPO_ROOT, require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import copy  # noqa: E402

import pytest  # noqa: E402
from comfy_api.latest import io  # noqa: E402
from comfy_tiny import execute, register_test_nodes, tiny_api_prompt, validate  # noqa: E402

DPP_WORKFLOW = REPO_ROOT / "workflows" / "api" / "fewstep_distillation_pp.json"
SD15_WORKFLOW = REPO_ROOT / "workflows" / "api" / "fewstep_sd15_1step.json"


def test_pack_loads_as_a_v3_extension_and_registers_every_node(comfyui):
    nodes = comfyui["nodes"]
    assert nodes.LOADED_MODULE_DIRS["fewstep"] == str(comfyui["custom_nodes_dir"] / "fewstep")
    for node_id in PACK_NODE_IDS:
        node_class = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(node_class, io.ComfyNode) and node_class.RELATIVE_PYTHON_MODULE == "custom_nodes.fewstep"
        schema = node_class.GET_SCHEMA()
        assert schema.category == "sampling/fewstep" and schema.description
        assert all(i.tooltip for i in schema.inputs), f"{node_id} has an input without a tooltip"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name


@pytest.fixture(scope="module")
def sd15_prompt(comfyui):
    register_test_nodes(comfyui["nodes"])
    return tiny_api_prompt(SD15_WORKFLOW, comfyui["loras_dir"])


@pytest.fixture(scope="module")
def dpp_prompt(comfyui):
    register_test_nodes(comfyui["nodes"])
    return tiny_api_prompt(DPP_WORKFLOW, comfyui["loras_dir"])


def _node_of(prompt, class_type):
    return next(node_id for node_id, node in prompt.items() if node["class_type"] == class_type)


def _validation_error(prompt, class_type, **inputs) -> str:
    prompt = copy.deepcopy(prompt)
    node_id = _node_of(prompt, class_type)
    prompt[node_id]["inputs"].update(inputs)
    valid, _, _, node_errors = validate(prompt)
    assert not valid
    return " | ".join(f"{e['message']}: {e['details']}" for e in node_errors[node_id]["errors"])


def test_zero_steps_is_a_validation_error(sd15_prompt, dpp_prompt):
    assert "num_steps must be ≥ 1, got 0" in _validation_error(sd15_prompt, "FewStepKSampler", steps=0)
    assert "num_steps must be ≥ 1, got 0" in _validation_error(dpp_prompt, "FewStepScheduler", steps=0)


@pytest.mark.parametrize("lam", [-0.1, 1.5])
def test_teacher_guidance_outside_0_1_is_a_validation_error(dpp_prompt, lam):
    message = _validation_error(dpp_prompt, "DistillationPPGuider", teacher_guidance=lam)
    bound = "smaller than min of 0.0" if lam < 0 else "bigger than max of 1.0"
    assert "teacher_guidance" in message and bound in message


@pytest.mark.parametrize(
    "timesteps, expected",
    [
        ("999,999,499", "must be strictly descending"),
        ("249,499,749,999", "must be strictly descending"),
        ("1200,500", "must lie in [0, 999]"),
        ("999,-1", "must lie in [0, 999]"),
        ("999;499", "could not parse timesteps"),
    ],
)
def test_bad_custom_timesteps_are_validation_errors(dpp_prompt, timesteps, expected):
    assert expected in _validation_error(dpp_prompt, "FewStepScheduler", timesteps=timesteps)


def test_a_good_custom_list_validates(dpp_prompt):
    prompt = copy.deepcopy(dpp_prompt)
    prompt[_node_of(prompt, "FewStepScheduler")]["inputs"]["timesteps"] = "999, 749, 499, 249"
    assert validate(prompt)[0]


def test_student_and_teacher_of_different_families_fail_with_one_line(dpp_prompt):
    prompt = copy.deepcopy(dpp_prompt)
    prompt["100"] = {"class_type": "FewStepTestTinyCheckpoint", "inputs": {"ckpt_name": "sd15 base"}}
    prompt[_node_of(prompt, "DistillationPPGuider")]["inputs"]["teacher"] = ["100", 0]
    executor = execute(prompt)
    assert not executor.success
    error = next(data for event, data in executor.status_messages if event == "execution_error")
    assert error["node_type"] == "DistillationPPGuider"
    assert error["exception_message"].strip() == (
        "the student is SDXL but the teacher is SD15: Distillation++ needs the teacher the student was distilled from"
    )
