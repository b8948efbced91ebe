"""What model-aware distillation buys: a larger meta-trained teacher distilled (`core/distill.py`)
into a compact student, against the same student meta-trained WITHOUT distillation for the same
time on the same episodes; all three evaluated leave-one-dataset-out on PneumoniaMNIST (never seen
in meta-training), with parameters, inference time per image and adaptation time.

    python benchmarks/experiments/distill_cls.py --teacher .cache/cls_bench/meta_cls.pt [--minutes 6]
        [--student-channels 16,32,32,32 (default: half the teacher's)] [--max-way 5 --augment 1 --abnormal-fraction 0.3]

The teacher is any classifier from `benchmarks/fewshot_cls.py` / `metaapp meta-train --task cls`
(meta-trained on the same sources: cardiac MRI and CT regions + SSL). Both students get the same
episode sampler and the same wall-clock budget on the same machine (distillation also runs the teacher, so
it gets fewer steps). Writes benchmarks/results/distill_cls.json + .png."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from monailabel_metaapp.core.checkpoint import load_cls_model
from monailabel_metaapp.core.cls_data import load_medmnist
from monailabel_metaapp.core.cls_metatrain import meta_train_cls
from monailabel_metaapp.core.cls_model import ClsModelConfig, FewShotClsModel, adapt
from monailabel_metaapp.core.distill import distill_cls, half_width
from monailabel_metaapp.core.metatrain import MetaTrainConfig
from monailabel_metaapp.evaluate_cls import DEFAULT_CLS_STEPS, evaluate_cls
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets, totalseg_view


def n_params(model: FewShotClsModel) -> int:
    """Parameters used at inference: the encoder's weight means (not its log-sigmas) + the rates."""
    return sum(p.numel() for p in model.encoder.net.parameters()) + sum(p.numel() for p in model.log_lr.parameters())


