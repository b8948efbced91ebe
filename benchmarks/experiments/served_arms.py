"""Served Dice of refinement arms side by side: `scratch_candidate.py --methods app` runs that differ
only in `--refine` (and one with `--methods app,scratch` for the baseline), on the same fold weights,
draws and k.

Reads files named `fold<V>_k<K>_<arm>.json` from one or more folders (one folder per draw is fine),
writes `arms.json` (every run's rows with its arm, and the mean over structures and draws of each arm
and k at every mark) and `arms.png` (served Dice against seconds: one panel per k, one line per arm,
the mean over structures and draws).

    python benchmarks/experiments/served_arms.py --runs DIR [DIR ...] --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = re.compile(r"fold(?P<fold>\d+)_k(?P<k>\d+)_(?P<arm>\w+)\.json$")


def read_runs(folders: list[Path]) -> tuple[list[dict], list[dict]]:
    """(rows tagged with fold, k and arm; each file's provenance)."""
    rows, sources = [], []
    for folder in folders:
        for path in sorted(folder.glob("fold*_k*_*.json")):
            m = NAME.search(path.name)
            if not m:
                continue
            data = json.loads(path.read_text())
            sources.append({"file": path.name, "folder": folder.name, "provenance": data.get("provenance")})
            for r in data["rows"]:
                arm = m["arm"] if r["method"] == "app" else r["method"]
                rows.append({**r, "fold": int(m["fold"]), "shots": int(m["k"]), "arm": arm})
    return rows, sources


def means(rows: list[dict]) -> list[dict]:
    """Mean served Dice over structures and draws of each arm, k and mark (quick head rows excluded)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["arm"] != "quick head":
            groups.setdefault((r["shots"], r["arm"], r["seconds"]), []).append(r["dice"])
    return [
        {"shots": k, "arm": arm, "seconds": s, "dice_mean": round(statistics.fmean(d), 4), "n": len(d)}
        for (k, arm, s), d in sorted(groups.items())
    ]


def plot(summary: list[dict], png: Path) -> None:
    ks = sorted({r["shots"] for r in summary})
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for arm in sorted({r["arm"] for r in summary if r["shots"] == k}):
            pts = sorted((r["seconds"], r["dice_mean"]) for r in summary if r["shots"] == k and r["arm"] == arm)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arm)
        ax.set(title=f"k = {k}", xlabel="seconds of compute after the save", ylabel="served Dice", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="folders of fold<V>_k<K>_<arm>.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows, sources = read_runs(args.runs)
    summary = means(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arms.json").write_text(json.dumps({"summary": summary, "rows": rows, "sources": sources}, indent=1))
    plot(summary, args.out / "arms.png")
    for r in summary:
        print(f"k={r['shots']} {r['arm']:10s} {r['seconds']:5.0f} s {r['dice_mean']:.3f} (n={r['n']})")


if __name__ == "__main__":
    main()
