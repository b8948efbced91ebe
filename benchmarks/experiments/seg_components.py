"""Keep only the largest component, or not: the product decides per structure from the support labels.

Keeping each prediction's largest 3D component removes stray blobs around an organ, but erases a
scattered structure (CSF). The product keeps it only when the support labels are themselves one
piece (`adaptation.ONE_PIECE` of their voxels in their largest component). This script compares,
side by side on the same adapted heads, three post-processings: always the largest component (the
behaviour before), never, and the product's rule. One support study per head (1 shot), every other
study predicted, whole-volume 3D Dice on the original grid.

    python benchmarks/experiments/seg_components.py [--model FILE] [--pairs 10]

Data: the brain sample studies built afresh with all six references (grey matter, white matter,
CSF; structures the shipped model never saw) and MS-CMRSeg studies 26-35 (cardiac structures,
one piece each). Writes benchmarks/results/seg_components.json + .png."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monailabel_metaapp.core.adaptation import COMPONENT_KEY, SegAdapter, dice, probabilities_to_labels
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.episodes import label_names
from monailabel_metaapp.core.volume import stack_to_original
from monailabel_metaapp.evaluate import load_eval_studies
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp
from monailabel_metaapp.samples import build_samples
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets

RULES = {"largest component (before)": "always", "no component step": "never", "by the support (product)": "rule"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="weights (default: the shipped checkpoint)")
    ap.add_argument("--pairs", type=int, default=10, help="(support, query) pairs per structure")
    ap.add_argument("--out", default="benchmarks/results/seg_components.json")
    a = ap.parse_args()
    require_shared_datasets()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    build_samples(tmp / "brain", n_studies=6, n_labelled=6, seed=0)
    sets = {"brain sample studies": tmp / "brain", "MS-CMRSeg 26-35": cmr_view(tmp / "cmr", list(range(26, 36)))}
    adapter = SegAdapter(load_model(a.model, torch.device("cpu")), "cpu")
    rows, t0 = [], time.time()
    for set_name, folder in sets.items():
        data = load_eval_studies(folder, adapter.size)
        feats = {s.name: adapter.embed(s.stack) for s in data}
        for value, name in sorted(label_names(folder).items()):
            pairs = [(s, q) for s in data for q in data if s is not q]
            pairs = random.Random(f"{set_name}-{value}").sample(pairs, min(a.pairs, len(pairs)))
            scores: dict[str, list[float]] = {k: [] for k in RULES}
            shares = []
            for s, q in pairs:
                head = adapter.adapt([s.stack], [s.lstack == value], feats=[feats[s.name]])
                shares.append(float(head.params[COMPONENT_KEY]))
                probs = stack_to_original(adapter.predict(q.stack, [head], feats=feats[q.name]), q.geom)
                for label, rule in RULES.items():
                    one_piece = {"always": True, "never": False, "rule": head.one_piece}[rule]
                    pred = probabilities_to_labels(probs, [1], one_piece=one_piece) == 1
                    scores[label].append(dice(pred, q.ref == value))
            row = {"set": set_name, "structure": name, "n": len(pairs), "support_share": round(min(shares), 3)}
            row.update({k: round(statistics.fmean(v), 4) for k, v in scores.items()})
            rows.append(row)
            print(row)
    out = Path(a.out)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/experiments/seg_components.py"
                + (f" --model {a.model}" if a.model else "")
                + f" --pairs {a.pairs}",
                "model": a.model or "shipped",
                "minutes": round((time.time() - t0) / 60, 1),
                "rows": rows,
                "provenance": stamp([a.model or SHIPPED_SEG]),
            },
            indent=2,
        )
    )
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(len(rows))
    for i, label in enumerate(RULES):
        ax.bar(x + (i - 1) * 0.27, [r[label] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [f"{r['structure']}\n(share {r['support_share']:.2f})" for r in rows], fontsize=8)
    ax.set_ylabel("1-shot Dice")
    ax.set_ylim(0, 1)
    ax.set_title("post-processing of the shipped model's predictions")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
