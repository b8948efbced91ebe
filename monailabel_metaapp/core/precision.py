"""Mixed precision for the training loops that run beside the annotator (refinement, and the
baselines it is measured against).

A refinement step of the meta-learned network costs 0.4-0.9 s on one core of a 2-core CPU in float32.
Under bfloat16 autocast the encoder's convolutions cost about half, and the step about two thirds
(1.4-1.5x the steps in the same seconds), on CPUs whose vector units do bfloat16 (x86 AVX512-BF16 or
AMX, recent Arm) and on GPUs. Where the hardware does not, autocast would emulate it and be slower,
so it is used only where it is native. Weights, optimiser state, losses and every prediction the app
serves stay in float32: only the encoder's forward pass of a training step runs in bfloat16.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether `device_type` ("cpu", "cuda") runs bfloat16 convolutions natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def training_autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for a training step's forward pass on `device` when `enabled` and native
    there (`bf16_native`); a no-op context otherwise."""
    kind = torch.device(device).type
    if enabled and bf16_native(kind):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()
