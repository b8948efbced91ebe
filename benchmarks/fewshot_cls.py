"""Few-shot classification, leave-one-dataset-out: meta-train the classifier WITHOUT PneumoniaMNIST
(regions of the cardiac MRI and TotalSegmentator CT studies, and self-supervised tasks on their
slices), then evaluate on PneumoniaMNIST with the `scratch` (ResNet-18) and `linear` baselines.

    python benchmarks/fewshot_cls.py [--minutes 10] [--shots 1,5,10] [--repeats 5]

Needs ../shared/datasets; writes benchmarks/results/fewshot_cls.json + .png and the model's log."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from monailabel_metaapp.core.cls_metatrain import meta_train_cls
from monailabel_metaapp.core.metatrain import MetaTrainConfig
from monailabel_metaapp.evaluate_cls import evaluate_cls, plot
from monailabel_metaapp.shared_data import cmr_view, shared_datasets, totalseg_view


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", help="skip meta-training: evaluate these weights")
    ap.add_argument("--out", default="benchmarks/results/fewshot_cls.json")
    a = ap.parse_args()
    root = shared_datasets()
    if root is None:
        raise SystemExit("../shared/datasets is absent: this benchmark needs real data")
    torch.set_num_threads(2)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = Path(a.model) if a.model else Path(".cache/cls_bench/meta_cls.pt")
    train_summary = None
    if not a.model:
        tmp = Path(tempfile.mkdtemp())
        sources = [cmr_view(tmp / "cmr"), totalseg_view(tmp / "totalseg")]
        cfg = MetaTrainConfig(minutes=a.minutes, tasks_per_step=8, ssl_fraction=0.5, lambda_kl=1e-3)
        train_summary = meta_train_cls(sources, model, cfg, n_way=2, k_shot=5, device="cpu", fresh=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copy(str(model) + ".log.jsonl", out.with_name("fewshot_cls_metatrain.log.jsonl"))
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    result = evaluate_cls(npz, model, [int(s) for s in a.shots.split(",")], a.repeats, ["scratch", "linear"])
    result["meta_train"] = {"sources": ["cmr_bssfp regions + SSL", "totalseg_example regions + SSL"]}
    result["meta_train"].update({"excluded": "pneumoniamnist", "summary": train_summary})
    result["command"] = "python " + " ".join(sys.argv)
    result["minutes"] = round((time.time() - t0) / 60, 1)
    out.write_text(json.dumps(result, indent=2, default=str))
    plot(result, out.with_suffix(".png"))
    for r in sorted(result["rows"], key=lambda r: (r["shots"], r["method"])):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
