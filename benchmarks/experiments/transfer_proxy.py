"""Does a run's 1-shot Dice on structures no run was trained on rank the runs of a fold by transfer?

Runs of one fold recipe transfer very differently to the held-out structure, and their labelled
validation loss does not say which. A check that could pick the run is a few-shot score on
structures that are new to every run and are not the fold's held-out structure: here the brain
sample studies' tissues (`metaapp evaluate seg --studies sample_studies --shots 1`). Per tissue and
for their mean, the Spearman correlation over runs with the fold's 1-shot whole-volume Dice
(`benchmarks/fewshot_seg.py`), JSON + a scatter PNG.

    python benchmarks/experiments/transfer_proxy.py --run s0=fold/s0.json,brain/s0.json \\
        --run s1=fold/s1.json,brain/s1.json --out benchmarks/results/loso_bank/merges/brain_proxy/proxy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402


def one_shot(path: Path, protocol: str | None = None) -> dict[str, float]:
    """structure -> the `meta` row's 1-shot mean Dice (fold results: the whole-volume protocol)."""
    rows = json.loads(path.read_text())["rows"]
    return {
        r["structure"]: r["dice_mean"]
        for r in rows
        if r["method"] == "meta" and r["shots"] == 1 and (protocol is None or r.get("protocol") == protocol)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=FOLD_JSON,PROXY_JSON")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = {}
    for spec in a.run:
        name, files = spec.split("=", 1)
        fold_file, proxy_file = (Path(f) for f in files.split(","))
        held_out = one_shot(fold_file, "volume")
        proxy = one_shot(proxy_file)
        runs[name] = {"held_out": statistics.fmean(held_out.values()), "proxy": proxy}
        runs[name]["proxy"]["mean"] = statistics.fmean(proxy.values())
    names = list(runs)
    target = [runs[n]["held_out"] for n in names]
    checks = {}
    for key in runs[names[0]]["proxy"]:
        rho = spearmanr([runs[n]["proxy"][key] for n in names], target)
        checks[key] = {"spearman": round(float(rho.statistic), 3), "p": round(float(rho.pvalue), 3)}
        print(f"{key:>14}: Spearman {rho.statistic:+.2f} (p {rho.pvalue:.2f}) over {len(names)} runs")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "spearman": checks, "files": a.run}, indent=2))
    fig, axes = plt.subplots(1, len(checks), figsize=(4 * len(checks), 3.6), squeeze=False)
    for ax, (key, c) in zip(axes[0], checks.items()):
        ax.scatter([runs[n]["proxy"][key] for n in names], target)
        for n in names:
            ax.annotate(n, (runs[n]["proxy"][key], runs[n]["held_out"]), fontsize=7)
        ax.set_xlabel(f"1-shot Dice, {key}")
        ax.set_title(f"Spearman {c['spearman']:+.2f} (p {c['p']:.2f})", fontsize=9)
    axes[0][0].set_ylabel("held-out structure, 1-shot Dice")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
