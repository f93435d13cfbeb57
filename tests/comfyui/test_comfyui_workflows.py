"""The example workflows: UI copies users drag in match the API copies, and those run headless on tiny models."""

from comfyui_env import REPO_ROOT, require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import json  # noqa: E402

import pytest  # noqa: E402
from comfy_tiny import TINY_LATENT_SIZE, execute, register_test_nodes, tiny_api_prompt  # noqa: E402
from PIL import Image  # noqa: E402

WORKFLOWS = sorted(path.stem for path in (REPO_ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def test_every_ui_workflow_has_an_api_copy():
    assert WORKFLOWS == ["fewstep_distillation_pp", "fewstep_sd15_1step", "fewstep_sdxl_4step"]
    assert WORKFLOWS == sorted(path.stem for path in (REPO_ROOT / "workflows" / "api").glob("*.json"))


def _ui_to_api(ui: dict, node_classes: dict) -> dict:
    """The API prompt the frontend would queue for a UI workflow (widget values in schema order)."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for ui_node in ui["nodes"]:
        if ui_node["type"] == "Note":
            continue
        linked = {i["name"]: links[i["link"]] for i in ui_node["inputs"] if i.get("link") is not None}
        values = iter(ui_node.get("widgets_values", []))
        inputs = {}
        spec = node_classes[ui_node["type"]].INPUT_TYPES()
        for name, (input_type, *options) in {**spec["required"], **spec.get("optional", {})}.items():
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif isinstance(input_type, list) or input_type in WIDGET_TYPES:
                inputs[name] = next(values)
                if options and options[0].get("control_after_generate"):
                    next(values)  # the "fixed"/"randomize" widget the frontend adds after a seed
        assert next(values, None) is None, f"{ui_node['type']} has more widget values than inputs"
        prompt[str(ui_node["id"])] = {"class_type": ui_node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_consistent_and_matches_its_api_copy(comfyui, name):
    ui = json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())
    nodes_by_id = {node["id"]: node for node in ui["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        assert link_id in nodes_by_id[origin]["outputs"][origin_slot]["links"]
        assert nodes_by_id[target]["inputs"][target_slot]["link"] == link_id
        assert nodes_by_id[target]["inputs"][target_slot]["type"] == link_type
    notes = [node for node in ui["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1 and "LoRA" in notes[0]["widgets_values"][0] and "heckpoint" in notes[0]["widgets_values"][0]
    api = json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
    expected = {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in api.items()}
    assert _ui_to_api(ui, comfyui["nodes"].NODE_CLASS_MAPPINGS) == expected


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_runs_headless_and_saves_an_image(comfyui, name):
    register_test_nodes(comfyui["nodes"])
    prompt = tiny_api_prompt(REPO_ROOT / "workflows" / "api" / f"{name}.json", comfyui["loras_dir"])
    executor = execute(prompt)
    assert executor.success, [data for event, data in executor.status_messages if event == "execution_error"]
    save_id = next(node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage")
    (image,) = executor.history_result["outputs"][save_id]["images"]
    path = comfyui["output_dir"] / image["subfolder"] / image["filename"]
    with Image.open(path) as saved:
        assert saved.size == (TINY_LATENT_SIZE * 8, TINY_LATENT_SIZE * 8)
