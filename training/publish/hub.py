"""Publishing a fewstep run on the Hugging Face Hub: the upload folder, its model card, and the upload.

The folder holds everything a user needs in each of the three places a LoRA is loaded:

* ``README.md``: the model card (YAML metadata: base_model, license, tags, pipeline_tag, library_name; usage for
  diffusers, ComfyUI and A1111; the training config; metrics when the run has them; the latest sample grid);
* ``pytorch_lora_weights.safetensors`` (diffusers/PEFT) and ``fewstep_comfyui.safetensors`` (kohya: ComfyUI, A1111);
* ``pipeline.py`` and the ``fewstep_*.py`` modules it imports relatively (:mod:`.pushed_code`), so that
  ``DiffusionPipeline.from_pretrained(BASE, custom_pipeline="USER/NAME", trust_remote_code=True)`` works in a
  plain diffusers environment, without fewstep installed;
* ``config.yaml`` (without local paths), ``metrics.json`` (if any) and ``images/samples.png`` (if any).

The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``); nothing here reads or
prints it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..loop.config import load_yaml
from .lora_files import DIFFUSERS_LORA_WEIGHT_NAME, FAMILIES, RECIPE_FILE, lora_family_of_state_dict
from .model_card import KOHYA_WEIGHT_NAME, SAMPLE_GRID, looks_like_hub_id, model_card, public_config, public_metrics
from .pushed_code import write_pushed_code
from .sampling_recipes import recipe_from_config

# Licenses of the reference base models; a LoRA inherits its base model's license (override with --license).
BASE_LICENSES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++"}


class PublishError(ValueError):
    """The run cannot be published as it is: the message names the problem and the fix."""


@dataclass
class Run:
    """What a fewstep run directory holds that the Hub folder needs."""

    directory: Path
    family: str
    config: dict
    metrics: dict | None
    sample_grid: Path | None
    lora_dir: Path | None = None  # the LoRA folder published: RUN_DIR/lora, or an export (RUN_DIR/lora-step-N)
    metrics_file: Path | None = None  # RUN_DIR/metrics.json, else the last evaluation's RUN_DIR/eval/metrics.json

    @property
    def lora(self) -> Path:
        return self.lora_dir or self.directory / "lora"

    @property
    def diffusers_lora(self) -> Path:
        return self.lora / DIFFUSERS_LORA_WEIGHT_NAME

    @property
    def kohya_lora(self) -> Path:
        return self.lora / KOHYA_WEIGHT_NAME

    @property
    def recipe(self) -> dict:
        """How the LoRA samples: ``lora/fewstep_recipe.json`` (written by the trainer for every method), else what
        the config implies (a DMD2 run: its timesteps, DMD2's rule)."""
        if self.directory is not None:  # a Run made in code (no directory) has only its config
            path = self.lora / RECIPE_FILE
            if path.is_file():
                recipe = json.loads(path.read_text())
                return {**recipe, "timesteps": [int(t) for t in recipe["timesteps"]]}
        return recipe_from_config(self.config)

    @property
    def timesteps(self) -> list[int]:
        return self.recipe["timesteps"]


def read_run(run_dir: str | Path, lora_dir: str | Path | None = None) -> Run:
    """Check a run directory has both LoRA files (in ``lora_dir``, default ``RUN_DIR/lora``) and a config; read its
    family, config, metrics and the validation grid of the step the LoRA comes from."""
    directory = Path(run_dir).expanduser()
    if not directory.is_dir():
        raise PublishError(f"run directory {str(run_dir)!r} does not exist")
    lora = Path(lora_dir).expanduser() if lora_dir else directory / "lora"
    for required, fmt in ((DIFFUSERS_LORA_WEIGHT_NAME, "diffusers"), (KOHYA_WEIGHT_NAME, "comfyui")):
        if not (lora / required).is_file():
            where = f"--lora {str(lora_dir)!r}" if lora_dir else f"run directory {str(run_dir)!r}"
            missing = required if lora_dir else f"lora/{required}"
            raise PublishError(
                f"{where} has no {missing}; finish training, or write it from a checkpoint with "
                f"`fewstep export {run_dir} --format {fmt}`"
            )
    if not (directory / "config.yaml").is_file():
        raise PublishError(f"run directory {str(run_dir)!r} has no config.yaml; give the --output of fewstep train")
    config = load_yaml(directory / "config.yaml")
    family = lora_family_of_state_dict(lora / DIFFUSERS_LORA_WEIGHT_NAME) or config.get("model_type")
    if family not in FAMILIES:
        raise PublishError(f"cannot tell whether the LoRA in {str(run_dir)!r} is for SD1.5 or SDXL")
    # The run's own metrics.json, else what `fewstep train --eval-every` (or `fewstep eval --out RUN_DIR/eval`) wrote.
    candidates = (directory / "metrics.json", directory / "eval" / "metrics.json")
    metrics_file = next((path for path in candidates if path.is_file()), None)
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file is not None else None
    except ValueError as error:
        raise PublishError(f"{metrics_file} is not valid JSON ({error}); fix or remove it") from None
    return Run(directory, family, config, metrics, _grid_of(directory, lora), lora, metrics_file)


def _grid_of(directory: Path, lora: Path) -> Path | None:
    """The validation grid of the step the LoRA comes from (its recipe's ``step``), else the last one; an export
    of an older step without a grid of its own shows none rather than a later step's."""
    grids = sorted((directory / "samples").glob("step-*.png"))
    recipe_file = lora / RECIPE_FILE
    step = json.loads(recipe_file.read_text()).get("step") if recipe_file.is_file() else None
    if step is None:
        return grids[-1] if grids else None
    own = directory / "samples" / f"step-{int(step):07d}.png"
    return own if own.is_file() else None


def base_model_of(run: Run, override: str | None = None) -> str:
    """The base model's Hub id: ``--base-model``, else the run's teacher when that is a Hub id."""
    if override:
        if not looks_like_hub_id(override):
            raise PublishError(f"--base-model {override!r} is not a Hub model id like 'owner/name'")
        return override
    teacher = str(run.config.get("teacher") or "")
    if looks_like_hub_id(teacher):
        return teacher
    raise PublishError(
        f"the run's teacher {teacher!r} is a local folder or file, not a Hub id; pass --base-model OWNER/NAME "
        "(the Hub model it was saved from)"
    )


# ------------------------------------------------------------------------------------------ folder and upload
def build_upload_folder(
    run_dir: str | Path,
    repo_id: str,
    folder: str | Path,
    base_model: str | None = None,
    license: str | None = None,
    lora_dir: str | Path | None = None,
) -> Path:
    """Write the upload folder for ``run_dir`` (its LoRA in ``lora_dir``, default ``RUN_DIR/lora``) into
    ``folder`` (created; must be empty or new)."""
    check_repo_id(repo_id)
    run = read_run(run_dir, lora_dir)
    base = base_model_of(run, base_model)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PublishError(f"--folder {str(folder)!r} is a file; give a new or empty folder")
    if folder.exists() and any(folder.iterdir()):
        raise PublishError(f"upload folder {str(folder)!r} is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.diffusers_lora, folder / DIFFUSERS_LORA_WEIGHT_NAME)
    shutil.copyfile(run.kohya_lora, folder / KOHYA_WEIGHT_NAME)
    # The pipeline reads it on load_lora_weights(repo_id): the LoRA's timesteps and sampler become its defaults.
    (folder / RECIPE_FILE).write_text(json.dumps(run.recipe, indent=2) + "\n")
    write_pushed_code(run.family, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(public_config(run.config, base), sort_keys=False))
    if run.metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(public_metrics(run.metrics), indent=2) + "\n")
    if run.sample_grid is not None:
        (folder / SAMPLE_GRID).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.sample_grid, folder / SAMPLE_GRID)
    card = model_card(run, repo_id, base, license or BASE_LICENSES[run.family])
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(" " in part for part in parts):
        raise PublishError(f"--repo-id {repo_id!r} must look like USER/NAME")


