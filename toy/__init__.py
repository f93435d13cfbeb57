"""The exact-teacher test bed: a 2-D Gaussian mixture whose denoiser is closed-form at every t."""
