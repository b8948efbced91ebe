"""Active learning from the meta-learned model: scores, strategies through the real REST API
(3D Slicer's client, as its "Next Sample" button calls it), and the simulation command."""

from __future__ import annotations

import json
import threading

import numpy as np
import requests
import SimpleITK as sitk
import torch
from conftest import slicer_client_module

from monailabel_metaapp.core.selection import farthest_first, soft_dice_uncertainty
from monailabel_metaapp.lib.scoring.al_scores import KEY

OURS = ("uncertainty", "diversity", "hybrid")
LABELLED = {"cmr_26", "cmr_27"}


def test_uncertainty_is_low_for_a_confident_mask_high_for_a_fuzzy_or_missing_one():
    sharp = torch.zeros(4, 32, 32)
    sharp[:, 8:24, 8:24] = 0.99
    fuzzy = sharp.clone()
    fuzzy[:, 8:24, 8:24] = 0.55
    fuzzy[:, 4:28, 4:28] += 0.3
    assert soft_dice_uncertainty(sharp) < 0.02
    assert soft_dice_uncertainty(fuzzy) > soft_dice_uncertainty(sharp) + 0.1
    assert soft_dice_uncertainty(torch.full((4, 32, 32), 1e-4)) == 1.0  # the head sees nothing


def test_farthest_first_covers_the_space_away_from_what_is_labelled():
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [10.0, 0.0]])
    assert farthest_first(pts, torch.tensor([[0.0, 0.0]]))[0] == 3  # farthest from the labelled point
    assert farthest_first(pts, torch.tensor([[10.0, 0.0]])) == [0, 2, 1, 3]  # then away from the first pick
    assert sorted(farthest_first(pts, torch.zeros(0, 0))) == [0, 1, 2, 3]


def test_two_annotators_are_served_different_studies_even_before_the_pick_is_recorded(tmp_path):
    """MONAI Label writes a pick into the image info after the strategy returns (and its datastore
    may drop that write); a second Next Sample in between must still get another study."""
    from monailabel.datastore.local import LocalDatastore

    from monailabel_metaapp.lib.activelearning.meta_strategies import Diversity, Hybrid, Uncertainty

    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.float32))
    for i in range(4):
        sitk.WriteImage(img, str(tmp_path / f"s{i}.nii.gz"))
    ds = LocalDatastore(str(tmp_path), extensions=["*.nii.gz"], auto_reload=False)
    for strategy in (Uncertainty(), Diversity(), Hybrid()):
        first = strategy({"strategy": "x", "client_id": "a"}, ds)["id"]
        assert strategy({"strategy": "x", "client_id": "a"}, ds)["id"] == first, "an annotator keeps their study"
        second = strategy({"strategy": "x", "client_id": "b"}, ds)["id"]
        assert second != first
    assert Uncertainty(lease_seconds=0.0)({"strategy": "x", "client_id": "b"}, ds)["id"] == "s0", "lease over"


def _ranking(server, strategy: str, **params) -> list[dict]:
    r = requests.get(f"{server.url}/metaapp/activelearning/{strategy}", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["ranking"]


def _label_of(shared, i: int, value: int, out) -> str:
    img = sitk.ReadImage(str(shared / "cmr_bssfp" / f"label_{i}.nii.gz"))
    lbl = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) == value).astype(np.uint8))
    lbl.CopyInformation(img)
    sitk.WriteImage(lbl, str(out), useCompression=True)
    return str(out)


