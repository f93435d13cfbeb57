"""What a run hands to users: LoRA files for diffusers, ComfyUI and A1111 (``lora_files``), ``fewstep export``
(``export``), the model card and its sampling recipes (``model_card``, ``sampling_recipes``), the code a pushed Hub
repo carries (``pushed_code``) and ``fewstep push`` (``hub``).
"""
