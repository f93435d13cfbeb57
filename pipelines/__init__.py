"""fewstep's diffusers pipelines: ``fewstep_sd.py`` (SD1.x/2.x) and ``fewstep_sdxl.py`` (SDXL).

Each file holds exactly one ``DiffusionPipeline`` subclass so that it loads as a diffusers custom pipeline:
``DiffusionPipeline.from_pretrained(BASE, custom_pipeline=<file, folder or Hub repo>, trust_remote_code=True)``.
``fewstep push`` uploads the family's file as ``pipeline.py``. What they share lives in ``common.py``.
Nothing is imported here, so ``import fewstep.pipelines`` does not import diffusers.
"""
