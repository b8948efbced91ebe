"""The few-shot classifier in the app: class corrections stored in the datastore, background
adaptation of the classifier's head, the `fewshot_cls` infer task and the classes carried in
segmentation results, through a real `metaapp serve` and `MONAILabelClient` (real data)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from monailabel_metaapp.cli import main as cli_main
from monailabel_metaapp.lib.cls.classifier import DEFAULT_CLS_WEIGHTS
from monailabel_metaapp.lib.cls.heads import NEEDS_TWO
from monailabel_metaapp.lib.cls.service import ClsService
from monailabel_metaapp.lib.datastore import ValidatingDatastore
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view

LV, RV = 500, 600  # MS-CMRSeg label values of the LV and RV blood pools


def roi_of(label_file: Path, value: int) -> list[int]:
    """Bounding box [x0, y0, z0, x1, y1, z1] (ends exclusive) of one structure of a reference label."""
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))) == value
    z, y, x = np.nonzero(a)
    return [int(x.min()), int(y.min()), int(z.min()), int(x.max()) + 1, int(y.max()) + 1, int(z.max()) + 1]


def classify(client: MONAILabelClient, image_id: str, params: dict) -> dict:
    """`fewshot_cls` through the stock client: a result without an image comes back as the raw JSON body."""
    _, res = client.infer("fewshot_cls", image_id, params)
    return json.loads(res) if isinstance(res, (bytes, str)) else res


def wait_head(url: str, kind: str, examples: dict, timeout: float = 120) -> dict:
    """Poll /info/ until the classifier's head of `kind` is ready and learned from `examples`."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        head = requests.get(f"{url}/info/", timeout=10).json()["metaapp"]["fewshot_cls"]["heads"][kind]
        if head["state"] == "ready" and head.get("examples") == examples and head["version"] > 0:
            return head
        time.sleep(0.3)
    raise TimeoutError(f"{kind} head not ready with {examples}: {head}")


