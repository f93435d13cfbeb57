import os

import torch

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The test models are tiny: one thread is as fast, and several threads busy-waiting on a shared 2-core machine
# were measured 3–100× slower.
torch.set_num_threads(1)
