"""The SD and SDXL pipelines kept in step, in the spirit of diffusers' ``# Copied from`` check.

What both ``__call__`` share lives in ``pipelines/common.py``. What must stay inline (it reads the call's own
locals) is marked in both files::

    # [in-step: NAME]
    ...
    # [/in-step: NAME]

and each marked block must be identical in the two files. The parameters both ``__call__`` take must have the same
defaults and the same docstring entry, but for the few documented below.
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
FILES = {"sd15": PIPELINES / "fewstep_sd.py", "sdxl": PIPELINES / "fewstep_sdxl.py"}
EXPECTED_BLOCKS = {"settings", "denoisers", "loop"}
# Parameters whose docstring entries differ on purpose: the example timesteps ([399] is DMD2's one-step SDXL UNet)
# and SDXL's zeroed unconditional input (force_zeros_for_empty_prompt).
DOCSTRINGS_MAY_DIFFER = {"timesteps", "negative_prompt"}
MARKER = re.compile(r"^\s*# \[(/?)in-step: ([\w-]+)\]\s*$")


def in_step_blocks(text: str, label: str = "<text>") -> dict[str, str]:
    """NAME → the lines between ``# [in-step: NAME]`` and ``# [/in-step: NAME]``; markers must pair, unnested."""
    blocks, name, lines = {}, None, []
    for number, line in enumerate(text.splitlines(), 1):
        match = MARKER.match(line)
        if match is None:
            if name is not None:
                lines.append(line)
            continue
        closing, found = match.groups()
        if not closing:
            if name is not None:
                raise ValueError(f"{label}:{number}: block {found!r} opens inside block {name!r}")
            if found in blocks:
                raise ValueError(f"{label}:{number}: block {found!r} is marked twice")
            name, lines = found, []
        else:
            if found != name:
                raise ValueError(f"{label}:{number}: [/in-step: {found}] closes {name!r}")
            blocks[name], name = "\n".join(lines) + "\n", None
    if name is not None:
        raise ValueError(f"{label}: block {name!r} is never closed")
    return blocks


def block_diff(name: str, sd: str, sdxl: str) -> str:
    diff = difflib.unified_diff(
        sd.splitlines(keepends=True), sdxl.splitlines(keepends=True),
        f"fewstep_sd.py [in-step: {name}]", f"fewstep_sdxl.py [in-step: {name}]",
    )  # fmt: skip
    return "".join(diff)


def test_marked_blocks_are_identical_in_both_pipelines():
    blocks = {family: in_step_blocks(path.read_text(encoding="utf-8"), path.name) for family, path in FILES.items()}
    assert set(blocks["sd15"]) == set(blocks["sdxl"]), "both pipeline files must mark the same in-step blocks"
    assert EXPECTED_BLOCKS <= set(blocks["sd15"])
    differing = [
        block_diff(name, blocks["sd15"][name], blocks["sdxl"][name])
        for name in sorted(blocks["sd15"])
        if blocks["sd15"][name] != blocks["sdxl"][name]
    ]
    assert not differing, "in-step blocks differ; make both files the same:\n" + "\n".join(differing)


def test_the_block_reader_refuses_broken_markers_and_shows_a_diff():
    text = "a\n    # [in-step: one]\n    x = 1\n    # [/in-step: one]\n"
    assert in_step_blocks(text) == {"one": "    x = 1\n"}
    for broken in ("# [in-step: one]\n", "# [in-step: one]\n# [in-step: two]\n", "# [in-step: one]\n# [/in-step: two]\n"):
        with pytest.raises(ValueError):
            in_step_blocks(broken)
    assert "-    x = 1\n+    x = 2\n" in block_diff("one", "    x = 1\n", "    x = 2\n")


def _call_and_docs():
    from fewstep.pipelines.fewstep_sd import FewStepSDPipeline
    from fewstep.pipelines.fewstep_sdxl import FewStepSDXLPipeline

    return {cls: (inspect.signature(cls.__call__).parameters, _arg_docs(cls.__call__.__doc__)) for cls in
            (FewStepSDPipeline, FewStepSDXLPipeline)}  # fmt: skip


def _arg_docs(doc: str) -> dict[str, str]:
    """name → its entry in the docstring's ``Args:`` section (continuation lines joined)."""
    section = inspect.cleandoc(doc).split("Args:\n", 1)[1].split("Returns:", 1)[0]
    entries, name = {}, None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name, entries[match.group(1)] = match.group(1), match.group(2)
        elif name is not None and line.strip():
            entries[name] += " " + line.strip()
    return entries


def test_shared_call_parameters_have_the_same_defaults_and_docs():
    (sd_params, sd_docs), (sdxl_params, sdxl_docs) = _call_and_docs().values()
    shared = [name for name in sd_params if name in sdxl_params]
    assert {"teacher_guidance", "teacher_guidance_rule", "sampler", "num_inference_steps"} <= set(shared)
    for name in shared:
        assert sd_params[name].default == sdxl_params[name].default, f"{name}: defaults differ"
        assert sd_params[name].annotation == sdxl_params[name].annotation, f"{name}: annotations differ"
    for name in set(sd_docs) & set(sdxl_docs) - DOCSTRINGS_MAY_DIFFER:
        assert sd_docs[name] == sdxl_docs[name], f"docstring entries for {name} differ:\n{sd_docs[name]}\n{sdxl_docs[name]}"
    assert set(sd_docs) == set(sdxl_docs) - {"prompt_2", "negative_prompt_2"}  # SDXL's own second prompt, if documented


def test_each_pipeline_file_holds_one_diffusion_pipeline_class():
    """diffusers' custom_pipeline loader takes the file's one non-diffusers DiffusionPipeline subclass; the shared
    LoRA mixin from common.py is a plain class, so it does not count."""
    import importlib

    from diffusers import DiffusionPipeline

    for family, path in FILES.items():
        module = importlib.import_module(f"fewstep.pipelines.{path.stem}")
        classes = {
            name for name, value in vars(module).items()
            if inspect.isclass(value) and issubclass(value, DiffusionPipeline)
            and not value.__module__.startswith("diffusers")
        }  # fmt: skip
        assert len(classes) == 1, f"{path.name}: {sorted(classes)}"
