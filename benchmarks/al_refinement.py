"""Does a structure's model keep improving with more labels when refinement runs between saves?

Two `metaapp simulate-al` runs on the same pool, picks and held-out studies: labels back to back
(quick head only), and 60 s from each save to the next with background refinement on. Each run is
skipped when its result exists in --out, so the plot can be redrawn without training again.

    OMP_NUM_THREADS=1 python benchmarks/al_refinement.py --studies <cmr_bssfp view> [--structure "lv blood pool"]

Results: benchmarks/results/al_refinement/{head,refine}.json and curves.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "al_refinement"
RUNS = {"head": 0, "refine": 60}  # seconds from a save to the next


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", required=True, help="datastore folder with final labels (the references)")
    ap.add_argument("--structure", default="lv blood pool")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--eval-studies", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for name, seconds in RUNS.items():
        path = a.out / f"{name}.json"
        if not path.exists():
            subprocess.run(
                [sys.executable, "-m", "monailabel_metaapp", "simulate-al", "--studies", a.studies,
                 "--structure", a.structure, "--strategies", "random", "--budget", str(a.budget),
                 "--repeats", "1", "--eval-studies", str(a.eval_studies),
                 "--seconds-per-study", str(seconds), "--out", str(path)],
                check=True,
            )  # fmt: skip
        curves[name] = json.loads(path.read_text())["summary"]["random"]["curve"]
    plot(curves, a.structure, a.out / "curves.png")
    for name, c in curves.items():
        print(f"{name}: Dice after 1 label {c[0]:.3f}, after {len(c)} labels {c[-1]:.3f} (+{c[-1] - c[0]:.3f})")


def plot(curves: dict[str, list[float]], structure: str, png: Path) -> None:
    from monailabel_metaapp.evaluate_common import plot_curves

    labels = {"head": "quick head only (labels back to back)", "refine": "refinement on, 60 s between saves"}
    rows = [
        {"method": labels[name], "labels": n, "dice": d, "spread": 0.0}
        for name, c in curves.items()
        for n, d in enumerate(c, start=1)
    ]
    plot_curves(
        rows, png, "dice", "spread", f"{structure} Dice on held-out studies", "labels saved",
        title=f"{structure}: Dice after each saved label", ylim=(0.5, 1.0), x="labels",
    )  # fmt: skip


if __name__ == "__main__":
    main()
