"""The loop every method shares: ``trainer.train`` (setup → teacher and encodings → the method's adapters and loop →
resume → iterations → checkpoints, validation, LoRA files), its options (``config``), the update loops the methods
drive (``update_loop``, ``dmd2_loop``), the adapters on the one shared UNet (``networks``), and what keeps a run
safe (``run_dir``, ``resume``, ``interrupts``), logged (``trackers``) and looked at (``images``).
"""
