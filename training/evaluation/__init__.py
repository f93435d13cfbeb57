"""Measuring a student against its teacher on any SD1.5/SDXL model: ``fewstep eval --prompts`` and ``fewstep train
--eval-every``.

- :mod:`.metric_models`: the feature networks (DINOv2 for the Fréchet distance, as Stein et al. 2023 recommend; CLIP
  for the CLIP score and a second FD), loaded from the Hub or a folder, with their preprocessing written in torch;
- :mod:`.rows`: what is sampled — the teacher at N DDIM steps with CFG, the student at its recorded recipe, the
  student with Distillation++ and its noise-only control — on the same prompts and noise;
- :mod:`.scoring`: every row's features and CLIP scores, and the metrics table (the math is ``core.metrics``);
- :mod:`.report`: the table as text and Markdown, and ``report.html``, ``report.png`` and ``metrics.json``;
- :mod:`.in_training`: the same metrics on a few prompts every ``--eval-every`` iterations, logged to the trackers.
"""
