"""The embedded default: scikit-learn's 8×8 digits as a Stable-Diffusion-format teacher, and the yardstick.

``digits.teacher`` builds (once, cached) the digits data and the tiny SD1.5-format teacher trained on it;
``digits.yardstick`` measures any sampler on it: FD and accuracy from a digit classifier trained on real digits.
Nothing here is needed to distil a real SD1.5/SDXL teacher; it is what lets every code path run on a CPU.
"""
