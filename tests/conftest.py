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


# Fabricated base pipelines and run directories shared by the pipeline and push tests (see fake_runs.py).
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
