"""The classifier's meta-objective ablations over meta-training seeds, each set folded into one file.

Every variant is a few runs of `benchmarks/fewshot_cls.py` (one per meta-training seed, val and test
splits, written with `--out benchmarks/results/cls_ablations/<variant>_seed<S>_<split>.json`). This
script folds them into one summary per ablation, with each run's command, settings and meta rows
kept, and a plot. Nothing is recomputed.

- `objective.json` + `.png`: the current recipe (16-32-32-32 encoder, centre crop), with and without
  the brain sample studies; default, no KL term, fixed inner-loop rates; four seeds each.
- `before_crop.json`: the earlier recipe (no centre crop): the 32-64-64-64 encoder's variants
  (seed 0 and 1, no KL, KL 1e-2, fixed rates) and the 16-32-32-32 encoder over four seeds.

The per-run files are not kept in the working tree; they are read from git history (``--ref``,
default the last commit that held them) when they are absent.

    python benchmarks/experiments/cls_objective_ablation.py [--ref COMMIT]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
from pathlib import Path

import numpy as np

from monailabel_metaapp.provenance import stamp

BENCH = Path(__file__).resolve().parent.parent
RESULTS = BENCH / "results"
ABL = RESULTS / "cls_ablations"
REPO = BENCH.parent
# the last commit whose tree holds every per-run file
REF = "8aac714"
CPU = "2-core x86-64 CPU, 24 GiB (one torch thread per run)"

CURRENT = {
    "default (KL 1e-3, Meta-SGD rates)": "cls_ablations/small_brain_seed*_{split}.json",
    "no KL term (lambda 0)": "cls_ablations/small_brain_nokl_seed*_{split}.json",
    "fixed inner-loop rates (no Meta-SGD)": "cls_ablations/small_brain_fixedlr_seed*_{split}.json",
    "without brain studies: default": "cls_ablations/small_seed*_crop_{split}.json",
    "without brain studies: no KL term": "cls_ablations/small_nokl_seed*_{split}.json",
    "without brain studies: fixed rates": "cls_ablations/small_fixedlr_seed*_{split}.json",
}
BEFORE_CROP = {
    "32-64-64-64: default (KL 1e-3, Meta-SGD rates), seed 0": "cls_ablations/wide_{split}.json",
    "32-64-64-64: default, seed 1": "cls_ablations/seed1_{split}.json",
    "32-64-64-64: no KL term": "cls_ablations/nokl_{split}.json",
    "32-64-64-64: KL weight 1e-2": "cls_ablations/kl1e-2_{split}.json",
    "32-64-64-64: fixed inner-loop rates": "cls_ablations/fixedlr_{split}.json",
    # seed 0's test run is the leave-one-dataset-out result of that time (fewshot_cls.json at 2554abc)
    "16-32-32-32, seeds 0-3": {
        "val": "cls_ablations/small_val.json cls_ablations/small_seed[123]_val.json",
        "test": "git:2554abc:fewshot_cls.json cls_ablations/small_seed[123]_test.json",
    },
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def expand(pattern: str, ref: str) -> list[tuple[str, str]]:
    """(ref or "", path relative to benchmarks/results) for each file a pattern names."""
    out = []
    for part in pattern.split():
        if part.startswith("git:"):
            _, commit, rel = part.split(":", 2)
            out.append((commit, rel))
            continue
        local = sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.glob(part))
        if local:
            out += [("", p) for p in local]
            continue
        tree = _git("ls-tree", "-r", "--name-only", ref, "benchmarks/results/").split()
        out += [(ref, t.removeprefix("benchmarks/results/")) for t in sorted(tree) if fnmatch.fnmatch(t, f"*/{part}")]
    if not out:
        raise FileNotFoundError(f"no result file matches {pattern} (here or at {ref})")
    return out


def read(commit: str, rel: str) -> dict:
    if not commit:
        return json.loads((RESULTS / rel).read_text())
    return json.loads(_git("show", f"{commit}:benchmarks/results/{rel}"))


def run_record(commit: str, rel: str) -> dict:
    d = read(commit, rel)
    wrote = _git("log", "-1", "--format=%H", commit or "HEAD", "--", f"benchmarks/results/{rel}").strip()
    rows = [r for r in d["rows"] if r["method"] == "meta"]
    s = d.get("settings", {})
    return {
        "file": rel if not commit else f"{rel} at {commit}",
        "command": d.get("command"),
        "settings": {k: s.get(k) for k in ("model", "query_split", "repeats", "shots", "seed", "torch_threads")},
        "meta_train_sources": (d.get("meta_train") or {}).get("sources"),
        "rows": rows,
        "provenance": {
            "commit": wrote or None,
            "weights": "model meta-trained for this result, not kept",
            "recorded_after_the_fact": True,
            "host": CPU,
        },
    }


def summarise(spec: str | dict, ref: str) -> dict:
    out = {}
    for split in ("val", "test"):
        pattern = spec[split] if isinstance(spec, dict) else spec.format(split=split)
        runs = [run_record(c, r) for c, r in expand(pattern, ref)]
        per_seed = [{r["shots"]: r["auc_mean"] for r in run["rows"]} for run in runs]
        shots = sorted(per_seed[0])
        out[split] = {
            "auc_mean": {k: round(float(np.mean([s[k] for s in per_seed])), 4) for k in shots},
            "auc_seed_std": {k: round(float(np.std([s[k] for s in per_seed])), 4) for k in shots},
            "auc_per_seed": {k: [round(s[k], 4) for s in per_seed] for k in shots},
            "runs": runs,
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
    ap.add_argument("--ref", default=REF, help="commit to read per-run files from when they are absent here")
    a = ap.parse_args()
    for name, variants, png in (("objective", CURRENT, True), ("before_crop", BEFORE_CROP, False)):
        summary = {v: summarise(spec, a.ref) for v, spec in variants.items()}
        out = ABL / f"{name}.json"
        record = {"variants": summary, "patterns": variants, "provenance": stamp([])}
        out.write_text(json.dumps(record, indent=2, default=str))
        if png:
            plot(summary, out.with_suffix(".png"))
        for v, s in summary.items():
            print(f"{name}: {v}: val {s['val']['auc_mean']}  test {s['test']['auc_mean']}")


if __name__ == "__main__":
    main()
