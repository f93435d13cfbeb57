"""The loop every method shares: ``trainer.train`` (options and run directory → data → teacher and its family's
defaults → cached encodings (``encodings``) → the method's adapters and loop → resume → iterations (``iterations``)
→ checkpoints (``checkpoints``), validation grids (``validation``), LoRA files), its options (``config``), the update
loops the methods drive (``update_loop``, ``dmd2_loop``), the adapters on the one shared UNet (``networks``), their
EMA (``ema``), precision (``precision``) and processes (``distributed``), and what keeps a run safe (``run_dir``,
``resume``, ``interrupts``, ``errors``), logged (``trackers``) and looked at (``images``).
"""
