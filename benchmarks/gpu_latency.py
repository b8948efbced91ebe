"""Core adaptation latency on the GPU (k=1, one cardiac volume): embed the support slices and
adapt the head, timed after warm-up; the CPU figure comes from benchmarks/adapt_latency.py."""

import json
import statistics
import sys
import time

import torch

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.episodes import load_bank

model_path, bank_path = sys.argv[1], sys.argv[2]
studies = [s for s in load_bank(bank_path) if s.label is not None]
dev = "cuda" if torch.cuda.is_available() else "cpu"
ad = SegAdapter(load_model(model_path), dev)
s = studies[0]
stack, mask = s.image.float() / 255, s.label == 500
times = []
for _ in range(12):
    t = time.perf_counter()
    head = ad.adapt([stack], [mask])
    if dev == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
times = times[2:]
t = time.perf_counter()
probs = ad.predict(stack, [head])
if dev == "cuda":
    torch.cuda.synchronize()
print(
    json.dumps(
        {
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "volume_slices": int(stack.shape[0]),
            "slice_size": int(stack.shape[1]),
            "adapt_seconds_median": statistics.median(times),
            "adapt_seconds_all": times,
            "predict_seconds": time.perf_counter() - t,
        },
        indent=2,
    )
)