def upload(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo (if needed) and upload ``folder`` in one commit; returns the repo URL.

    ``HF_ENDPOINT`` is read at call time, so a mirror (or a test server) set after import is honoured.
    """
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use --dry-run")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    api = HfApi(endpoint=endpoint)
    try:
        # private=None (not False) for a public push: an organisation's default visibility then applies.
        repo_url = api.create_repo(repo_id, exist_ok=True, private=True if private else None, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload fewstep DMD2 LoRA, model card and pipeline",
        )
    except Exception as error:
        raise _upload_error(error, endpoint) from None
    return str(repo_url)


def _upload_error(error: Exception, endpoint: str) -> Exception:
    """A failed upload as one line naming the host and what to do; errors that are not the Hub's pass through."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    reason = " ".join(str(error).split()[:40]) or type(error).__name__
    if isinstance(error, LocalTokenNotFoundError):
        return PublishError("no Hugging Face token; set HF_TOKEN or run `hf auth login`, or use --dry-run")
    if isinstance(error, HfHubHTTPError):
        return PublishError(f"the Hub at {endpoint} refused the upload ({reason}); check the token's write access")
    if isinstance(error, OSError) or _is_transport_error(error):
        return PublishError(
            f"could not reach {endpoint} ({reason}); check the network connection (or HF_ENDPOINT) and push again, "
            "or build the folder with --dry-run"
        )
    return error


def _is_transport_error(error: Exception) -> bool:
    """httpx's (and its forks') connection and timeout errors, named by class so no HTTP client is imported."""
    return any(cls.__name__ in ("TransportError", "ConnectionError", "Timeout") for cls in type(error).__mro__)