def test_strategies_rank_from_cached_scores_skip_labelled_and_reserved_studies(
    cmr_store, shared, start_server, tmp_path
):
    server = start_server(cmr_store)
    server.wait_ready(lv_blood_pool=1)
    server.wait_scores()
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert set(OURS) | {"random", "first"} <= set(info["strategies"])
    assert "metaapp_al" in info["scoring"]

    # scores live in the datastore's image info, under the live head versions
    ds = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    live = {n: s["version"] for n, s in info["metaapp"]["fewshot_seg"]["structures"].items()}
    for image_id in ("cmr_28", "cmr_29", "cmr_30", "cmr_31"):
        al = ds[image_id]["image"]["info"][KEY]
        assert al["head_versions"] == live and set(al["uncertainty"]) == set(live)
        assert all(0.0 <= u <= 1.0 for u in al["uncertainty"].values())
    before = {r["id"]: r["score"] for r in _ranking(server, "uncertainty", structure="lv blood pool")}
    assert set(before) == {"cmr_28", "cmr_29", "cmr_30", "cmr_31"}, "a labelled study was ranked"

    slicer = slicer_client_module()
    a = slicer.MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="annotator-a")
    b = slicer.MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="annotator-b")
    for strategy in OURS:
        assert a.next_sample(strategy, {})["id"] not in LABELLED

    # two annotators asking at the same time get different studies
    picks: dict[str, str] = {}

    def ask(client, key):
        picks[key] = client.next_sample("uncertainty", {"structure": "lv blood pool"})["id"]

    threads = [threading.Thread(target=ask, args=(c, k)) for c, k in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert picks["a"] != picks["b"] and not {picks["a"], picks["b"]} & LABELLED
    for strategy in OURS:  # what is reserved for b is never offered to a
        assert picks["b"] not in [r["id"] for r in _ranking(server, strategy, client_id="annotator-a")]

    # a saved label -> re-adapted head -> every unlabelled study re-scored -> a different order
    target = next(i for i in before if i not in picks.values())
    label = _label_of(shared, int(target[-2:]), 500, tmp_path / "lv.nii.gz")
    a.save_label(target, label, params={"label_info": [{"name": "lv blood pool", "idx": 1}]})
    server.wait_ready(lv_blood_pool=live["lv blood pool"] + 1)
    server.wait_scores()
    ranked = _ranking(server, "uncertainty", structure="lv blood pool", client_id="annotator-a")
    after = {r["id"]: r["score"] for r in ranked}
    assert set(after) == set(before) - {target, picks["b"]}, "labelled or reserved for b, yet offered to a"
    assert any(abs(after[i] - before[i]) > 1e-4 for i in after), "scores did not follow the new head"
    orders = {s: [r["id"] for r in _ranking(server, s, client_id="annotator-a")] for s in OURS}
    assert all(target not in o for o in orders.values())
    assert list(after) == sorted(after, key=lambda i: (-after[i], i)), "the pick must follow the new scores"


def test_simulate_al_runs_the_loop_through_the_rest_api(shared, tmp_path):
    from monailabel_metaapp.shared_data import cmr_view
    from monailabel_metaapp.simulate_al import simulate_al

    studies = cmr_view(tmp_path / "cmr", list(range(1, 7)))
    out = tmp_path / "al.json"
    r = simulate_al(
        studies, "lv blood pool", ["first", "hybrid"], budget=2, repeats=1, eval_studies=1, pool_size=4, out=out
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] == r["rows"] and out.with_suffix(".png").stat().st_size > 1000
    assert {(row["strategy"], row["labels"]) for row in r["rows"]} == {
        (s, n) for s in ("first", "hybrid") for n in (1, 2)
    }
    for row in r["rows"]:
        assert 0.0 <= row["dice_mean"] <= 1.0 and row["n"] == 1
    runs = {p["strategy"]: p for p in r["picks"]}
    assert runs["first"]["picks"][0] == runs["hybrid"]["picks"][0], "every strategy starts from the same label"
    for strategy, run in runs.items():
        assert len(set(run["picks"])) == 2, "a study was offered twice"
        assert not set(run["picks"]) & set(r["settings"]["held_out"]), "a held-out study was offered"
        rows = sorted((row for row in r["rows"] if row["strategy"] == strategy), key=lambda row: row["labels"])
        assert [row["dice_mean"] for row in rows] == run["dice"]
