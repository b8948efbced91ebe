"""Which encoder blocks should the classifier's heads see, on a modality it never saw and on the
kind of examples it meta-trained on?

For each meta-trained classifier given, every block's globally averaged output (and some
concatenations) is used as frozen features for few-shot 2-way tasks, k examples per class
(20 seeded supports per k), with the nearest class prototype (cosine, centred on the support mean)
and a logistic regression, ROC AUC:
* `pneumonia-val` / `pneumonia-test`: PneumoniaMNIST (normal vs pneumonia; support from the train
  split, the val split is where choices are made, the test split is reported). The models were
  meta-trained WITHOUT PneumoniaMNIST: the leave-one-dataset-out setting of `fewshot_cls.py`;
* `cardiac myo/lv`, `cardiac lv/rv`: crops around LV myocardium vs LV blood pool, and LV vs RV blood
  pool, on cardiac MRI studies 26-35 (unseen studies of the kind of task meta-training had; the
  support and the queries are different crops of these studies).

    python benchmarks/experiments/cls_feature_blocks.py --models A.pt B.pt [--names "a" "b"] [--out ...json]

Writes JSON (rows: model, task, blocks, shots, proto_auc, linear_auc) and a PNG of 5-shot AUC per
block choice. Needs ../shared/datasets."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from monailabel_metaapp.core.checkpoint import load_cls_model
from monailabel_metaapp.core.cls_data import ClsSet, load_medmnist, region_set
from monailabel_metaapp.core.episodes import load_studies
from monailabel_metaapp.evaluate_cls import embed
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets


def block_features(model, images: torch.Tensor) -> list[np.ndarray]:
    """Globally averaged output of every conv block, (N, C_b) each: the model's own embedding
    (which concatenates them), split back per block."""
    feats = embed(model, images, torch.device("cpu")).numpy()
    return np.split(feats, np.cumsum(model.cfg.channels)[:-1], axis=1)


def _unit(z: np.ndarray) -> np.ndarray:
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-8)


def few_shot_auc(f_tr, y_tr, f_q, y_q, supports, same: bool = False) -> tuple[float, float]:
    """Mean AUC over supports of the prototype and the logistic-regression classifiers (`same`: the
    queries are the pool itself, less the support)."""
    proto, lin = [], []
    for s in supports:
        fs, ys = f_tr[s], y_tr[s]
        fq, yq = f_q, y_q
        if same:
            q = np.setdiff1d(np.arange(len(y_tr)), s)
            fq, yq = f_tr[q], y_tr[q]
        mu, sd = fs.mean(0), fs.std(0) + 1e-6
        p = np.stack([_unit(fs - mu)[ys == c].mean(0) for c in (0, 1)])
        sim = _unit(fq - mu) @ p.T
        proto.append(roc_auc_score(yq, sim[:, 1] - sim[:, 0]))
        clf = LogisticRegression(max_iter=2000).fit((fs - mu) / sd, ys)
        lin.append(roc_auc_score(yq, clf.predict_proba((fq - mu) / sd)[:, 1]))
    return float(np.mean(proto)), float(np.mean(lin))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--names", nargs="+", help="one short description per model (default: the paths)")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--supports", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/cls_feature_blocks.json")
    a = ap.parse_args()
    root = require_shared_datasets()
    torch.set_num_threads(2)
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    shots = [int(k) for k in a.shots.split(",")]
    names = a.names or a.models
    if len(names) != len(a.models):
        raise SystemExit("--names needs one name per model")
    with tempfile.TemporaryDirectory() as tmp:
        cardiac = load_studies([cmr_view(Path(tmp) / "cmr", list(range(26, 36)))], 160, progress=False)
    rows = []
    for path, name in zip(a.models, names):
        model = load_cls_model(path, "cpu")
        train = load_medmnist(npz, "train", model.cfg.size, model.cfg.image_crop)
        regions = region_set(cardiac, model.cfg.size, per_class=60)
        tasks = {  # name: (support pool images, labels, query images, labels)
            f"pneumonia-{split}": (train, load_medmnist(npz, split, model.cfg.size, model.cfg.image_crop))
            for split in ("val", "test")
        }
        for task, (c0, c1) in {"cardiac myo/lv": (0, 1), "cardiac lv/rv": (1, 2)}.items():
            keep = (regions.labels == c0) | (regions.labels == c1)
            pair = ClsSet(regions.images[keep], (regions.labels[keep] == c1).long(), task)
            tasks[task] = (pair, pair)
        for task, (pool, query) in tasks.items():
            y_tr, y_q = pool.labels.numpy(), query.labels.numpy()
            rng = np.random.default_rng(0)
            supports = {
                k: [
                    np.concatenate([rng.choice(np.flatnonzero(y_tr == c), k, replace=False) for c in (0, 1)])
                    for _ in range(a.supports)
                ]
                for k in shots
            }
            f_tr, f_q = block_features(model, pool.images), block_features(model, query.images)
            n = len(f_tr)
            choices = [(b,) for b in range(n)] + [(1, 2), tuple(range(n))]
            for blocks in choices:
                cat_tr = np.concatenate([f_tr[b] for b in blocks], 1)
                cat_q = np.concatenate([f_q[b] for b in blocks], 1)
                for k in shots:
                    p, lin = few_shot_auc(cat_tr, y_tr, cat_q, y_q, supports[k], same=pool is query)
                    row = {"model": name, "task": task, "blocks": list(blocks), "shots": k}
                    rows.append(row | {"proto_auc": round(p, 4), "linear_auc": round(lin, 4)})
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "command": "python " + " ".join(sys.argv),
                "settings": {"supports": a.supports, "shots": shots, "seed": 0},
                "provenance": stamp(a.models),
            },
            indent=2,
        )
    )
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == m and r["shots"] == 5]
        labels = list(dict.fromkeys("+".join(map(str, r["blocks"])) for r in sel))
        x = np.arange(len(labels))
        tasks = list(dict.fromkeys(r["task"] for r in sel))
        w = 0.8 / len(tasks)
        for j, task in enumerate(tasks):
            auc = {"+".join(map(str, r["blocks"])): r["proto_auc"] for r in sel if r["task"] == task}
            ax.bar(x + (j - (len(tasks) - 1) / 2) * w, [auc[lb] for lb in labels], w, label=task)
        ax.set_xticks(x, labels)
        ax.set_ylim(0.6, 1.0)
        ax.set_xlabel("blocks pooled into the embedding")
        ax.set_ylabel("5-shot AUC, prototype classifier")
        ax.set_title(m, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
