"""A pushed fewstep repo is self-contained: ``custom_pipeline=`` works in a diffusers environment without fewstep.

The fast test runs this interpreter in isolated mode (``-I``: no PYTHONPATH, no user site, no current folder)
with ``import fewstep`` made to fail (plain_diffusers_child.py ``--block-fewstep``), and a fresh diffusers module
cache, so only what the pushed folder holds can be used. The slow test (deselected by default) builds a real venv with
torch, diffusers, transformers, safetensors and peft only (``pytest -m slow tests/test_pushed_repo.py``; about a minute
with a warm pip cache).
"""

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from fake_runs import PIPELINE_FILES

from fewstep.cli import main
from fewstep.training.publish.pushed_code import pushed_code

CHILD = Path(__file__).with_name("plain_diffusers_child.py")
REPO = Path(__file__).resolve().parents[1]
COPIED = ["fewstep_common.py", "fewstep_distillpp.py", "fewstep_lora_format.py", "fewstep_sampling.py", "fewstep_schedule.py"]


def push_folder(run, folder, capsys) -> Path:
    assert main(["push", str(run), "--repo-id", "alice/tiny", "--dry-run", "--folder", str(folder),
                 "--base-model", "owner/base"]) == 0  # fmt: skip
    capsys.readouterr()
    return folder


def reference_latents(base, run, family) -> dict:
    """The same samples from fewstep's own pipeline file, in this process (fewstep installed)."""
    from diffusers import DiffusionPipeline

    sys.modules.pop("diffusers_modules.local.pipeline", None)  # see test_push.py: one local pipeline.py per process
    pipe = DiffusionPipeline.from_pretrained(str(base), custom_pipeline=str(PIPELINE_FILES[family]), trust_remote_code=True)
    pipe.load_lora_weights(str(run))
    pipe.set_progress_bar_config(disable=True)
    return {
        f"{steps}-{guidance}": pipe("a cat", num_inference_steps=steps, teacher_guidance=guidance, output_type="latent",
                                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        for steps in (1, 4)
        for guidance in (0.0, 0.3)
    }


def run_child(python: str, base, folder, out, *flags, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(Path(out).parent / "modules"), HF_HUB_OFFLINE="1", **(env_extra or {}))
    result = subprocess.run(
        [python, "-I", str(CHILD), str(base), str(folder), str(out), *flags],
        capture_output=True, text=True, env=env, cwd=Path(out).parent, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "might require the following packages" not in result.stderr
    return torch.load(out, weights_only=False)


def test_pushed_folder_holds_pipeline_py_and_the_fewstep_modules_it_imports(runs, tmp_path, capsys):
    folder = push_folder(runs["sd15"], tmp_path / "upload", capsys)
    assert sorted(p.name for p in folder.glob("*.py")) == sorted(["pipeline.py", *COPIED])
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("fewstep"), f"{path.name} imports {node.module}"


def _without_imports(text: str) -> str:
    tree = ast.parse(text)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                setattr(node, field, [n for n in block if not isinstance(n, (ast.Import, ast.ImportFrom))])
    return ast.dump(tree)


def test_copied_modules_are_the_package_sources_but_for_their_imports():
    """One source: each copy is its fewstep module, statement for statement, except the import statements."""
    sources = {"fewstep_schedule.py": "core/schedule.py", "fewstep_sampling.py": "core/sampling.py",
               "fewstep_distillpp.py": "core/distillpp.py", "fewstep_common.py": "pipelines/common.py",
               "fewstep_lora_format.py": "core/lora_format.py", "pipeline.py": "pipelines/fewstep_sd.py"}  # fmt: skip
    files = pushed_code("sd15")
    assert set(files) == set(sources)
    for name, source in sources.items():
        assert _without_imports(files[name]) == _without_imports((REPO / source).read_text()), name


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pushed_folder_samples_without_fewstep_installed(bases, runs, tmp_path, capsys, family):
    folder = push_folder(runs[family], tmp_path / "upload", capsys)
    results = run_child(sys.executable, bases[family], folder, tmp_path / "out.pt", "--block-fewstep")
    assert results.pop("class") == {"sd15": "FewStepSDPipeline", "sdxl": "FewStepSDXLPipeline"}[family]
    expected = reference_latents(bases[family], runs[family], family)
    assert set(results) == set(expected) == {"1-0.0", "1-0.3", "4-0.0", "4-0.3"}
    for key in expected:
        torch.testing.assert_close(results[key], expected[key], rtol=0, atol=1e-5)
    assert not torch.allclose(results["4-0.0"], results["4-0.3"])  # Distillation++ does act


def test_without_the_block_this_interpreter_would_import_fewstep():
    """So the isolated child's failing ``import fewstep`` (checked inside it) is the block's doing."""
    result = subprocess.run([sys.executable, "-I", "-c", "import fewstep"], capture_output=True, cwd="/")
    assert result.returncode == 0


@pytest.mark.slow
def test_pushed_folder_samples_in_a_venv_with_only_diffusers(bases, runs, tmp_path, capsys):
    """A real venv: torch==2.13.0, diffusers, transformers, safetensors, peft (from the package index; minutes)."""
    import diffusers
    import peft
    import safetensors
    import transformers

    env_dir = tmp_path / "plainenv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"diffusers=={diffusers.__version__}",
            f"transformers=={transformers.__version__}", f"safetensors=={safetensors.__version__}",
            f"peft=={peft.__version__}"]  # fmt: skip
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True, timeout=1800)
    listing = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    assert "fewstep" not in listing
    folder = push_folder(runs["sd15"], tmp_path / "upload", capsys)
    results = run_child(python, bases["sd15"], folder, tmp_path / "out.pt")
    expected = reference_latents(bases["sd15"], runs["sd15"], "sd15")
    for key in expected:
        torch.testing.assert_close(results[key], expected[key], rtol=0, atol=1e-5)
