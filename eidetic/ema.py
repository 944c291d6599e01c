"""Exponential moving average of model weights (kept as a module, so it is checkpointed)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """Shadow copy of ``model`` updated as ``shadow = d * shadow + (1 - d) * weights``.

    With ``warmup`` the decay ramps as ``min(decay, (1 + n) / (10 + n))`` after ``n``
    updates (as diffusers' EMAModel does), so early averages are not dominated by the random
    initialisation. ``num_updates`` is a buffer: a resumed run continues the same ramp.

    Frozen parameters (``requires_grad=False`` when the EMA is made, e.g. the base weights
    under LoRA adapters) are shared with ``model``, not copied: the average covers only
    what trains, the shadow is still a whole model to sample from, and the base weights are
    held once.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self._averaged = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = copy.deepcopy(model, memo=frozen).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            if s is not p:
                s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)
        self.num_updates += 1

    def averaged_names(self) -> list[str]:
        """Names (in ``shadow``) of the parameters this EMA averages: those not shared with the model."""
        return list(self._averaged)

    def train(self, mode: bool = True):  # the shadow always stays in eval mode
        super().train(mode)
        self.shadow.eval()
        return self
