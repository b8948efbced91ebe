"""Memory freed by PyTorch goes back to the system after work, not only at exit."""

from __future__ import annotations

import pytest
import torch

from monailabel_metaapp.lib import memory


@pytest.mark.skipif(memory.LIBC is None, reason="glibc's malloc_trim is not available here")
def test_the_trimmer_returns_freed_heap_after_work_and_idles_without_work():
    ticks = [0]
    trimmer = memory.Trimmer(lambda: ticks[0])
    trimmer.step()  # settle
    before = memory.resident_mb()
    # many small tensors live in glibc's heap (below its mmap threshold), as a study's slices do
    held = [torch.ones(16_000) for _ in range(8_000)]  # about 490 MiB
    del held
    ticks[0] += 1
    freed = trimmer.step()
    assert freed > 200 and memory.resident_mb() < before + 150, (freed, before, memory.resident_mb())
    assert trimmer.step() == 0.0 and trimmer.trims == 2, "no work since the last trim: no trim"
