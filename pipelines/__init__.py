"""fewstep's diffusers pipelines: ``fewstep_sd.py`` (SD1.x/2.x) and ``fewstep_sdxl.py`` (SDXL).

Each file holds exactly one ``DiffusionPipeline`` subclass so that it loads as a diffusers custom pipeline:
``DiffusionPipeline.from_pretrained(BASE, custom_pipeline=<file, folder or Hub repo>, trust_remote_code=True)``.
``fewstep push`` uploads the family's file as ``pipeline.py``. What they share lives in ``common.py``.
Nothing heavy is imported here (``import fewstep.pipelines`` does not import diffusers); ``SD_PIPELINE_FILE`` and
``SDXL_PIPELINE_FILE`` are the installed files' paths, for ``custom_pipeline=`` from any working directory.
"""

from pathlib import Path

# The installed pipeline files, for ``custom_pipeline=`` from any working directory (a relative
# "pipelines/fewstep_sd.py" only resolves inside a clone of the repository).
SD_PIPELINE_FILE = str(Path(__file__).with_name("fewstep_sd.py"))
SDXL_PIPELINE_FILE = str(Path(__file__).with_name("fewstep_sdxl.py"))
PIPELINE_FILES = {"sd15": SD_PIPELINE_FILE, "sdxl": SDXL_PIPELINE_FILE}
