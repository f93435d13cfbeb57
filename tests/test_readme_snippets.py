"""The README's diffusers snippet, run as a user runs it: from a directory that is not the repository."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_snippet_names_the_installed_pipeline_file_not_a_relative_path():
    snippet = README.read_text().split("## diffusers", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "from fewstep.pipelines import SD_PIPELINE_FILE" in snippet
    assert not re.search(r"custom_pipeline=\"pipelines/", snippet)


def test_the_diffusers_snippet_works_from_any_working_directory(bases, runs, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from fewstep.pipelines import SD_PIPELINE_FILE

    monkeypatch.chdir(tmp_path)  # an empty directory: no pipelines/ folder next to the user
    pipe = DiffusionPipeline.from_pretrained(str(bases["sd15"]), custom_pipeline=SD_PIPELINE_FILE, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(runs["sd15"]))
    image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape[0] == 1 and torch.isfinite(image).all()
