"""The head store and the label-naming rules the app relies on (no server needed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monailabel.datastore.local import LocalDatastore

from monailabel_metaapp.core.adaptation import Head
from monailabel_metaapp.lib.label_names import final_label_structures, named_values, split_named
from monailabel_metaapp.lib.seg.heads import HeadStore


def _head(v: float, n: int) -> Head:
    return Head(params={"bias": torch.tensor(v), "fg": torch.full((2, 4), v)}, n_labels=n, seconds=0.1)


def test_versions_restart_and_rollback(tmp_path):
    store = HeadStore(tmp_path)
    store.ensure("liver", 1)
    assert store.publish("liver", _head(1.0, 1)) == 1
    assert store.publish("liver", _head(2.0, 2)) == 2
    assert store.heads()["liver"].params["bias"].item() == 2.0
    # a restart sees the same live head and its label count
    again = HeadStore(tmp_path)
    assert again.snapshot()["liver"]["version"] == 2 and again.snapshot()["liver"]["n_labels"] == 2
    assert again.heads()["liver"].params["bias"].item() == 2.0
    # rollback to the previous version, then a bad version and an unknown structure
    assert again.rollback("liver") == 1
    assert again.heads()["liver"].params["bias"].item() == 1.0 and again.snapshot()["liver"]["n_labels"] == 1
    with pytest.raises(ValueError):
        again.rollback("liver", 7)
    with pytest.raises(KeyError):
        again.rollback("spleen")
    # files are plain state_dicts and no temporary file is left behind
    assert torch.load(tmp_path / "liver" / "v0002.pt", weights_only=True)["bias"].item() == 2.0
    assert not list(tmp_path.rglob("*.tmp"))
    assert json.loads((tmp_path / "registry.json").read_text())["structures"]["liver"]["version"] == 1


def test_refined_versions_keep_their_encoder_stage_and_score_across_restart_and_rollback(tmp_path):
    store = HeadStore(tmp_path)
    store.ensure("liver", 1)
    store.publish("liver", _head(1.0, 1))
    refined = _head(2.0, 1)
    refined.stage = "refined"
    assert 2 == store.publish("liver", refined, encoder={"w": torch.ones(3)}, info={"val_dice": 0.9, "start": "fresh"})
    snap = store.snapshot()["liver"]
    assert (snap["version"], snap["stage"], snap["val_dice"], snap["start"]) == (2, "refined", 0.9, "fresh")
    assert torch.load(tmp_path / "liver" / "v0002.encoder.pt", weights_only=True)["w"].sum() == 3
    # a version kept for rollback only does not change what is served
    assert store.publish("liver", _head(3.0, 2), live=False) == 3 and store.snapshot()["liver"]["version"] == 2
    again = HeadStore(tmp_path)
    head = again.heads()["liver"]
    assert head.stage == "refined" and head.encoder_file.endswith("v0002.encoder.pt")
    assert again.rollback("liver", 1) == 1 and again.heads()["liver"].encoder_file is None
    assert again.snapshot()["liver"]["stage"] == "head" and again.snapshot()["liver"]["start"] is None
    assert again.rollback("liver", 3) == 3 and again.snapshot()["liver"]["n_labels"] == 2


def test_a_registry_from_before_per_version_metadata_still_loads(tmp_path):
    (tmp_path / "liver").mkdir()
    torch.save({"bias": torch.tensor(1.0)}, tmp_path / "liver" / "v0001.pt")
    rec = {"value": 1, "version": 1, "versions": [1], "n_labels": 2, "state": "ready", "updated": "x"}
    rec["n_labels_by_version"] = {"1": 2}
    (tmp_path / "registry.json").write_text(json.dumps({"structures": {"liver": rec}}))
    store = HeadStore(tmp_path)
    assert store.heads()["liver"].n_labels == 2 and store.snapshot()["liver"]["stage"] == "head"


def test_output_values_fit_uint8_and_new_names_get_free_values(tmp_path):
    store = HeadStore(tmp_path)
    store.ensure("lv myocardium", 200)
    store.ensure("lv blood pool", 500)  # too large for a uint8 result: gets a free value
    store.ensure("rv", 200)  # taken: gets a free value
    values = store.labels()
    assert values["lv myocardium"] == 200
    assert len(set(values.values())) == 3 and all(0 < v < 256 for v in values.values())


def test_interrupted_adaptation_is_not_reported_as_running_after_restart(tmp_path):
    store = HeadStore(tmp_path)
    store.ensure("liver", 1)
    store.publish("liver", _head(1.0, 1))
    store.set_state("liver", "adapting")
    assert HeadStore(tmp_path).snapshot()["liver"]["state"] == "ready"


def test_label_names_from_slicer_monailabel_and_labels_json():
    defaults = {"liver": 1, "spleen": 2}
    assert named_values({"label_info": [{"name": "tumour", "idx": 3}]}, defaults) == {"tumour": 3}
    assert named_values({"label_info": [{"name": "tumour", "id": 4}]}, defaults) == {"tumour": 4}  # OHIF
    assert named_values({"label_names": {"kidney": 5}}, defaults) == {"kidney": 5}
    assert named_values({"params": {"label_names": {"kidney": 5}}}, defaults) == {"kidney": 5}
    assert named_values({}, defaults) == defaults
    assert split_named([1, 2, 9], defaults) == ({"liver": 1, "spleen": 2}, [9])


def test_a_label_placed_by_hand_is_read_once_and_again_when_rewritten(tmp_path):
    """Structures of a label without the app's save record come from the file's values; the values are
    cached per file stamp, so a label rewritten in the folder is seen with its new structures."""
    (tmp_path / "labels" / "final").mkdir(parents=True)

    def write(path, values):
        arr = np.zeros((4, 8, 8), np.uint8)
        for n, v in enumerate(values):
            arr[n] = v
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))

    write(tmp_path / "a.nii.gz", [0])
    label = tmp_path / "labels" / "final" / "a.nii.gz"
    write(label, [1])
    ds = LocalDatastore(str(tmp_path), extensions=("*.nii.gz",), auto_reload=False)
    names = {"liver": 1, "spleen": 2}
    assert final_label_structures(ds, "a", names) == {"liver": 1}
    write(label, [1, 2])
    later = label.stat().st_mtime + 5
    os.utime(label, (later, later))
    assert final_label_structures(ds, "a", names) == {"liver": 1, "spleen": 2}


def test_a_damaged_head_file_or_registry_never_stops_a_restart_and_versions_never_go_back(tmp_path):
    store = HeadStore(tmp_path)
    for v in (1.0, 2.0, 3.0):
        store.publish("liver", _head(v, int(v)))
    store.publish("spleen", _head(9.0, 1))
    (tmp_path / "liver" / "v0003.pt").write_bytes(b"half a file")  # a disk fault, a copy gone wrong

    again = HeadStore(tmp_path)  # starts; the newest version that loads serves
    assert again.snapshot()["liver"]["version"] == 2 and again.heads()["liver"].params["bias"].item() == 2.0
    assert again.snapshot()["liver"]["n_labels"] == 2 and again.heads()["spleen"].params["bias"].item() == 9.0
    assert any("'liver' version 3" in p for p in again.problems)
    with pytest.raises(ValueError, match="cannot be read"):
        again.rollback("liver", 3)
    assert again.publish("liver", _head(4.0, 4)) == 4, "a new version never reuses a number"

    (tmp_path / "registry.json").write_text("{not json")
    fresh = HeadStore(tmp_path)  # starts without records: heads re-adapt from their labels
    assert fresh.heads() == {} and any("registry.json could not be read" in p for p in fresh.problems)
    assert list(tmp_path.glob("registry.json.damaged-*")), "the damaged registry is kept aside"
    assert fresh.publish("liver", _head(5.0, 4)) == 5, "numbers go on from the files on disk"
