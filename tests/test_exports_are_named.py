"""``fewstep export --checkpoint N`` writes its own folder and records its step; ``fewstep push --lora`` publishes
that export with the grid and the step it comes from (issue 23: exports are named)."""

from __future__ import annotations

import json

import pytest

from fewstep.cli import main

TINY = [
    "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2", "--warmup-steps", "1", "--lr", "1e-3",
    "--checkpoint-every", "2", "--validate-every", "2", "--max-steps", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(teacher, prompts, tmp_path_factory):
    run = tmp_path_factory.mktemp("named") / "run"
    assert main(["train", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run), *TINY]) == 0
    return run


def test_the_trained_lora_records_the_step_it_comes_from(run):
    assert json.loads((run / "lora" / "fewstep_recipe.json").read_text())["step"] == 4


def test_exporting_an_older_checkpoint_writes_its_own_folder_and_leaves_the_runs_lora(run, capsys):
    before = {p.name: p.read_bytes() for p in (run / "lora").iterdir() if p.is_file()}
    assert main(["export", str(run), "--checkpoint", "2"]) == 0
    export = run / "lora-step-0000002"
    assert {p.name: p.read_bytes() for p in (run / "lora").iterdir() if p.is_file()} == before
    recipe = json.loads((export / "fewstep_recipe.json").read_text())
    assert recipe["step"] == 2 and recipe["timesteps"] == [999]
    assert (export / "pytorch_lora_weights.safetensors").read_bytes() != before["pytorch_lora_weights.safetensors"]
    assert "is from step 2" in capsys.readouterr().out


def test_push_publishes_the_export_with_its_own_grid_and_step(run, tmp_path):
    assert main(["export", str(run), "--checkpoint", "2"]) == 0
    export, folder = run / "lora-step-0000002", tmp_path / "upload"
    assert main(["push", str(run), "--lora", str(export), "--repo-id", "alice/step2", "--base-model", "owner/base",
                 "--dry-run", "--folder", str(folder)]) == 0  # fmt: skip
    for name in ("pytorch_lora_weights.safetensors", "fewstep_comfyui.safetensors"):
        assert (folder / name).read_bytes() == (export / name).read_bytes()
    assert json.loads((folder / "fewstep_recipe.json").read_text())["step"] == 2
    assert (folder / "images" / "samples.png").read_bytes() == (run / "samples" / "step-0000002.png").read_bytes()
    assert "| LoRA from training step | 2 of 4 |" in (folder / "README.md").read_text()
