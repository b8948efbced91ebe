"""1-shot Dice of several segmentation checkpoints side by side, on the same random pairs of
MS-CMRSeg studies (one support study, another predicted; whole-volume 3D Dice; the app's own
adaptation and post-processing). In-distribution for models meta-trained on all cardiac
structures: it compares training runs, not generalisation to new structures.

    python benchmarks/experiments/compare_seg_models.py OLD.pt NEW.pt [--pairs 8]
        [--out benchmarks/results/compare_seg_models.json]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.adaptation import SegAdapter, dice, probabilities_to_labels
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.volume import label_slices, read_image, stack_to_original, to_slices
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, require_shared_datasets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/compare_seg_models.json")
    a = ap.parse_args()
    root = require_shared_datasets()
    torch.set_num_threads(2)
    cmr = root / "cmr_bssfp"
    rng = random.Random(a.seed)
    pairs = [tuple(rng.sample(range(1, 36), 2)) for _ in range(a.pairs)]
    result = {"pairs": pairs, "models": {}}
    for path in a.models:
        adapter = SegAdapter(load_model(path))
        cache: dict[int, tuple] = {}

        def load(i: int, adapter=adapter, cache=cache) -> tuple:
            if i not in cache:
                stack, geom = to_slices(read_image(str(cmr / f"image_{i}.nii.gz")), adapter.size)
                lbl = label_slices(read_image(str(cmr / f"label_{i}.nii.gz")), geom, adapter.size)
                ref = sitk.GetArrayFromImage(sitk.ReadImage(str(cmr / f"label_{i}.nii.gz")))
                cache[i] = (stack, geom, lbl, adapter.embed(stack), ref)
            return cache[i]

        per = {}
        for name, value in CMR_STRUCTURES.items():
            scores = []
            for s, q in pairs:
                S, Q = load(s), load(q)
                head = adapter.adapt([S[0]], [S[2] == value], feats=[S[3]])
                probs = stack_to_original(adapter.predict(Q[0], [head], feats=Q[3]), Q[1])
                scores.append(dice(probabilities_to_labels(probs, [1], one_piece=head.one_piece) == 1, Q[4] == value))
            per[name] = {"dice_mean": float(np.mean(scores)), "dice_std": float(np.std(scores)), "dice": scores}
        result["models"][path] = per
        print(path, {n: round(v["dice_mean"], 3) for n, v in per.items()})
    result["provenance"] = stamp(a.models)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
