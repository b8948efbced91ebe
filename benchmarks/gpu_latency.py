"""Core adaptation and refinement latency on one device: the quick head (k=1, one cardiac volume:
embed the support slices and adapt the head) and background refinement (k=3: seconds per
optimiser step and per validation on the held-out study, hence steps within a 150 s budget), timed
after warm-up. Run it with --device cpu and --device cuda for the two sides; the REST figures come
from benchmarks/adapt_latency.py and benchmarks/refine_latency.py.

    python benchmarks/gpu_latency.py MODEL.pt BANK.npz [--value 500] [--repeats 10] [--device auto]
        [--refine-steps 30] [--out FILE.json]

MODEL is a segmentation checkpoint (`metaapp meta-train`), BANK a study bank (`metaapp bank`) whose
first labelled studies are the supports; prints the timings as JSON (and writes them to --out)."""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model, pick_device
from monailabel_metaapp.core.episodes import load_bank
from monailabel_metaapp.core.refine import RefineConfig, Refinement
from monailabel_metaapp.provenance import stamp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("bank")
    ap.add_argument("--value", type=int, default=500, help="label value of the structure (500: LV blood pool)")
    ap.add_argument("--repeats", type=int, default=10, help="timed adaptations, after 2 warm-up ones")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--refine-steps", type=int, default=30, help="timed refinement steps, after 3 warm-up ones")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
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
    predict_seconds = time.perf_counter() - t
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "volume_slices": int(stack.shape[0]),
        "slice_size": int(stack.shape[1]),
        "adapt_seconds_median": statistics.median(times),
        "adapt_seconds_all": times,
        "predict_seconds": predict_seconds,
        "refine": refine_timing(ad, studies[:3], a.value, a.refine_steps, cuda),
        "provenance": stamp([a.model]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text)


def refine_timing(ad: SegAdapter, studies: list, value: int, steps: int, cuda: bool) -> dict:
    """Seconds per refinement step and per validation, k = len(studies), from the quick head."""
    stacks = [s.image.float() / 255 for s in studies]
    masks = [s.label == value for s in studies]
    ref = Refinement(ad, stacks, masks, ad.adapt(stacks, masks), RefineConfig(), seed=0)

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    step = timed(ref.step, steps)
    val = timed(ref.validate, 3)
    per_step = step + val / ref.cfg.val_every  # a validation every val_every steps
    return {
        "shots": len(studies),
        "batch": ref.cfg.batch,
        "step_seconds": step,
        "validate_seconds": val,
        "val_every": ref.cfg.val_every,
        "steps_in_150_s": int(150 / per_step),
    }


if __name__ == "__main__":
    main()
