"""Core adaptation latency on the GPU (k=1, one cardiac volume): embed the support slices and
adapt the head, timed after warm-up; the CPU figure comes from benchmarks/adapt_latency.py.

    python benchmarks/gpu_latency.py MODEL.pt BANK.npz [--value 500] [--repeats 10] [--device auto]

MODEL is a segmentation checkpoint (`metaapp meta-train`), BANK a study bank (`metaapp bank`) whose
first labelled study is the support; prints the timings as JSON (benchmarks/gpu_run.sh saves them)."""

import argparse
import json
import statistics
import time

import torch

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model, pick_device
from monailabel_metaapp.core.episodes import load_bank
from monailabel_metaapp.provenance import stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("bank")
    ap.add_argument("--value", type=int, default=500, help="label value of the structure (500: LV blood pool)")
    ap.add_argument("--repeats", type=int, default=10, help="timed adaptations, after 2 warm-up ones")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args()
    studies = [s for s in load_bank(a.bank) if s.label is not None and bool((s.label == a.value).any())]
    if not studies:
        raise SystemExit(f"no study of {a.bank} holds label value {a.value}")
    dev = pick_device(a.device)
    cuda = dev.type == "cuda"
    ad = SegAdapter(load_model(a.model), dev)
    stack, mask = studies[0].image.float() / 255, studies[0].label == a.value
    times = []
    for _ in range(a.repeats + 2):
        t = time.perf_counter()
        head = ad.adapt([stack], [mask])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times = times[2:]
    t = time.perf_counter()
    ad.predict(stack, [head])
    if cuda:
        torch.cuda.synchronize()
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "volume_slices": int(stack.shape[0]),
        "slice_size": int(stack.shape[1]),
        "adapt_seconds_median": statistics.median(times),
        "adapt_seconds_all": times,
        "predict_seconds": time.perf_counter() - t,
        "provenance": stamp([a.model]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
