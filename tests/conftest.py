import os

import pytest
import torch

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The test models are tiny: one thread is as fast, and several threads busy-waiting on a shared 2-core machine
# were measured 3–100× slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def library_log_handlers_on_the_session_stderr():
    """diffusers and transformers make their log handler on first use, bound to the sys.stderr of that moment. If
    that moment is inside a test that captures stderr (capsys), the stream is closed after it and every later
    warning prints a "--- Logging error ---" traceback into another test's stderr. Make them now instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")
    transformers_logging.get_logger("transformers")


@pytest.fixture(scope="session", autouse=True)
def encoding_cache_of_the_session(tmp_path_factory):
    """Every run's encodings go to a cache of the test session's own, never the user's ``~/.cache/fewstep``; tests
    that look into the cache take ``cache_dir`` (their own)."""
    import os

    from fewstep.training.data.encoding_cache import CACHE_DIR_VARIABLE

    saved = os.environ.get(CACHE_DIR_VARIABLE)
    os.environ[CACHE_DIR_VARIABLE] = str(tmp_path_factory.mktemp("encodings"))
    yield
    os.environ.pop(CACHE_DIR_VARIABLE) if saved is None else os.environ.__setitem__(CACHE_DIR_VARIABLE, saved)


# Each family's tiny pipeline saved as a user's base model folder, and fabricated run directories on them, shared by
# the pipeline, push and LoRA-file tests (see fake_runs.py).
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from fake_runs import FAMILIES, make_base_dir

    return {family: make_base_dir(family, tmp_path_factory.mktemp(f"base-{family}")) for family in FAMILIES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bases):
    from fake_runs import FAMILIES, make_run_dir

    return {
        family: make_run_dir(family, tmp_path_factory.mktemp(f"run-{family}"), str(bases[family])) for family in FAMILIES
    }


# Tiny teachers and training data shared by the training tests. Saved once per session and read-only: a test that
# changes a teacher or a data folder copies it first (or makes its own).
@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The tiny SD1.5-shaped teacher (ε-prediction, seed 0) as a diffusers folder."""
    from fewstep.training.teacher import tiny_models

    return tiny_models.save_tiny_pipeline(tiny_models.build_tiny_sd15_pipeline(), tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Tiny teacher folders by ``(family, prediction_type)``: SD1.5 and SDXL shapes, each with ε and v."""
    from fewstep.training.teacher import tiny_models

    builders = {"sd15": tiny_models.build_tiny_sd15_pipeline, "sdxl": tiny_models.build_tiny_sdxl_pipeline}
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for family, build in builders.items():
        for prediction_type in ("epsilon", "v_prediction"):
            paths[family, prediction_type] = tiny_models.save_tiny_pipeline(
                build(prediction_type=prediction_type), root / f"{family}-{prediction_type}"
            )
    return paths


@pytest.fixture(scope="session")
def prompts(tmp_path_factory):
    """A prompts file of three prompts, with a blank line in it (which the reader skips, as in users' files)."""
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("a photo of a cat\na red car\n\na dog on the beach\n")
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A captioned image folder: three 40×36 images (not square, not the training size), each with a ``.txt``."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for i, caption in enumerate(["a red car", "a photo of a cat", "a blue sky"]):
        Image.new("RGB", (40, 36), (60 * i, 100, 200 - 50 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache root of the test's own (``FEWSTEP_CACHE``), never the user's, and no network to fill it from."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FEWSTEP_CACHE", str(root))
    monkeypatch.delenv("FEWSTEP_ENCODING_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root
