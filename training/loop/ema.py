"""An exponential moving average of the generator adapter (``--ema-decay``): what users get, validated and exported."""

from __future__ import annotations

import contextlib

import torch

from .networks import GENERATOR


class AdapterEMA:
    """Exponential moving average of the generator adapter (updated after each generator step)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the adapter (for validation, checkpoints and export)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def load_peft_state_dict(self, unet, state_dict: dict) -> None:
        from peft import set_peft_model_state_dict

        backup = [p.detach().clone() for p in self.params]
        set_peft_model_state_dict(unet, state_dict, adapter_name=GENERATOR)
        self.shadow = [p.detach().clone().float() for p in self.params]
        with torch.no_grad():
            for p, b in zip(self.params, backup):
                p.copy_(b)


def ema_weights(ema: AdapterEMA | None):
    """The EMA weights in the generator adapter while inside, when the run keeps an EMA; else the adapter as trained."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()
