"""How long the app's classifier takes to adapt, 2-way 10-shot, on this machine (CPU unless a GPU is
asked for), with the shipped weights and real data:

* `image` head: 10 + 10 PneumoniaMNIST chest X-rays (PNG files in a datastore), normal vs pneumonia;
* `region` head: LV vs RV blood pool regions of 10 MS-CMRSeg studies (masks from their final labels).

Per head: `head steps` = the core's `adapt()` on the 20 cached features (prototype init + 20 Meta-SGD
steps); `warm` = the service's whole adaptation with the examples' crops cached (embedding 20 examples
+ head steps + publishing the versioned head); `cold` = the same after dropping every cache (reading
the images and labels, resampling, cropping); `correction -> new head` = through a real server, from
the reply of the 20th `PUT /metaapp/classes/{id}` to `/info/` showing the new head version.

    python benchmarks/cls_adapt_latency.py [--repeats 5] [--device cpu]

Needs ../shared/datasets; writes benchmarks/results/cls_adapt_latency.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.cls_model import adapt
from monailabel_metaapp.devserver import Server
from monailabel_metaapp.lib.cls.classifier import DEFAULT_CLS_WEIGHTS
from monailabel_metaapp.lib.cls.service import ClsService
from monailabel_metaapp.lib.datastore import ValidatingDatastore
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view, require_shared_datasets


def xray_store(root: Path, out: Path) -> list[tuple[str, str]]:
    z = np.load(root / "pneumoniamnist" / "pneumoniamnist.npz")
    rng = np.random.default_rng(0)
    labels = z["train_labels"].ravel()
    out.mkdir(parents=True)
    teach = []
    for c, name in ((0, "normal"), (1, "pneumonia")):
        for i in rng.choice(np.flatnonzero(labels == c), 10, replace=False):
            sitk.WriteImage(sitk.GetImageFromArray(z["train_images"][i]), str(out / f"x{i:04d}.png"))
            teach.append((f"x{i:04d}", name))
    return teach


def summary(xs: list[float]) -> dict:
    return {"median_s": round(statistics.median(xs), 4), "max_s": round(max(xs), 4), "runs": [round(x, 4) for x in xs]}


def measure(svc: ClsService, kind: str, repeats: int) -> dict:
    def full() -> float:
        t0 = time.perf_counter()
        svc._adapt(kind)
        return time.perf_counter() - t0

    cold = []
    for _ in range(repeats):
        svc._views.clear()
        svc._stacks.clear()
        cold.append(full())
    warm = [full() for _ in range(repeats)]
    views = [svc.views(i, rec) for i, _, rec in svc.examples(kind)]
    names = [rec["class"] for _, _, rec in svc.examples(kind)]
    classes = sorted(set(names))
    feats = svc.embed(views).to(svc.device)
    y = torch.tensor([classes.index(n) for n in names], device=svc.device)
    steps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        adapt(svc.model, feats, y, len(classes), svc.steps)
        steps.append(time.perf_counter() - t0)
    return {
        "examples": dict(sorted(Counter(names).items())),
        "head_steps": summary(steps),
        "warm": summary(warm),
        "cold": summary(cold),
    }


def through_server(store: Path, teach: list[tuple[str, dict]], kind: str, log: Path) -> float:
    server = Server(store, log).start()
    try:
        server.wait_ready()
        server.wait_scores()  # the segmentation side idle: nothing else competes for the CPU
        url = server.url
        for image_id, body in teach[:-1]:
            requests.put(f"{url}/metaapp/classes/{image_id}", json=body, timeout=60).raise_for_status()
        deadline = time.time() + 120
        while time.time() < deadline:  # the head of the first 19 is there and idle
            h = requests.get(f"{url}/info/", timeout=10).json()["metaapp"]["fewshot_cls"]["heads"][kind]
            if h["state"] == "ready" and h["n_examples"] == len(teach) - 1:
                break
            time.sleep(0.1)
        version = h["version"]
        image_id, body = teach[-1]
        requests.put(f"{url}/metaapp/classes/{image_id}", json=body, timeout=60).raise_for_status()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 120:
            h = requests.get(f"{url}/info/", timeout=10).json()["metaapp"]["fewshot_cls"]["heads"][kind]
            if h["version"] > version and h["state"] == "ready":
                return time.perf_counter() - t0
            time.sleep(0.02)
        raise TimeoutError(f"no new {kind} head: {h}")
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/cls_adapt_latency.json")
    a = ap.parse_args()
    root = require_shared_datasets()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    result: dict = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine()}
    result["device"] = a.device
    result["weights"] = str(DEFAULT_CLS_WEIGHTS.name)

    teach = xray_store(root, tmp / "xray")
    ds = ValidatingDatastore(str(tmp / "xray"), extensions=["*.png"], auto_reload=False)
    svc = ClsService(ds, tmp / "xray_store", device=a.device)
    for image_id, cls in teach:
        svc.correct(image_id, cls)
    svc.queue.wait_idle(120)
    result["image"] = measure(svc, "image", a.repeats)

    cmr = cmr_view(tmp / "cmr", list(range(26, 36)))
    ds = ValidatingDatastore(str(cmr), extensions=["*.nii.gz"], auto_reload=False, default_names=CMR_STRUCTURES)
    svc = ClsService(ds, tmp / "cmr_store", device=a.device)
    pools = (("lv blood pool", "lv"), ("rv blood pool", "rv"))
    regions = [(f"cmr_{i}", {"class": c, "region": r}) for i in range(26, 36) for r, c in pools]
    for image_id, body in regions:
        svc.correct(image_id, body["class"], region=body["region"])
    svc.queue.wait_idle(120)
    result["region"] = measure(svc, "region", a.repeats)

    if a.device == "cpu":
        cmr2 = cmr_view(tmp / "cmr_server", list(range(26, 36)))
        result["region"]["correction_to_new_head_s"] = round(through_server(cmr2, regions, "region", tmp / "s.log"), 3)
    result["provenance"] = stamp([DEFAULT_CLS_WEIGHTS])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
