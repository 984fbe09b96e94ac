"""``train --ema DECAY``: an exponential moving average of the weights, the model that is validated,
checkpointed as ``model`` and exported.

After every optimizer step each floating-point entry of the network's ``state_dict`` (weights and
BatchNorm running statistics) moves towards the trained network's: ``avg += (1 - d) * (w - avg)``,
with the usual warm-up ``d = min(DECAY, (1 + t) / (10 + t))`` at step t (1-based, counted over the
whole run), so the first steps are not dominated by the random initial weights; integer entries
(BatchNorm's batch counter) are copied. The average of the late, noisy steps of a run generalises
better than its last point (Polyak averaging; "mean teacher", SWA), at one extra copy of the
weights and one lerp per step.

Every rank updates the same average from the same DDP weights; the BatchNorm statistics differ by
rank, and validation takes rank 0's (segray/worker.py). Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib

import torch


def decay_at(decay: float, step: int) -> float:
    """The decay applied at (1-based) step ``step`` of the run: warm-up, then ``decay``."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """The moving average of ``net``'s state_dict; ``state`` is what checkpoints save as ``model``."""

    def __init__(self, net: torch.nn.Module, decay: float, state: dict | None = None, step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must be between 0 and 1 (exclusive), got {decay!r}")
        self.decay = decay
        self.step = step
        source = state if state is not None else net.state_dict()
        self.state = {k: v.detach().clone() for k, v in source.items()}

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.step += 1
        d = decay_at(self.decay, self.step)
        for key, value in net.state_dict().items():
            avg = self.state[key]
            if avg.is_floating_point():
                avg.lerp_(value.detach().to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, net: torch.nn.Module):
        """``net`` holds the average inside the block and its own weights again after it."""
        own = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self.state)
        try:
            yield net
        finally:
            net.load_state_dict(own)
