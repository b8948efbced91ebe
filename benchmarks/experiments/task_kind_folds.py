"""Leave-one-structure-out folds meta-trained with different task mixes, side by side.

Each arm is a set of fold results of `benchmarks/fewshot_seg.py` (one JSON per held-out structure,
`meta` rows only is enough). The folds of every arm are scored on the same supports and queries, so
each (fold, k, protocol) compares pairwise: the JSON gives, per arm, the mean Dice and its paired
difference to the first arm with a Wilcoxon signed-rank p over the 10 (support, query) pairs; the
PNG shows the whole-volume Dice per fold and k, one bar per arm.

    python benchmarks/experiments/task_kind_folds.py --arm bank=base/fold200.json,base/fold500.json \\
        --arm merge0=merge0/fold200.json,merge0/fold500.json --out benchmarks/results/loso_bank/merges
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402


def meta_rows(files: list[Path]) -> dict[tuple[str, int, str], list[float]]:
    """(structure, k, protocol) -> the per-pair Dice of the `meta` rows of these fold results."""
    out = {}
    for f in files:
        for r in json.loads(f.read_text())["rows"]:
            if r["method"] == "meta":
                out[(r["structure"], r["shots"], r["protocol"])] = r["values"]
    return out


def compare(arms: dict[str, list[Path]]) -> list[dict]:
    """One row per arm, structure, k and protocol, with its paired difference to the first arm."""
    scored = {name: meta_rows(files) for name, files in arms.items()}
    first = next(iter(scored.values()))
    rows = []
    for name, table in scored.items():
        for key, values in sorted(table.items()):
            base = first.get(key)
            row = {"arm": name, "structure": key[0], "shots": key[1], "protocol": key[2]}
            row |= {"dice_mean": round(statistics.fmean(values), 4), "n": len(values)}
            if base is not None and name != next(iter(scored)) and len(base) == len(values):
                diffs = [v - b for v, b in zip(values, base)]
                row["diff_mean"] = round(statistics.fmean(diffs), 4)
                row["wilcoxon_p"] = round(float(wilcoxon(diffs).pvalue), 4) if any(diffs) else 1.0
            rows.append(row)
    return rows


def plot(rows: list[dict], png: Path) -> None:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    volume = [r for r in rows if r["protocol"] == "volume"]
    cells = sorted({(r["structure"], r["shots"]) for r in volume})
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cells) + 2), 4))
    for a, arm in enumerate(arms):
        dice = {(r["structure"], r["shots"]): r["dice_mean"] for r in volume if r["arm"] == arm}
        ax.bar([i + a * width for i in range(len(cells))], [dice.get(c, 0.0) for c in cells], width, label=arm)
    ax.set_xticks([i + width * (len(arms) - 1) / 2 for i in range(len(cells))])
    ax.set_xticklabels([f"{s}\nk={k}" for s, k in cells], fontsize=8)
    ax.set_ylabel("whole-volume Dice (held-out structure)")
    ax.set_ylim(0, 1)
    ax.set_title("Leave-one-structure-out folds by task mix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", required=True, help="NAME=FILE,FILE,... (the first arm is the baseline)")
    ap.add_argument("--out", type=Path, required=True, help="folder for arms.json and arms.png")
    a = ap.parse_args()
    arms = {}
    for spec in a.arm:
        name, _, files = spec.partition("=")
        arms[name] = [Path(f) for f in files.split(",") if f]
    rows = compare(arms)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = {name: [json.loads(f.read_text()).get("provenance") for f in files] for name, files in arms.items()}
    (a.out / "arms.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    plot(rows, a.out / "arms.png")
    for r in rows:
        extra = f"  {r['diff_mean']:+.3f} (p {r['wilcoxon_p']:.3f})" if "diff_mean" in r else ""
        print(f"{r['arm']:>10} {r['structure']:>14} k={r['shots']} {r['protocol']:>6} {r['dice_mean']:.3f}{extra}")


if __name__ == "__main__":
    main()