def test_service_adapts_from_stored_corrections_and_reloads(shared, tmp_path):
    """ClsService on a real datastore, no server: LV vs RV blood pool regions of held-out studies."""
    d = cmr_view(tmp_path / "cmr", list(range(26, 36)))
    ds = ValidatingDatastore(str(d), extensions=["*.nii.gz"], auto_reload=False, default_names=CMR_STRUCTURES)
    svc = ClsService(ds, tmp_path / "store", DEFAULT_CLS_WEIGHTS, device="cpu")
    with pytest.raises(LookupError, match="teach it with PUT /metaapp/classes"):
        svc.classify("cmr_31", region="lv blood pool")
    for i in (26, 27, 28, 29, 30):
        svc.correct(f"cmr_{i}", "left", region="lv blood pool")
    assert svc.queue.wait_idle(60)
    assert svc.heads.snapshot()["region"]["state"] == NEEDS_TWO, "one class is not a classifier"
    for i in (26, 27, 28, 29, 30):
        svc.correct(f"cmr_{i}", "right", region="rv blood pool")
    assert svc.queue.wait_idle(60)
    head = svc.heads.snapshot()["region"]
    assert head["state"] == "ready" and head["examples"] == {"left": 5, "right": 5}, head
    right = 0
    for i in range(31, 36):  # held-out studies, regions from their final labels
        for region, want in (("lv blood pool", "left"), ("rv blood pool", "right")):
            pred = svc.classify(f"cmr_{i}", region=region)["prediction"]
            assert [p["score"] for p in pred] == sorted((p["score"] for p in pred), reverse=True)
            assert abs(sum(p["score"] for p in pred) - 1) < 1e-3
            right += pred[0]["label"] == want
    assert right >= 8, f"{right}/10 held-out regions classified right"

    # stored in the datastore file, and a new service (a restart) serves the same head without adapting
    stored = json.loads((d / "datastore_v2.json").read_text())["objects"]["cmr_26"]["image"]["info"]
    assert stored["metaapp_classes"]["lv blood pool"]["class"] == "left"
    ds2 = ValidatingDatastore(str(d), extensions=["*.nii.gz"], auto_reload=False, default_names=CMR_STRUCTURES)
    svc2 = ClsService(ds2, tmp_path / "store", DEFAULT_CLS_WEIGHTS, device="cpu")
    assert svc2.sync() == [] and svc2.heads.snapshot()["region"]["version"] == head["version"]
    again = svc2.classify("cmr_31", region="rv blood pool")["prediction"]
    assert again == svc.classify("cmr_31", region="rv blood pool")["prediction"]

    # a head written by another classifier model (the app's weights changed) is re-adapted at start-up
    from monailabel_metaapp.lib.cls.heads import ClsHead

    old = ClsHead({"W": torch.zeros(2, 64), "b": torch.zeros(2)}, ["left", "right"], {"left": 5, "right": 5})
    svc2.heads.publish("region", old)
    svc3 = ClsService(ds2, tmp_path / "store", DEFAULT_CLS_WEIGHTS, device="cpu")
    assert svc3.sync() == ["region"] and svc3.queue.wait_idle(60)
    assert svc3.classify("cmr_31", region="rv blood pool")["prediction"][0]["label"] == "right"

    # `metaapp evaluate cls --studies DIR` reads the stored corrections (k per class support, the rest queried)
    cli_main(
        [
            "evaluate",
            "cls",
            "--studies",
            str(d),
            "--shots",
            "1,3,5",
            "--repeats",
            "3",
            "--out",
            str(tmp_path / "e.json"),
        ]
    )
    ev = json.loads((tmp_path / "e.json").read_text())
    meta = {r["shots"]: r for r in ev["rows"] if r["method"] == "region meta"}
    assert set(meta) == {1, 3} and "k=5" in " ".join(ev["notes"]), "5 shots of 5 examples leave no query"
    assert meta[3]["auc_mean"] > 0.8 and ev["settings"]["examples"]["region"] == {"left": 5, "right": 5}, ev

    # a removed correction re-adapts; removing every "right" leaves no classifier
    svc2.remove("cmr_30", "rv blood pool")
    assert svc2.queue.wait_idle(60)
    assert svc2.heads.snapshot()["region"]["examples"] == {"left": 5, "right": 4}
    for i in (26, 27, 28, 29):
        svc2.remove(f"cmr_{i}", "rv blood pool")
    assert svc2.queue.wait_idle(60)
    assert svc2.heads.snapshot()["region"]["state"] == NEEDS_TWO
    with pytest.raises(LookupError, match="needs 2 classes"):
        svc2.classify("cmr_31", region="lv blood pool")


