"""Label-save reply, save -> adapted head live, and inference time, through the real REST API,
beside the same flow in stock MONAI Label (a BasicTrainTask fine-tune started by POST /train, as
Slicer's Auto-Update does), in one script on one machine.

    python benchmarks/adapt_latency.py [--repeats 5] [--slices 40] [--out benchmarks/results/adapt_latency.json]

Needs ../shared/datasets (real cardiac MRI); writes JSON + PNG."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stock_flow import measure_stock_flow  # noqa: E402

from monailabel_metaapp.devserver import Server, free_port  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp  # noqa: E402
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets, shared_datasets  # noqa: E402


def resample_slices(img: sitk.Image, slices: int, nearest: bool) -> sitk.Image:
    """Same field of view, `slices` slices along z (a ~256x256x40 volume made from 8 mm cardiac stacks)."""
    size, spacing = list(img.GetSize()), list(img.GetSpacing())
    new_spacing = [spacing[0], spacing[1], spacing[2] * size[2] / slices]
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(
        img, [size[0], size[1], slices], sitk.Transform(), interp, img.GetOrigin(), new_spacing, img.GetDirection()
    )


def build_store(root: Path, slices: int | None = None) -> tuple[Path, str, Path, str]:
    """6 real cardiac studies; 2 labelled. Returns (store, save-target id, its label file, query id).
    With `slices`, every image and label is resampled along z to that many slices."""
    shared = shared_datasets()
    ids = [21, 30, 12, 5, 20, 28]  # 21 (the save target) is the thickest stack among them
    store = cmr_view(root / "store", ids)
    for p in list(store.rglob("*.nii.gz")):
        real = p.resolve()
        p.unlink()
        if slices:
            img = sitk.ReadImage(str(real))
            sitk.WriteImage(resample_slices(img, slices, nearest="labels" in p.parts), str(p), useCompression=True)
        else:
            shutil.copy(real, p)
    for i in ids[2:]:
        (store / "labels" / "final" / f"cmr_{i:02d}.nii.gz").unlink()
    lbl = sitk.ReadImage(str(shared / "cmr_bssfp" / "label_21.nii.gz"))
    arr = (sitk.GetArrayFromImage(lbl) == 500).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(lbl)
    if slices:
        out = resample_slices(out, slices, nearest=True)
    label = root / "label_21.nii.gz"
    sitk.WriteImage(out, str(label), useCompression=True)
    (store / "labels" / "final" / "cmr_21.nii.gz").unlink()
    return store, "cmr_21", label, "cmr_28"


def measure_metaapp(store: Path, image_id: str, label: Path, query: str, repeats: int, log: Path) -> dict:
    server = Server(store, log).start()
    try:
        server.wait_ready(lv_blood_pool=1)
        client = MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp())
        client.infer("fewshot_seg", query, {})  # warm: the query's embeddings are cached like in use
        saves, lives, infers = [], [], []
        for _ in range(repeats):
            v0 = server.structures()["lv blood pool"]["version"]
            t0 = time.perf_counter()
            client.save_label(image_id, str(label), params={"label_info": [{"name": "lv blood pool", "idx": 1}]})
            saves.append(time.perf_counter() - t0)
            while server.structures()["lv blood pool"]["version"] <= v0:
                time.sleep(0.02)
            lives.append(time.perf_counter() - t0)
            server.wait_ready(poll=0.05)
            t1 = time.perf_counter()
            client.infer("fewshot_seg", query, {})
            infers.append(time.perf_counter() - t1)
        size = sitk.ReadImage(str(store / f"{image_id}.nii.gz")).GetSize()
        return {
            "save_reply_s": saves,
            "save_to_live_s": lives,
            "infer_s": infers,
            "volume_size": list(size),
            "first_save_to_live_s": lives[0],
        }
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stock-epochs", type=int, default=1)
    ap.add_argument("--slices", type=int, default=40, help="resample the 13-19 slice cardiac stacks to this many")
    ap.add_argument("--out", default="benchmarks/results/adapt_latency.json")
    a = ap.parse_args()
    require_shared_datasets()
    root = Path(tempfile.mkdtemp())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store, image_id, label, query = build_store(root, a.slices)
    meta = measure_metaapp(store, image_id, label, query, a.repeats, root / "metaapp.log")
    stock_store, _, _, _ = build_store(root / "stock", a.slices)
    stock = measure_stock_flow(stock_store, image_id, label, free_port(), root / "stock.log", epochs=a.stock_epochs)
    med = {k: statistics.median(v) for k, v in meta.items() if isinstance(v, list) and k != "volume_size"}
    ratios = {
        "save_reply": stock["save_reply_s"] / med["save_reply_s"],
        "save_to_new_weights": stock["save_to_new_weights_s"] / med["save_to_live_s"],
        "infer": stock["infer_s"] / med["infer_s"],
    }
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "volume": {"id": image_id, "size_xyz": meta["volume_size"], "resampled_to_slices": a.slices},
        "command": "python " + " ".join(sys.argv),
        "metaapp": meta,
        "metaapp_median": med,
        "stock": stock,
        "stock_over_metaapp": ratios,
        "targets": {"save_reply_s": 0.2, "save_to_live_s_cpu": 5.0, "infer_s_cpu": 10.0},
        "provenance": stamp([SHIPPED_SEG]),
    }
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(
        json.dumps(
            {
                "metaapp_median": med,
                "stock": {k: stock[k] for k in ("save_reply_s", "save_to_new_weights_s", "infer_s")},
                "ratios": ratios,
            },
            indent=2,
        )
    )


def plot(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["label-save reply", "save -> new weights live", "inference"]
    ours = [r["metaapp_median"]["save_reply_s"], r["metaapp_median"]["save_to_live_s"], r["metaapp_median"]["infer_s"]]
    stock = [r["stock"]["save_reply_s"], r["stock"]["save_to_new_weights_s"], r["stock"]["infer_s"]]
    x = np.arange(3)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(x - 0.2, ours, 0.4, label="monailabel_metaapp (head adaptation)")
    ax.bar(x + 0.2, stock, 0.4, label="stock MONAI Label (BasicTrainTask, POST /train)")
    for i, (o, s) in enumerate(zip(ours, stock)):
        ax.text(i, max(o, s) * 1.15, f"{s / o:.1f}x", ha="center")
    ax.set_yscale("log")
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds (log)")
    ax.set_title(f"Save -> better model, volume {r['volume']['size_xyz']}, {r['machine']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
