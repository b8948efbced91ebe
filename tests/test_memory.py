"""Memory freed by PyTorch goes back to the system after work, not only at exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monailabel_metaapp.lib import memory

# in a fresh process, so the heap holds only what this check allocates
CHECK = """
import json, torch
from monailabel_metaapp.lib import memory
ticks = [0]
trimmer = memory.Trimmer(lambda: ticks[0])
trimmer.step()
before = memory.resident_mb()
held = [torch.ones(16_000) for _ in range(8_000)]  # about 490 MiB of small tensors, as a study's slices
grown = memory.resident_mb() - before
del held
ticks[0] += 1
freed = trimmer.step()
idle = trimmer.step()
print(json.dumps({"grown": grown, "freed": freed, "idle": idle, "trims": trimmer.trims}))
"""


@pytest.mark.skipif(memory.LIBC is None, reason="glibc's malloc_trim is not available here")
def test_the_trimmer_returns_freed_heap_after_work_and_idles_without_work():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grown"] > 400, r  # the tensors were resident
    assert r["freed"] > 0.8 * r["grown"], f"freed memory stayed resident: {r}"
    assert r["idle"] == 0.0 and r["trims"] == 2, f"no work since the last trim: no trim ({r})"
