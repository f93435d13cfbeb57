"""The digits teacher shipped in the package: small, fp16, the default build, unpacked instead of trained."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.digits import shipped, teacher as digits
from fewstep.digits.teacher import DigitsTeacherConfig, digits_teacher
from fewstep.training.data import cache


pytestmark = pytest.mark.usefixtures("cache_dir")  # every test gets its own cache root, never the user's


@pytest.fixture
def builds(monkeypatch):
    """Record teacher trainings instead of running them (15 minutes each)."""
    calls = []

    def recording_build(config, directory, progress=True, device="cpu"):
        calls.append(config)
        shipped.unpack_teacher(directory)  # any complete folder will do for the cache

    monkeypatch.setattr(digits, "build_digits_teacher", recording_build)
    return calls


def test_shipped_teacher_is_fp16_and_at_most_12_mb():
    files = [p for p in shipped.SHIPPED_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 12_000_000
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    for path in weights:
        assert path.name.endswith(".fp16.safetensors")
        assert {t.dtype for t in load_file(path).values() if t.is_floating_point()} == {torch.float16}


def test_shipped_teacher_was_built_from_the_default_config():
    """Changing DigitsTeacherConfig's defaults or the build's VERSION without re-shipping fails here."""
    record = shipped.shipped_record()
    assert record["version"] == digits.VERSION
    assert record["config"] == dataclasses.asdict(DigitsTeacherConfig())
    assert digits.ships(DigitsTeacherConfig()) and not digits.ships(DigitsTeacherConfig(seed=1))


def test_shipped_teacher_records_its_yardstick_rows():
    measured = json.loads((shipped.SHIPPED_DIR / shipped.YARDSTICK_FILE).read_text())
    assert measured["n"] >= 2000 and len(measured["seeds"]) >= 3
    assert {"teacher_50", "teacher_4", "teacher_1"} <= set(measured["rows"])


def test_default_teacher_is_unpacked_not_trained(builds):
    from diffusers import StableDiffusionPipeline

    entry = digits_teacher(progress=False)
    assert builds == [] and cache.check_entry(entry) is None
    unet = load_file(entry / "unet" / "diffusion_pytorch_model.safetensors")
    stored = load_file(shipped.SHIPPED_DIR / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert unet.keys() == stored.keys()
    assert all(unet[k].dtype == torch.float32 and torch.equal(unet[k], stored[k].float()) for k in unet)
    assert digits.read_teacher_config(entry) == DigitsTeacherConfig()
    pipe = StableDiffusionPipeline.from_pretrained(entry)
    assert pipe.unet.dtype == torch.float32


def test_force_trains_the_default_teacher_from_its_config(builds):
    digits_teacher(force=True, progress=False)
    assert builds == [DigitsTeacherConfig()]


def test_another_config_is_trained(builds):
    digits_teacher(DigitsTeacherConfig(seed=1), progress=False)
    assert builds == [DigitsTeacherConfig(seed=1)]


def test_shipped_folder_loads_in_diffusers_as_the_fp16_variant():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shipped.SHIPPED_DIR, variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
