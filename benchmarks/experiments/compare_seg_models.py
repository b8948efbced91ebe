"""1-shot Dice of several segmentation checkpoints side by side, on the same random pairs of studies
(one support study, another predicted; whole-volume 3D Dice; the app's own adaptation and
post-processing). On MS-CMRSeg (the default) it is in-distribution for models meta-trained on all
cardiac structures: it compares training runs, not generalisation to new structures. `--studies`
takes any datastore folder with final labels and a labels.json, e.g. the brain sample studies,
which no shipped model saw in meta-training.

    python benchmarks/experiments/compare_seg_models.py OLD.pt NEW.pt [--pairs 8] [--studies DIR]
        [--out benchmarks/results/compare_seg_models.json]

With two models the JSON also holds, per structure, the paired difference (second minus first)
and a Wilcoxon signed-rank p-value over the pairs.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.stats import wilcoxon

from monailabel_metaapp.core.adaptation import SegAdapter, dice, probabilities_to_labels
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.volume import label_slices, read_image, stack_to_original, to_slices
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets

SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def labelled_studies(folder: Path) -> list[tuple[Path, Path]]:
    """(image, final label) of every study of a datastore folder that has a final label, by name."""
    out = []
    for img in sorted(folder.iterdir()):
        if img.name.endswith(SUFFIXES) and (folder / "labels" / "final" / img.name).exists():
            out.append((img, folder / "labels" / "final" / img.name))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--studies", help="datastore folder (default: the MS-CMRSeg studies of ../shared/datasets)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/compare_seg_models.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.studies:
        folder = Path(a.studies)
    else:
        require_shared_datasets()
        folder = cmr_view(Path(tempfile.mkdtemp()) / "cmr")
    studies = labelled_studies(folder)
    structures = json.loads((folder / "labels.json").read_text())
    rng = random.Random(a.seed)
    picks = [tuple(rng.sample(range(len(studies)), 2)) for _ in range(a.pairs)]
    names = [studies[i][0].name.split(".")[0] for i in range(len(studies))]
    result = {"studies": str(a.studies or "MS-CMRSeg bSSFP"), "pairs": [[names[s], names[q]] for s, q in picks]}
    result["models"] = {}
    for path in a.models:
        adapter = SegAdapter(load_model(path))
        cache: dict[int, tuple] = {}

        def load(i: int, adapter=adapter, cache=cache) -> tuple:
            if i not in cache:
                image, label = studies[i]
                stack, geom = to_slices(read_image(str(image)), adapter.size)
                lbl = label_slices(read_image(str(label)), geom, adapter.size)
                ref = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
                cache[i] = (stack, geom, lbl, adapter.embed(stack), ref)
            return cache[i]

        per = {}
        for name, value in structures.items():
            scores = []
            for s, q in picks:
                S, Q = load(s), load(q)
                head = adapter.adapt([S[0]], [S[2] == value], feats=[S[3]])
                probs = stack_to_original(adapter.predict(Q[0], [head], feats=Q[3]), Q[1])
                scores.append(dice(probabilities_to_labels(probs, [1], one_piece=head.one_piece) == 1, Q[4] == value))
            per[name] = {"dice_mean": float(np.mean(scores)), "dice_std": float(np.std(scores)), "dice": scores}
        result["models"][path] = per
        print(path, {n: round(v["dice_mean"], 3) for n, v in per.items()})
    if len(a.models) == 2:
        first, second = (result["models"][m] for m in a.models)
        result["paired"] = {}
        for name in structures:
            d = np.array(second[name]["dice"]) - np.array(first[name]["dice"])
            p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
            result["paired"][name] = {"diff_mean": float(d.mean()), "wilcoxon_p": p}
        mean = float(np.mean([second[n]["dice_mean"] - first[n]["dice_mean"] for n in structures]))
        result["paired"]["mean over structures"] = {"diff_mean": mean}
        print("second - first:", {n: round(v["diff_mean"], 3) for n, v in result["paired"].items()})
    result["provenance"] = stamp(a.models)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))


def plot(result: dict, png: Path) -> None:
    """Mean 1-shot Dice per structure, one bar per model, the pairs' standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    names = list(result["models"][models[0]])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        per = result["models"][m]
        x = np.arange(len(names)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, [per[n]["dice_mean"] for n in names], width, yerr=[per[n]["dice_std"] for n in names],
               label=Path(m).name, capsize=3)  # fmt: skip
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("1-shot Dice (whole volume)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['studies']}, {len(result['pairs'])} study pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
