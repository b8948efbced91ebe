"""Seconds per training step of refinement and of the scratch baseline, float32 against bfloat16
autocast, side by side in one process on one torch thread.

Refinement trains while the annotator works, so its steps per second decide how soon a better
version can go live. Arms, alternated in rounds so that drift in the machine's load falls on all
alike, each on the sample studies' grey matter (the step's cost depends on the slice size and the
batch, not on the data):
* `refine k=1`: one labelled study, the quick head as teacher on 3 other studies (4 + 4 slices);
* `refine k=2`: two labelled studies, no teacher (4 slices);
* `scratch`: the MONAI UNet trained from random init (`evaluate.ScratchTrainer`, 8 slices).
Each in float32 and under `core.precision.training_autocast` (bfloat16 where the hardware does it
natively; where it does not, both arms run float32 and the ratio is 1).

Usage (about 2 minutes on a 2-core CPU):
    OMP_NUM_THREADS=1 python benchmarks/refine_step_precision.py [--steps 8 --rounds 3]
Results: benchmarks/results/refine_step_precision.json + .png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monailabel_metaapp.core.adaptation import SegAdapter  # noqa: E402
from monailabel_metaapp.core.checkpoint import load_model  # noqa: E402
from monailabel_metaapp.core.precision import bf16_native  # noqa: E402
from monailabel_metaapp.core.refine import RefineConfig, Refinement  # noqa: E402
from monailabel_metaapp.evaluate import ScratchTrainer, load_eval_studies  # noqa: E402
from monailabel_metaapp.evaluate_common import write_result  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "refine_step_precision.json"
GREY_MATTER = 1


def arms(adapter: SegAdapter, studies) -> dict:
    """name -> (float32 stepper, bfloat16 stepper), each a fresh run on the same data."""
    stacks = [s.stack for s in studies]
    masks = [s.lstack == GREY_MATTER for s in studies]
    head1 = adapter.adapt(stacks[:1], masks[:1])
    head2 = adapter.adapt(stacks[:2], masks[:2])

    def refine(k: int, bf16: bool):
        head = head1 if k == 1 else head2
        run = Refinement(adapter, stacks[:k], masks[:k], head, RefineConfig(bf16=bf16), anchors=stacks[2:5])
        return run.step

    def scratch(bf16: bool):
        return ScratchTrainer(stacks[:1], masks[:1], adapter.device, 0, bf16=bf16).step

    return {
        "refine k=1": (refine(1, False), refine(1, True)),
        "refine k=2": (refine(2, False), refine(2, True)),
        "scratch": (scratch(False), scratch(True)),
    }


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["arm"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar([i - 0.2 for i in x], [r["float32_s"] for r in rows], 0.4, label="float32")
    ax.bar([i + 0.2 for i in x], [r["bf16_s"] for r in rows], 0.4, label="bfloat16 autocast")
    for i, r in zip(x, rows):
        ax.text(i + 0.2, r["bf16_s"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds per training step (median)")
    cpu = result.get("provenance", {}).get("host", {}).get("cpu", "")
    ax.set_title(f"a training step on one thread: {cpu}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", default=str(REPO / "sample_studies"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(1)
    adapter = SegAdapter(load_model(None, "cpu"), "cpu")
    studies = load_eval_studies(a.studies, adapter.size)
    runs = arms(adapter, studies)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(a.rounds):
        for name, pair in runs.items():
            for precision, step in enumerate(pair):
                step()  # a warm-up step (first-call allocations) outside the clock
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    step()
                    times.setdefault((name, precision), []).append(time.perf_counter() - t0)
    rows = []
    for name in runs:
        f32, b16 = (statistics.median(times[(name, p)]) for p in (0, 1))
        rows.append({"arm": name, "float32_s": round(f32, 4), "bf16_s": round(b16, 4), "speedup": round(f32 / b16, 2)})
        print(f"{name:12s} float32 {f32:.3f} s  bfloat16 {b16:.3f} s  {f32 / b16:.2f}x")
    result = {
        "settings": {"steps": a.steps, "rounds": a.rounds, "studies": a.studies, "threads": 1},
        "bf16_native": bf16_native("cpu"),
        "rows": rows,
    }
    write_result(result, a.out, plot, weights=[SHIPPED_SEG])
    print(a.out)


if __name__ == "__main__":
    main()
