"""From two labels on, how fast should refinement move the encoder? Timelines of the same structure,
k and draws at two encoder rates, set side by side: what the app serves (`meta`), unguarded
fine-tuning and scratch at each mark.

Each input is a `metaapp evaluate seg --timeline ... --refine lr_encoder=R --out F.json` result; the
pairs share their command but for R.

    python benchmarks/experiments/encoder_pace.py --runs A_3e-4.json A_1e-3.json B_3e-4.json ... --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from monailabel_metaapp.provenance import stamp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    panels: dict[tuple, dict] = {}
    sources = []
    for f in a.runs:
        d = json.loads(f.read_text())
        rate = d["settings"]["refine"]["lr_encoder"]
        model = Path(d["settings"]["model"]).stem
        sources.append({"file": f.name, "lr_encoder": rate, "settings": d["settings"], "provenance": d["provenance"]})
        for r in (r for r in d["rows"] if r["shots"] >= 2):  # at one label the quick head's teaching sets the pace
            key = (model, r["structure"], r["shots"])
            panels.setdefault(key, {}).setdefault((r["method"], rate), []).append((r["seconds"], r["dice_mean"]))
    rows = [
        {"model": m, "structure": s, "shots": k, "method": method, "lr_encoder": rate, "seconds": t, "dice_mean": d}
        for (m, s, k), lines in sorted(panels.items())
        for (method, rate), pts in sorted(lines.items())
        for t, d in sorted(pts)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.3), squeeze=False)
    for ax, ((m, s, k), lines) in zip(axes[0], sorted(panels.items())):
        for (method, rate), pts in sorted(lines.items()):
            if method == "candidate" or (method == "scratch" and rate != max(r for _, r in lines)):
                continue  # served and unguarded runs at each rate; scratch does not depend on it: one line
            style = "-" if method == "meta" else ":" if method == "finetune" else "--"
            label = f"{'served' if method == 'meta' else method} {rate:g}" if method != "scratch" else method
            pts = sorted(pts)
            ax.plot([t for t, _ in pts], [d for _, d in pts], style, marker=".", label=label)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title(f"{m} / {s} / k = {k}", fontsize=8)
        ax.set_xlabel("seconds after the save")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("Dice on other studies")
    fig.tight_layout()
    a.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out / "pace.png", dpi=110)
    weights = sorted({w for src in sources for w in src["provenance"]["weights"]})
    result = {"rows": rows, "sources": sources, "provenance": stamp(weights)}
    (a.out / "pace.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        if r["method"] == "meta" and r["seconds"] in (60.0, 150.0):
            where = f"{r['model']:>10} {r['structure']:>14} k={r['shots']}"
            print(f"{where} {r['lr_encoder']:g} {r['seconds']:>5.0f}s {r['dice_mean']:.3f}")


if __name__ == "__main__":
    main()