@torch.no_grad()
def timings(model: FewShotClsModel, images: torch.Tensor, labels: torch.Tensor, reps: int = 30) -> dict:
    """Median ms: one image embedded; per image in batches of 256; 2-way 10-shot head adaptation
    (20 steps) alone and with the embedding of its 20 support images."""
    model.eval()
    one, batch = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        model.embed(images[i : i + 1])
        one.append(time.perf_counter() - t0)
    for _ in range(5):
        t0 = time.perf_counter()
        model.embed(images[:256])
        batch.append((time.perf_counter() - t0) / 256)
    rng = np.random.default_rng(0)
    head, total = [], []
    for _ in range(reps):
        idx = np.concatenate([rng.choice(np.flatnonzero(labels.numpy() == c), 10, replace=False) for c in (0, 1)])
        x, y = images[idx], labels[idx]
        t0 = time.perf_counter()
        f = model.embed(x)
        t1 = time.perf_counter()
        adapt(model, f, y, 2, DEFAULT_CLS_STEPS)
        t2 = time.perf_counter()
        head.append(t2 - t1)
        total.append(t2 - t0)
    ms = lambda v: round(1000 * statistics.median(v), 3)  # noqa: E731
    return {
        "infer_ms_one_image": ms(one),
        "infer_ms_per_image_batch256": ms(batch),
        "adapt_ms_head_2way10shot": ms(head),
        "adapt_ms_embed_and_head_2way10shot": ms(total),
    }


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in result["models"].items():
        rows = sorted(m["rows"], key=lambda r: r["shots"])
        ax.errorbar(
            [r["shots"] for r in rows],
            [r["auc_mean"] for r in rows],
            yerr=[r["auc_std"] for r in rows],
            marker="o",
            capsize=3,
            label=f"{name} ({m['params'] / 1000:.0f}k params)",
        )
        bx.bar(name, m["timing"]["infer_ms_one_image"])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("ROC AUC, PneumoniaMNIST test")
    ax.set_xticks(result["settings"]["shots"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.set_ylabel(f"ms to embed one image (CPU, {result['settings']['threads']} thread(s))")
    bx.set_title("inference")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=".cache/cls_bench/meta_cls.pt")
    ap.add_argument("--minutes", type=float, default=6.0, help="meta-training budget of each student")
    ap.add_argument("--student-channels", help="default: half the teacher's width")
    ap.add_argument("--max-way", type=int, default=0)
    ap.add_argument("--augment", type=float, default=0.0)
    ap.add_argument("--abnormal-fraction", type=float, default=0.0)
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)")
    ap.add_argument("--work", default=".cache/cls_distill")
    ap.add_argument("--reuse", action="store_true", help="skip training: evaluate the students in --work")
    ap.add_argument("--out", default="benchmarks/results/distill_cls.json")
    a = ap.parse_args()
    root = require_shared_datasets()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    sources = [cmr_view(tmp / "cmr"), totalseg_view(tmp / "totalseg")]
    teacher_cfg = load_cls_model(a.teacher, "cpu").cfg
    if a.student_channels:  # both students see the images as the teacher does
        student_cfg = replace(ClsModelConfig.from_channels(a.student_channels), image_crop=teacher_cfg.image_crop)
    else:
        student_cfg = half_width(teacher_cfg)

    def cfg() -> MetaTrainConfig:
        c = MetaTrainConfig(minutes=a.minutes, tasks_per_step=8, ssl_fraction=0.5, lambda_kl=1e-3)
        c.cls_max_way, c.cls_augment, c.cls_abnormal_fraction = a.max_way, a.augment, a.abnormal_fraction
        return c

    paths = {
        "teacher": Path(a.teacher),
        "distilled student": work / "distilled.pt",
        "student, no distillation": work / "student.pt",
    }
    if a.reuse:  # evaluate the students a previous run trained
        summaries = {n: json.loads(Path(str(p) + ".json").read_text()) for n, p in paths.items() if n != "teacher"}
    else:
        summaries = {
            "distilled student": distill_cls(
                a.teacher, sources, paths["distilled student"], cfg(), student_cfg, device="cpu", fresh=True
            ),
            "student, no distillation": meta_train_cls(
                sources, paths["student, no distillation"], cfg(), student_cfg, device="cpu", fresh=True
            ),
        }
    shutil.rmtree(tmp, ignore_errors=True)
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    shots = [int(s) for s in a.shots.split(",")]
    test = load_medmnist(npz, "test", student_cfg.size, student_cfg.image_crop)
    result: dict = {"models": {}}
    for name, path in paths.items():
        model = load_cls_model(path, "cpu")
        ev = evaluate_cls(npz, path, shots, a.repeats, [], device="cpu", progress=False)
        result["models"][name] = {
            "weights": str(path),
            "channels": list(model.cfg.channels),
            "params": n_params(model),
            "rows": ev["rows"],
            "timing": timings(model, test.images, test.labels),
            "meta_train": summaries.get(name) or json.loads(Path(f"{path}.json").read_text()),
        }
    result["settings"] = {"shots": shots, "repeats": a.repeats, "minutes_per_student": a.minutes, "threads": a.threads}
    result["settings"]["episodes"] = {
        "max_way": a.max_way,
        "augment": a.augment,
        "abnormal_fraction": a.abnormal_fraction,
    }
    result["settings"]["distill"] = "alpha 0.5, T 4 (core/distill.py)"
    result["command"] = "python " + " ".join(sys.argv)
    result["minutes"] = round((time.time() - t0) / 60, 1)
    result["provenance"] = stamp(list(paths.values()))
    out.write_text(json.dumps(result, indent=2, default=str))
    plot(result, out.with_suffix(".png"))
    for name, m in result["models"].items():
        aucs = " ".join(f"k={r['shots']}: {r['auc_mean']:.3f}" for r in sorted(m["rows"], key=lambda r: r["shots"]))
        print(f"{name:>18} {m['params']:>7} params  {aucs}  {m['timing']}")


if __name__ == "__main__":
    main()
