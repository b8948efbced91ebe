"""Where a meta-training step's time goes: sampling, forward, backward, all-reduce, optimiser.

On CUDA each phase ends with a synchronise, so kernels queued in one phase are not billed to the next.
The share of sampling is the figure that predicts how well a faster device is used: a device that makes
forward and backward ten times faster leaves sampling's seconds as they are.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

PHASES = ("sampling", "forward", "backward", "optimiser", "all-reduce")


class StepTimer:
    """Accumulates seconds per phase over the steps it times.

    Args:
        device: the training device (synchronised at each phase's end when it is CUDA).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {p: 0.0 for p in PHASES}
        self.steps = 0
        self.episodes = 0

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - t0

    def total(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict:
        total = self.total() or float("nan")
        return {
            "steps": self.steps,
            "episodes": self.episodes,
            "seconds": round(self.total(), 3),
            "share": {p: round(s / total, 4) for p, s in self.seconds.items()},
            "seconds_per_step": round(self.total() / max(1, self.steps), 4),
            "episodes_per_second": round(self.episodes / total, 3),
        }

    def line(self) -> str:
        """`profile: sampling X%, forward Y%, backward Z%, optimiser W%, all-reduce V%, E episodes/s`."""
        d = self.to_dict()
        parts = ", ".join(f"{p} {100 * d['share'][p]:.1f}%" for p in PHASES)
        return f"profile: {parts}, {d['episodes_per_second']:.2f} episodes/s"
