"""The digits teacher shipped inside the package, so a first ``fewstep demo`` does not spend 15 minutes building it.

``SHIPPED_DIR`` holds one default build (``DigitsTeacherConfig()``) as a ``StableDiffusionPipeline`` folder whose
weights are diffusers' fp16 variant files (``unet/diffusion_pytorch_model.fp16.safetensors``, …), about 10 MB
in all, beside ``fewstep_teacher.json`` (the config it was built from, where and how long) and
``fewstep_yardstick.json`` (its rows on the yardstick, measured after the fp16 round trip). The folder loads as it
is (``StableDiffusionPipeline.from_pretrained(SHIPPED_DIR, variant="fp16")``); :func:`unpack_teacher` writes the
fp32 folder that the cache, the trainer and the yardstick use.

``digits_teacher`` unpacks it whenever the requested config is the one it was built from; any other config, and
``fewstep teacher digits --force``, trains a teacher from its config as before. Maintainers refresh the shipped
files after a change to the build with ``python -m fewstep.digits.refresh_shipped pack BUILT_TEACHER_DIR``
(:mod:`.refresh_shipped`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..training.teacher.loading import BUILD_RECORD_FILE

SHIPPED_DIR = Path(__file__).parent / "shipped_teacher"
WEIGHT_FILES = {  # component → weight file name without extension
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
YARDSTICK_FILE = "fewstep_yardstick.json"


def shipped_record() -> dict | None:
    """The shipped teacher's ``fewstep_teacher.json`` (None when the package has no shipped teacher)."""
    path = SHIPPED_DIR / BUILD_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_yardstick_row(row: str, n: int, seeds, guidance_scale: float) -> list[dict] | None:
    """The shipped teacher's ``row`` at each of ``seeds`` as ``fewstep_yardstick.json`` recorded it (n images, CFG
    ``guidance_scale``); None when the record does not hold every one of them."""
    path = SHIPPED_DIR / YARDSTICK_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("n") != n or record.get("guidance_scale") != guidance_scale or row not in record["rows"]:
        return None
    by_seed = {entry["seed"]: entry for entry in record["rows"][row]["per_seed"]}
    return [by_seed[seed] for seed in seeds] if set(seeds) <= set(by_seed) else None


def _weight_paths(directory: Path, variant: str | None) -> dict[str, Path]:
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return {part: directory / part / f"{name}{suffix}" for part, name in WEIGHT_FILES.items()}


def _convert(source: Path, target: Path, dtype) -> None:
    """Copy a safetensors file with its floating-point tensors cast to ``dtype`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)


def _copy_except(source: Path, target: Path, skip: set[Path]) -> None:
    from ..training.data.cache import MANIFEST

    for path in sorted(source.rglob("*")):
        if path.is_file() and path not in skip and path.name != MANIFEST:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def unpack_teacher(directory: str | Path) -> Path:
    """Write the shipped teacher into ``directory`` as an fp32 pipeline folder, as a build would have left it."""
    import torch

    directory = Path(directory)
    if shipped_record() is None:
        raise FileNotFoundError(f"this fewstep has no shipped digits teacher in {SHIPPED_DIR}")
    fp16 = _weight_paths(SHIPPED_DIR, "fp16")
    _copy_except(SHIPPED_DIR, directory, skip=set(fp16.values()))
    for part, path in _weight_paths(directory, None).items():
        _convert(fp16[part], path, torch.float32)
    return directory


def pack_teacher(built: str | Path, out: str | Path = SHIPPED_DIR) -> Path:
    """Write a built teacher folder as the shipped one: its weights in fp16, everything else as it is."""
    import torch

    built, out = Path(built), Path(out)
    weights = _weight_paths(built, None)
    missing = [str(p) for p in weights.values() if not p.is_file()]
    if missing or not (built / BUILD_RECORD_FILE).is_file():
        raise SystemExit(f"{built} is not a built digits teacher folder (missing {', '.join(missing) or 'its record'})")
    if out.exists():
        shutil.rmtree(out)
    _copy_except(built, out, skip=set(weights.values()))
    for part, path in _weight_paths(out, "fp16").items():
        _convert(weights[part], path, torch.float16)
    return out
