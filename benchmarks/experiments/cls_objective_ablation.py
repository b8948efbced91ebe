"""The classifier's meta-objective ablations over meta-training seeds, in one table and one plot.

Reads result files written by `benchmarks/fewshot_cls.py` (one per variant and seed, val and test
splits) and writes `benchmarks/results/cls_ablations/objective.json` + `.png`: per variant, the
mean, the spread and every seed's AUC at each number of shots. Nothing is recomputed here.

    python benchmarks/experiments/cls_objective_ablation.py            # the committed files
    python benchmarks/experiments/cls_objective_ablation.py --out OTHER.json \
        --variant "no KL term=cls_ablations/small_nokl_seed*_{split}.json" ...   # patterns under benchmarks/results
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "results"
ABL = RESULTS / "cls_ablations"
# variant name -> file pattern per split (relative to benchmarks/results)
DEFAULT_VARIANTS = {
    "default (KL 1e-3, Meta-SGD rates)": "cls_ablations/small_brain_seed*_{split}.json",
    "no KL term (lambda 0)": "cls_ablations/small_brain_nokl_seed*_{split}.json",
    "fixed inner-loop rates (no Meta-SGD)": "cls_ablations/small_brain_fixedlr_seed*_{split}.json",
    "without brain studies: default": "cls_ablations/small_seed*_crop_{split}.json",
    "without brain studies: no KL term": "cls_ablations/small_nokl_seed*_{split}.json",
    "without brain studies: fixed rates": "cls_ablations/small_fixedlr_seed*_{split}.json",
}


def meta_auc(path: Path) -> dict[int, float]:
    rows = json.loads(path.read_text())["rows"]
    return {r["shots"]: r["auc_mean"] for r in rows if r["method"] == "meta"}


def summarise(pattern: str) -> dict:
    out = {}
    for split in ("val", "test"):
        files = sorted(glob.glob(str(RESULTS / pattern.format(split=split))))
        if not files:
            raise FileNotFoundError(f"no result file matches {pattern.format(split=split)} under {RESULTS}")
        per_seed = [meta_auc(Path(f)) for f in files]
        shots = sorted(per_seed[0])
        out[split] = {
            "files": [str(Path(f).relative_to(RESULTS)) for f in files],
            "auc_mean": {k: round(float(np.mean([s[k] for s in per_seed])), 4) for k in shots},
            "auc_seed_std": {k: round(float(np.std([s[k] for s in per_seed])), 4) for k in shots},
            "auc_per_seed": {k: [round(s[k], 4) for s in per_seed] for k in shots},
        }
    return out


def plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, split in zip(axes, ("val", "test")):
        for i, (name, s) in enumerate(summary.items()):
            per_seed = s[split]["auc_per_seed"]
            shots = sorted(per_seed, key=int)
            x = np.arange(len(shots)) + (i - (len(summary) - 1) / 2) * 0.8 / len(summary)
            for j, k in enumerate(shots):
                ax.scatter([x[j]] * len(per_seed[k]), per_seed[k], s=12, color=f"C{i}", alpha=0.6)
            ax.plot(x, [s[split]["auc_mean"][k] for k in shots], "_", ms=12, mew=2, color=f"C{i}", label=name)
        ax.set_xticks(range(len(shots)), [f"{k} shot{'s' if int(k) > 1 else ''}" for k in shots])
        ax.set_ylabel(f"PneumoniaMNIST {split} ROC AUC")
        ax.set_title(f"{split}: each dot a meta-training seed, bar the mean")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", help='"NAME=PATTERN" with {split} in the pattern; repeatable')
    ap.add_argument("--out", default=str(ABL / "objective.json"))
    a = ap.parse_args()
    variants = dict(v.split("=", 1) for v in a.variant) if a.variant else DEFAULT_VARIANTS
    summary = {name: summarise(pattern) for name, pattern in variants.items()}
    out = Path(a.out)
    out.write_text(json.dumps({"variants": summary, "patterns": variants}, indent=2))
    plot(summary, out.with_suffix(".png"))
    for name, s in summary.items():
        print(f"{name}: val {s['val']['auc_mean']}  test {s['test']['auc_mean']}")


if __name__ == "__main__":
    main()
