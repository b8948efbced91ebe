"""Site adaptation of the classifier's encoder: UMTRA tasks on the site's images, guarded.

Core (no server): resumable steps with the prior on the starting weights, the held-out split, the
guard's two metrics and its margin, `metaapp adapt-site --task cls`. Through `MONAILabelClient`
against a real `metaapp serve` on a datastore of chest X-ray PNGs: the idle loop makes a candidate,
checks it and keeps the live encoder, then after a restart resumes, swaps a candidate in (class head
versions bump, inference answers throughout) and rolls back.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient

from monailabel_metaapp.cli import main
from monailabel_metaapp.core.checkpoint import DEFAULT_CLS_WEIGHTS, load_cls_model
from monailabel_metaapp.core.cls_site_adaptation import (
    ClsExample,
    ClsSiteAdaptation,
    ClsSiteConfig,
    ClsSiteData,
    split_images,
)
from monailabel_metaapp.core.errors import VolumeError

CFG = dict(tasks_per_step=2, val_tasks=4, checkpoint_seconds=1e9)


@pytest.fixture(scope="module")
def brain_images(samples_src) -> ClsSiteData:
    """The six sample studies as the classifier sees whole images (three views each)."""
    return ClsSiteAdaptation.load_sources([samples_src], load_cls_model(DEFAULT_CLS_WEIGHTS))


def _delta(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.encoder.net.parameters(), b.encoder.net.parameters())
    return sum(float((p - q).abs().sum().detach()) for p, q in pairs)


def test_steps_resume_and_the_guard_scores_both_encoders(brain_images, tmp_path):
    names = sorted(brain_images.images)
    assert len(names) == 6 and all(v.shape == (3, 32, 32) for v in brain_images.images.values())
    train, held = split_images(names, 0.125)
    assert len(held) == 2 and set(train).isdisjoint(held)
    assert set(split_images(list(reversed(names)), 0.125)[1]) == set(held)  # by name, not by order
    with pytest.raises(VolumeError, match="at least 4 images"):
        split_images(names[:3], 0.125)

    state = tmp_path / "state.pt"
    site = ClsSiteAdaptation(brain_images, None, state, ClsSiteConfig(**CFG), "cpu")
    live = load_cls_model(DEFAULT_CLS_WEIGHTS)
    assert site.sampler.ssl_fraction == 1.0 and not site.has_labels()  # no corrections: UMTRA only
    for _ in range(2):
        rec = site.step()
    assert rec["step"] == 2 and _delta(site.model, live) > 0
    site.checkpoint()
    again = ClsSiteAdaptation(brain_images, None, state, ClsSiteConfig(**CFG), "cpu")
    assert again.resumed and again.steps == 2 and _delta(again.model, site.model) == 0
    for n, p in live.encoder.net.named_parameters():  # the prior is the start, not the resumed weights
        assert torch.equal(getattr(again.model.encoder, f"prior_mean__{n.replace('.', '__')}"), p)

    rec = site.check(site.candidate(), live)  # no corrections: the self-supervised loss, reported only
    assert rec["metric"] == "ssl_loss" and rec["candidate"] > 0 and rec["live"] > 0
    assert not rec["accepted"] and rec.get("better", False) == (rec["candidate"] < rec["live"])
    site.cfg.swap_unlabelled = True  # `--swap-unlabelled`: the loss decides
    assert site.check(site.candidate(), live)["accepted"] == (rec["candidate"] < rec["live"])

    # class corrections of two classes: leave-one-out AUC and accuracy of the head, candidate vs live
    examples = [
        ClsExample("tissue", name, views, "left" if i < 3 else "right")
        for i, (name, views) in enumerate(sorted(brain_images.images.items()))
    ]
    labelled = ClsSiteAdaptation(ClsSiteData(brain_images.images, examples), None, tmp_path / "l.pt", None, "cpu")
    assert labelled.labelled_sets == [], "3 corrections per class are too few to train on"
    rec = labelled.check(live, live)
    assert rec["metric"] == "auc" and set(rec["per_task"]) == {"tissue"}
    assert rec["candidate"] == rec["live"] and not rec["accepted"]  # not better than itself
    assert {"candidate_acc", "live_acc"} <= set(rec["per_task"]["tissue"])
    labelled.cfg.margin = -1.0
    assert labelled.check(live, live)["accepted"]  # within a margin of -1, equal passes


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(["adapt-site", "--task", "cls", *args])
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_adapt_site_cli_for_the_classifier(capsys, samples_src, tmp_path):
    out = tmp_path / "cls.pt"
    rc, _, err = _cli(capsys, "--studies", str(tmp_path / "nope"), "--minutes", "1", "--out", str(out))
    assert rc == 2 and "no such images folder" in err
    args = ["--studies", str(samples_src), "--minutes", "0.02", "--out", str(out), "--device", "cpu"]
    rc, stdout, err = _cli(capsys, *args, "--margin", "10")
    assert rc == 0, err[-2000:]
    summary = json.loads(stdout[stdout.index("{") :])
    assert not summary["accepted"] and summary["check"]["metric"] == "ssl_loss"  # a loss 10 lower: kept
    kept = torch.load(out, weights_only=True)
    assert all(torch.equal(kept[k], v) for k, v in torch.load(DEFAULT_CLS_WEIGHTS, weights_only=True).items())
    assert json.loads(Path(str(out) + ".json").read_text())["site_adaptation"]["accepted"] is False
    load_cls_model(summary["candidate"])  # a loadable classifier, like OUT


# -- through the server ------------------------------------------------------------------------


def _xray_store(shared: Path, folder: Path) -> tuple[list[tuple[str, str]], str]:
    """16 PneumoniaMNIST train X-rays as PNGs (8 per class, taught as corrections) and 8 more unlabelled."""
    z = np.load(shared / "pneumoniamnist" / "pneumoniamnist.npz")
    labels = z["train_labels"].ravel()
    rng = np.random.default_rng(0)
    folder.mkdir()
    teach = []
    for c, name in ((0, "normal"), (1, "pneumonia")):
        for j, i in enumerate(rng.choice(np.flatnonzero(labels == c), 12, replace=False)):
            image_id = f"x{i:04d}"
            sitk.WriteImage(sitk.GetImageFromArray(z["train_images"][i]), str(folder / f"{image_id}.png"))
            if j < 8:
                teach.append((image_id, name))
    return teach, image_id


def _site(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=10).json()["metaapp"]["fewshot_cls"]


def _wait(url: str, until, timeout: float = 120) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = _site(url)["site_adaptation"]
        if until(st):
            return st
        time.sleep(0.5)
    raise AssertionError(f"classifier site adaptation did not get there in {timeout} s: {st}")


def test_idle_loop_keeps_then_swaps_in_a_classifier_encoder_and_rolls_back(shared, start_server, tmp_path):
    teach, unlabelled = _xray_store(shared, tmp_path / "xray")
    conf = {"site_adapt": "true", "site_adapt_seg": "false", "site_adapt_minutes": "0.05"}
    conf |= {"site_check_minutes": "0.05", "site_margin": "10"}  # a margin no candidate meets: kept
    server = start_server(tmp_path / "xray", conf)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    reply = client.train_start("fewshot_cls", {"corrections": [{"image": i, "class": c} for i, c in teach]})
    assert reply["adapting"] == ["image"]
    st = _wait(server.url, lambda s: s["last_check"] is not None and s["state"] == "idle")
    info = client.info()["metaapp"]
    assert info["fewshot_seg"]["site_adaptation"]["state"] == "off"  # site_adapt_seg false
    assert st["version"] == 0 and not st["last_check"]["accepted"] and st["trained_minutes"] >= 0.05
    assert (tmp_path / "xray" / ".metaapp" / "site" / "cls_state.pt").exists()
    head = _site(server.url)["heads"]["image"]
    assert head["state"] == "ready" and head["examples"] == {"normal": 8, "pneumonia": 8}
    trained = st["trained_minutes"]
    server.stop()

    # restart: training resumes from the checkpoint; with every correction stored the guard scores the
    # heads' leave-one-out AUC; a margin of -10 takes the candidate: encoder and heads swap together
    conf.update(site_adapt_minutes="0.1", site_margin="-10")
    server = start_server(tmp_path / "xray", conf)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    answers, errors, stop = [], [], threading.Event()

    def classify_all_along():
        while not stop.is_set():
            try:
                _, res = client.infer("fewshot_cls", unlabelled, {})
                res = json.loads(res) if isinstance(res, (bytes, str)) else res
                answers.append(res["head_version"])
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))
            stop.wait(1.0)

    t = threading.Thread(target=classify_all_along)
    t.start()
    try:
        st = _wait(server.url, lambda s: s["version"] == 1)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert answers and set(answers) <= {head["version"], head["version"] + 1}  # a whole head each time
    check = st["last_check"]
    assert check["accepted"] and check["metric"] == "auc" and set(check["per_task"]) == {"image"}
    assert st["resumed_at_step"] and st["trained_minutes"] > trained
    meta = _site(server.url)
    assert meta["model"].endswith("cls_encoders/v0001.pt") and meta["heads"]["image"]["version"] == head["version"] + 1
    res = client.infer("fewshot_cls", unlabelled, {})[1]
    res = json.loads(res) if isinstance(res, (bytes, str)) else res
    assert res["head_version"] == head["version"] + 1 and len(res["prediction"]) == 2

    r = requests.post(f"{server.url}/metaapp/site/rollback?model=fewshot_cls", timeout=60)
    assert r.status_code == 200 and r.json()["version"] == 0, r.text
    meta = _site(server.url)
    assert meta["model"] == str(DEFAULT_CLS_WEIGHTS) and meta["heads"]["image"]["version"] == head["version"] + 2
    assert requests.get(f"{server.url}/metaapp/site", timeout=10).json()["fewshot_cls"]["version"] == 0
