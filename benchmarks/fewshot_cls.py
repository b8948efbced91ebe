"""Few-shot classification, leave-one-dataset-out: meta-train the classifier WITHOUT PneumoniaMNIST
(regions of the cardiac MRI and TotalSegmentator CT studies and of the brain template's sample
studies, and self-supervised tasks on their slices), then evaluate on PneumoniaMNIST with the
`scratch` (ResNet-18) and `linear` baselines.

    python benchmarks/fewshot_cls.py [--minutes 10] [--shots 1,5,10] [--repeats 5]
        [--max-way 5] [--augment 1] [--abnormal-fraction 0.3]   # harder episodes
        [--ssl-target]   # + SSL tasks on PneumoniaMNIST's train IMAGES (labels never read)
        [--split val]    # classify the val split (for choices) instead of the test split
        [--lambda-kl 0] [--fixed-lr]   # ablations of the meta-objective's KL term and learned rates
        [--no-brain]     # without the brain sample studies (the recipe before they were added)
        [--extra-source DIR]   # + another datastore folder or bank (regions + SSL)

Variants:
* strict (default): no PneumoniaMNIST at all in meta-training;
* `--ssl-target`: the product's story, a site meta-trains self-supervised on its own unlabelled
  images: PneumoniaMNIST's train images join the unlabelled pool (`unlabelled:FILE`, which loads
  only `train_images`; its labels, val and test splits are never read by meta-training).

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

from monailabel_metaapp.core.checkpoint import save_json, sidecar
from monailabel_metaapp.core.cls_metatrain import UNLABELLED_PREFIX, meta_train_cls
from monailabel_metaapp.core.cls_model import ClsModelConfig
from monailabel_metaapp.core.metatrain import MetaTrainConfig
from monailabel_metaapp.evaluate_cls import evaluate_cls, plot
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.samples import build_samples
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets, totalseg_view


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the time budget)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a shared CPU)")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", help="skip meta-training: evaluate these weights")
    ap.add_argument("--train-out", default=".cache/cls_bench/meta_cls.pt", help="where meta-training writes weights")
    ap.add_argument("--out", default="benchmarks/results/fewshot_cls.json")
    ap.add_argument("--max-way", type=int, default=0, help="episodes of 2..max-way classes (0: always 2)")
    ap.add_argument("--augment", type=float, default=0.0, help="augmentation strength of the region tasks")
    ap.add_argument("--abnormal-fraction", type=float, default=0.0, help="share of synthetic normal/abnormal tasks")
    ap.add_argument("--ssl-fraction", type=float, default=0.5)
    ap.add_argument("--ssl-target", action="store_true", help="add PneumoniaMNIST train images, unlabelled")
    ap.add_argument(
        "--no-brain",
        action="store_true",
        help="leave out the sample studies (MNI152 brain template, grey/white matter and CSF), built afresh",
    )
    ap.add_argument(
        "--extra-source",
        action="append",
        default=[],
        help="another datastore folder or bank to meta-train on (regions + SSL); repeatable",
    )
    ap.add_argument("--channels", default="16,32,32,32")
    ap.add_argument("--lambda-kl", type=float, default=1e-3, help="weight of the KL term (0 turns it off)")
    ap.add_argument("--fixed-lr", action="store_true", help="inner-loop rates fixed at their init (no Meta-SGD)")
    ap.add_argument("--seed", type=int, default=0, help="meta-training seed (the supports do not depend on it)")
    ap.add_argument("--split", default="test", choices=["test", "val"], help="the PneumoniaMNIST split classified")
    ap.add_argument("--baselines", default="scratch,linear")
    a = ap.parse_args()
    root = require_shared_datasets()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    model = Path(a.model) if a.model else Path(a.train_out)
    train_summary = None
    sources_desc = ["cmr_bssfp regions + SSL", "totalseg_example regions + SSL"]
    if not a.no_brain:
        sources_desc.append("MNI152 sample studies (metaapp samples, seed 0) regions + SSL")
    if a.ssl_target:
        tasks = "SSL and synthetic abnormal tasks" if a.abnormal_fraction > 0 else "SSL tasks"
        sources_desc.append(f"pneumoniamnist train images, unlabelled ({tasks}; labels never read)")
    sources_desc += [f"{Path(p).name} regions + SSL" for p in a.extra_source]
    if not a.model:
        tmp = Path(tempfile.mkdtemp())
        sources = [cmr_view(tmp / "cmr"), totalseg_view(tmp / "totalseg")]
        if not a.no_brain:  # built afresh: the committed sample_studies/ may hold an annotator's labels
            build_samples(tmp / "brain", seed=0)
            sources.append(tmp / "brain")
        if a.ssl_target:
            sources.append(f"{UNLABELLED_PREFIX}{npz}")
        sources += a.extra_source
        cfg = MetaTrainConfig(
            minutes=a.minutes,
            max_steps=a.max_steps,
            tasks_per_step=8,
            ssl_fraction=a.ssl_fraction,
            lambda_kl=a.lambda_kl,
            learned_lr=not a.fixed_lr,
            seed=a.seed,
        )
        cfg.cls_max_way, cfg.cls_augment, cfg.cls_abnormal_fraction = a.max_way, a.augment, a.abnormal_fraction
        mcfg = ClsModelConfig.from_channels(a.channels)
        train_summary = meta_train_cls(sources, model, cfg, mcfg, n_way=2, k_shot=5, device="cpu", fresh=True)
        meta = json.loads(sidecar(model).read_text())
        save_json(sidecar(model), {**meta, "benchmark_sources": sources_desc})  # for later --model runs
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copy(str(model) + ".log.jsonl", out.with_name(out.stem + "_metatrain.log.jsonl"))
    baselines = [b for b in a.baselines.split(",") if b]
    shots = [int(s) for s in a.shots.split(",")]
    result = evaluate_cls(npz, model, shots, a.repeats, baselines, query_split=a.split)
    if train_summary is None and sidecar(model).exists():  # --model: what its training wrote
        train_summary = json.loads(sidecar(model).read_text())
    # --model: the sources its training recorded; models trained before they were recorded: the flags'
    recorded = (train_summary or {}).get("benchmark_sources")
    if recorded:
        sources_desc = recorded
    elif a.model:
        sources_desc = [f"not recorded with the model; this run's flags would mean: {'; '.join(sources_desc)}"]
    result["meta_train"] = {"sources": sources_desc, "summary": train_summary}
    result["meta_train"]["excluded"] = "pneumoniamnist labels" if a.ssl_target else "pneumoniamnist"
    result["meta_train"]["episodes"] = {
        "max_way": a.max_way,
        "augment": a.augment,
        "abnormal_fraction": a.abnormal_fraction,
        "ssl_fraction": a.ssl_fraction,
    }
    result["command"] = "python " + " ".join(sys.argv)
    result["minutes"] = round((time.time() - t0) / 60, 1)
    result["provenance"] = stamp([model])
    out.write_text(json.dumps(result, indent=2, default=str))
    plot(result, out.with_suffix(".png"))
    for r in sorted(result["rows"], key=lambda r: (r["shots"], r["method"])):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
