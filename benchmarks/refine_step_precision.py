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


def median_step_seconds(runs: dict, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    """name -> median seconds per step of each of its two steppers; the arms alternate in rounds so that
    drift in the machine's load falls on all alike, each after a warm-up step outside the clock."""
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, pair in runs.items():
            for i, step in enumerate(pair):
                step()
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step()
                    times.setdefault((name, i), []).append(time.perf_counter() - t0)
    return {name: (statistics.median(times[(name, 0)]), statistics.median(times[(name, 1)])) for name in runs}


def plot_pairs(result: dict, png: Path, keys: tuple[str, str], labels: tuple[str, str], title: str) -> None:
    """Bars of each row's two seconds per step (`keys`), the ratio above the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar([i - 0.2 for i in x], [r[keys[0]] for r in rows], 0.4, label=labels[0])
    ax.bar([i + 0.2 for i in x], [r[keys[1]] for r in rows], 0.4, label=labels[1])
    for i, r in zip(x, rows):
        ax.text(i + 0.2, r[keys[1]], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), [r["arm"] for r in rows])
    ax.set_ylabel("seconds per training step (median)")
    cpu = result.get("provenance", {}).get("host", {}).get("cpu", "")
    ax.set_title(f"{title} on one thread: {cpu}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot(result: dict, png: Path) -> None:
    plot_pairs(result, png, ("float32_s", "bf16_s"), ("float32", "bfloat16 autocast"), "a training step")


def setup(description: str, out: Path) -> tuple[argparse.Namespace, SegAdapter, list]:
    """(arguments, the shipped model's adapter on one thread, the studies) of a step-cost comparison."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--studies", default=str(REPO / "sample_studies"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=out)
    a = ap.parse_args()
    torch.set_num_threads(1)
    adapter = SegAdapter(load_model(None, "cpu"), "cpu")
    return a, adapter, load_eval_studies(a.studies, adapter.size)


def main() -> None:
    a, adapter, studies = setup(__doc__.split("\n\n")[0], OUT)
    rows = []
    for name, (f32, b16) in median_step_seconds(arms(adapter, studies), a.rounds, a.steps).items():
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