def test_named_tasks_keep_their_own_classes_and_heads(shared, tmp_path):
    """Two tasks on the same regions (as malignancy and tumour type on one lesion): the default region
    task (left/right) and a named task (`tissue`: blood/muscle), each with its own head, classes,
    stored corrections, results in segmentation params, evaluation rows, and clear refusals."""
    d = cmr_view(tmp_path / "cmr", list(range(26, 36)))
    ds = ValidatingDatastore(str(d), extensions=["*.nii.gz"], auto_reload=False, default_names=CMR_STRUCTURES)
    svc = ClsService(ds, tmp_path / "store", DEFAULT_CLS_WEIGHTS, device="cpu")
    for i in (26, 27, 28, 29, 30):
        svc.correct(f"cmr_{i}", "left", region="lv blood pool")
        svc.correct(f"cmr_{i}", "right", region="rv blood pool")
        reply = svc.correct(f"cmr_{i}", "blood", region="lv blood pool", task="tissue")
        assert reply["key"] == "tissue/lv blood pool" and reply["task"] == "tissue"
        svc.correct(f"cmr_{i}", "muscle", region="lv myocardium", task="tissue")
    assert svc.queue.wait_idle(120)
    snap = svc.heads.snapshot()
    assert snap["region"]["examples"] == {"left": 5, "right": 5}, "the named task's examples stay out of it"
    assert snap["tissue"]["examples"] == {"blood": 5, "muscle": 5} and snap["tissue"]["kind"] == "region"
    stored = svc.corrections("cmr_26")
    assert stored["lv blood pool"]["class"] == "left" and stored["tissue/lv blood pool"]["class"] == "blood"

    right = 0
    for i in range(31, 36):  # held-out studies: one region, two tasks, two answers
        lv = svc.classify(f"cmr_{i}", region="lv blood pool")
        assert lv["task"] == "region" and {p["label"] for p in lv["prediction"]} == {"left", "right"}
        blood = svc.classify(f"cmr_{i}", region="lv blood pool", task="tissue")
        muscle = svc.classify(f"cmr_{i}", region="lv myocardium", task="tissue")
        assert {p["label"] for p in blood["prediction"]} == {"blood", "muscle"}
        right += (lv["prediction"][0]["label"] == "left") + (blood["prediction"][0]["label"] == "blood")
        right += muscle["prediction"][0]["label"] == "muscle"
    assert right >= 13, f"{right}/15 held-out answers right"

    # segmentation results carry the default task's classes and each named task's
    label = sitk.ReadImage(str(d / "labels" / "final" / "cmr_31.nii.gz"))
    names = {"lv blood pool": LV, "lv myocardium": 200}
    extra = svc.classify_regions(str(d / "cmr_31.nii.gz"), label, names)
    assert set(extra["classes"]) == set(names) and set(extra["task_classes"]) == {"tissue"}
    assert extra["task_classes"]["tissue"]["lv myocardium"]["label"] == "muscle", extra

    # refused with the reason, nothing stored
    with pytest.raises(ValueError, match="lower-case"):
        svc.correct("cmr_31", "blood", region="lv blood pool", task="Tissue Type")
    with pytest.raises(ValueError, match="classifies regions"):
        svc.correct("cmr_31", "blood", task="tissue")  # a whole image for a region task
    with pytest.raises(ValueError, match="classifies regions"):
        svc.classify("cmr_31", task="tissue")
    with pytest.raises(LookupError, match="no head yet"):
        svc.classify("cmr_31", region="lv blood pool", task="malignancy")
    assert svc.corrections("cmr_31") == {} and "Tissue Type" not in svc.heads.snapshot()

    # a restart serves both heads without adapting; removing a named task's correction re-adapts only it
    svc2 = ClsService(ds, tmp_path / "store", DEFAULT_CLS_WEIGHTS, device="cpu")
    assert svc2.sync() == [] and svc2.heads.snapshot()["tissue"]["version"] == snap["tissue"]["version"]
    assert svc2.remove("cmr_30", "tissue/lv blood pool")["adapting"] == ["tissue"]
    assert svc2.queue.wait_idle(60)
    after = svc2.heads.snapshot()
    assert after["tissue"]["examples"] == {"blood": 4, "muscle": 5}
    assert after["region"]["version"] == snap["region"]["version"]

    # `metaapp evaluate cls --studies` evaluates every task
    cli_main(
        ["evaluate", "cls", "--studies", str(d), "--shots", "2", "--repeats", "2", "--out", str(tmp_path / "e.json")]
    )
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"region meta", "region linear", "tissue meta", "tissue linear"}


