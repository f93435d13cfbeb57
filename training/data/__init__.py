"""Training data: prompt files and captioned image folders (``prompts``), Hugging Face datasets (``hf_dataset``),
the teacher ODE pairs of DMD and progressive distillation (``pair_cache``) and the build-once cache (``cache``).
"""
