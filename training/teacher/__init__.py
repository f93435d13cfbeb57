"""Teacher loading: a Hub id or diffusers folder (``loading``), a single-file checkpoint (``single_file``), style
LoRAs fused into it (``style_lora``), and the tiny offline SD1.5/SDXL models that tests and benchmarks build
(``tiny_models``).
"""


class TeacherError(ValueError):
    """The teacher cannot be used: the message names the problem and the fix."""