def test_classify_correct_classify_again_through_monailabel_client(cmr_store, shared, start_server, tmp_path):
    """The acceptance flow: classify (no classes yet: a clear error), correct over REST and through the
    unmodified MONAILabelClient, the head adapts in the background, classify again; the segmentation
    result carries the class of each segmented region; a restart keeps the head."""
    server = start_server(cmr_store)
    server.wait_ready(lv_blood_pool=1, rv_blood_pool=1)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    assert info["models"]["fewshot_cls"]["type"] == "classification"
    assert info["metaapp"]["fewshot_cls"]["heads"]["region"]["version"] == 0
    ref = {i: shared / "cmr_bssfp" / f"label_{i}.nii.gz" for i in range(26, 32)}

    # 1. classify before any class exists
    with pytest.raises(MONAILabelClientException) as e:
        classify(client, "cmr_31", {"roi": roi_of(ref[31], LV)})
    assert "409" in str(e.value) and "teach it with" in str(e.value)
    seg_file, seg_params = client.infer("fewshot_seg", "cmr_31", {})
    assert "classes" not in seg_params, "no region head yet: no classes in segmentation results"

    # 2. corrections: REST (regions of the final labels), MONAILabelClient.train_start (boxes), and a
    #    saved label whose label_info carries classes (the segmentation flow must be unchanged)
    for i in (26, 27):
        for region, cls in (("lv blood pool", "left"), ("rv blood pool", "right")):
            r = requests.put(f"{server.url}/metaapp/classes/cmr_{i}", json={"class": cls, "region": region}, timeout=30)
            assert r.status_code == 200 and r.json()["source"] == "label", r.text
    reply = client.train_start(
        "fewshot_cls",
        {
            "corrections": [
                {"image": f"cmr_{i}", "class": cls, "roi": roi_of(ref[i], v)}
                for i in (28, 29)
                for v, cls in ((LV, "left"), (RV, "right"))
            ]
        },
    )
    assert reply["status"] == "QUEUED" and reply["adapting"] == ["region"] and len(reply["stored"]) == 4
    a = sitk.ReadImage(str(ref[30]))
    arr = sitk.GetArrayFromImage(a)
    lbl = sitk.GetImageFromArray(np.where(arr == LV, 1, np.where(arr == RV, 2, 0)).astype(np.uint8))
    lbl.CopyInformation(a)
    sitk.WriteImage(lbl, str(tmp_path / "l30.nii.gz"))
    label_info = [  # a class per task ({task: class}), or one class of the default region task
        {"name": "lv blood pool", "idx": 1, "class": {"region": "left", "tissue": "blood"}},
        {"name": "rv blood pool", "idx": 2, "class": "right"},
    ]
    saved = client.save_label("cmr_30", str(tmp_path / "l30.nii.gz"), params={"label_info": label_info})
    saved = saved if isinstance(saved, dict) else json.loads(saved)
    assert sorted(saved["metaapp"]["fewshot_seg"]["adapting"]) == ["lv blood pool", "rv blood pool"]
    cls_reply = saved["metaapp"]["fewshot_cls"]
    assert cls_reply["classes"] == {"lv blood pool": {"region": "left", "tissue": "blood"}, "rv blood pool": "right"}
    assert cls_reply["adapting"] == ["region", "tissue"] and cls_reply["refused"] == {}

    # 3. /info/ shows the new head: classes and examples per class
    head = wait_head(server.url, "region", {"left": 5, "right": 5})
    assert head["classes"] == ["left", "right"] and head["n_examples"] == 10
    server.wait_ready()

    # 4. classify again, held-out study cmr_31 (no final label): boxes, and structures the segmentation predicts
    for v, want in ((LV, "left"), (RV, "right")):
        res = classify(client, "cmr_31", {"roi": roi_of(ref[31], v)})
        assert res["prediction"][0]["label"] == want, res
        assert res["head_version"] == head["version"] and {p["idx"] for p in res["prediction"]} == {0, 1}
    res = classify(client, "cmr_31", {"region": "lv blood pool"})
    assert res["source"] == "prediction" and res["prediction"][0]["label"] == "left", res

    # 5. the segmentation result carries each segmented region's class (Slicer/OHIF list no classifiers)
    seg_file, seg_params = client.infer("fewshot_seg", "cmr_31", {})
    classes = seg_params["classes"]
    assert classes["lv blood pool"]["label"] == "left", classes
    assert {c["label"] for c in classes.values()} <= {"left", "right"}

    # 5b. a named task on the same regions (its own classes and head), over REST and in segmentation results
    for i in (26, 27):
        for region, cls in (("lv blood pool", "blood"), ("lv myocardium", "muscle")):
            body = {"class": cls, "region": region, "task": "tissue"}
            r = requests.put(f"{server.url}/metaapp/classes/cmr_{i}", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["key"] == f"tissue/{region}", r.text
    tissue = wait_head(server.url, "tissue", {"blood": 3, "muscle": 2})
    assert tissue["kind"] == "region" and tissue["classes"] == ["blood", "muscle"]
    res = classify(client, "cmr_31", {"roi": roi_of(ref[31], LV), "task": "tissue"})
    assert res["task"] == "tissue" and res["prediction"][0]["label"] == "blood", res
    _, seg_params = client.infer("fewshot_seg", "cmr_31", {})
    assert seg_params["task_classes"]["tissue"]["lv blood pool"]["label"] in {"blood", "muscle"}, seg_params
    assert seg_params["classes"]["lv blood pool"]["label"] == "left"

    # 6. stored in the datastore (image info), visible to any client
    objects = client.datastore()["objects"]
    assert objects["cmr_26"]["image"]["info"]["metaapp_classes"]["rv blood pool"]["class"] == "right"
    assert objects["cmr_30"]["image"]["info"]["metaapp_classes"]["lv blood pool"]["source"] == "label"

    # 7. bad requests are refused with a reason; nothing is stored
    url = f"{server.url}/metaapp/classes"
    r = requests.put(f"{url}/no_such_study", json={"class": "left"}, timeout=30)
    assert r.status_code == 404 and "unknown image" in r.json()["detail"]
    r = requests.put(f"{url}/cmr_28", json={"region": "lv blood pool"}, timeout=30)
    assert r.status_code == 400 and '"class"' in r.json()["detail"]
    r = requests.put(f"{url}/cmr_28", json={"class": "left", "region": "spleen"}, timeout=30)
    assert r.status_code == 422 and "spleen" in r.json()["detail"]
    r = requests.put(f"{url}/cmr_28", json={"class": "left", "roi": [0, 0, 0, 9999, 10, 1]}, timeout=30)
    assert r.status_code == 422 and "outside the image" in r.json()["detail"]
    with pytest.raises(MONAILabelClientException) as e:
        classify(client, "cmr_31", {"region": "spleen"})
    assert "422" in str(e.value)
    r = requests.put(f"{url}/cmr_28", json={"class": "blood", "task": "tissue"}, timeout=30)
    assert r.status_code == 422 and "classifies regions" in r.json()["detail"]
    assert requests.get(f"{url}?image=cmr_28", timeout=30).json()["corrections"]["cmr_28"].keys() == {
        "roi:" + ",".join(map(str, roi_of(ref[28], v))) for v in (LV, RV)
    }

    # 8. a restart reloads the head (same version, no re-adaptation)
    server.stop()
    server.start()
    again = requests.get(f"{server.url}/info/", timeout=10).json()["metaapp"]["fewshot_cls"]["heads"]["region"]
    assert again["version"] == head["version"] and again["state"] == "ready"
    again = requests.get(f"{server.url}/info/", timeout=10).json()["metaapp"]["fewshot_cls"]["heads"]["tissue"]
    assert again["version"] == tissue["version"] and again["examples"] == {"blood": 3, "muscle": 2}
    res = classify(client, "cmr_31", {"roi": roi_of(ref[31], RV)})
    assert res["prediction"][0]["label"] == "right"


def test_image_classifier_on_chest_xrays(shared, start_server, tmp_path):
    """Whole-image classes (PneumoniaMNIST X-rays as PNG files in a datastore): 10 corrections per class
    through MONAILabelClient, then 40 held-out test images (20 per class) classified."""
    z = np.load(shared / "pneumoniamnist" / "pneumoniamnist.npz")
    names = {0: "normal", 1: "pneumonia"}
    rng = np.random.default_rng(0)
    store = tmp_path / "xray"
    store.mkdir()
    teach, test = [], []
    for split, n, out in (("train", 10, teach), ("test", 20, test)):
        labels = z[f"{split}_labels"].ravel()
        for c, name in names.items():
            for i in rng.choice(np.flatnonzero(labels == c), n, replace=False):
                image_id = f"{split}_{i:04d}"
                sitk.WriteImage(sitk.GetImageFromArray(z[f"{split}_images"][i]), str(store / f"{image_id}.png"))
                out.append((image_id, name))
    server = start_server(store)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    with pytest.raises(MONAILabelClientException) as e:
        classify(client, test[0][0], {})
    assert "409" in str(e.value) and "no class examples yet" in str(e.value)
    reply = client.train_start("fewshot_cls", {"corrections": [{"image": i, "class": c} for i, c in teach]})
    assert reply["adapting"] == ["image"] and {s["key"] for s in reply["stored"]} == {"image"}
    head = wait_head(server.url, "image", {"normal": 10, "pneumonia": 10})
    assert head["classes"] == ["normal", "pneumonia"]
    right = 0
    for image_id, want in test:
        res = classify(client, image_id, {})
        assert res["kind"] == "image" and len(res["prediction"]) == 2
        right += res["prediction"][0]["label"] == want
    print(f"{right}/40 held-out chest X-rays classified right")
    assert right >= 28, f"{right}/40 held-out chest X-rays classified right (chance: 20)"
