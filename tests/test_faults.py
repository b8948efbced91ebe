"""Faults: the server killed while it learns, and files damaged while it was down. After a restart
every acknowledged save is there, every head loads, versions never go back, and what was damaged is
skipped or rebuilt and named in `/info/`."""

from __future__ import annotations

import time

import requests
from monailabel.client import MONAILabelClient

from monailabel_metaapp.shared_data import one_structure_label


def info(server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()["metaapp"]


def test_kill_9_while_heads_adapt_loses_no_save_and_no_version(cmr_store, shared, start_server, tmp_path):
    server = start_server(cmr_store)
    seen = {n: s["version"] for n, s in server.wait_ready().items()}
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    saved = ["cmr_26", "cmr_27"]
    for i, delay in zip((28, 29, 30), (0.3, 1.5, 3.0)):
        lbl = one_structure_label(shared / "cmr_bssfp" / f"label_{i}.nii.gz", 500, tmp_path / f"l{i}.nii.gz")
        client.save_label(f"cmr_{i}", str(lbl), params={"label_info": [{"name": "lv blood pool", "idx": 1}]})
        saved.append(f"cmr_{i}")  # acknowledged: the adaptation it queued is running or about to
        time.sleep(delay)
        server.proc.kill()  # SIGKILL: no clean-up of any kind
        server.proc.wait(30)
        server.start()
        meta = info(server)
        assert meta["damaged_at_start"] == [], meta["damaged_at_start"]
        stored = {p.name.split(".")[0] for p in (cmr_store / "labels" / "final").iterdir()}
        assert set(saved) <= stored, f"an acknowledged save is missing after kill -9: {set(saved) - stored}"
        now = server.wait_ready()
        for name, version in seen.items():
            assert now[name]["version"] >= version, f"{name} went back from {version} to {now[name]['version']}"
        seen = {n: s["version"] for n, s in now.items()}
        assert now["lv blood pool"]["n_labels"] == len(saved) and now["lv blood pool"]["state"] == "ready"


def test_a_damaged_head_or_datastore_file_is_skipped_or_rebuilt_and_named_in_info(sample_store, start_server):
    server = start_server(sample_store)
    before = server.wait_ready()
    r = requests.put(f"{server.url}/metaapp/classes/mni_03", json={"class": "atrophy"}, timeout=30)
    assert r.status_code == 200, r.text
    server.stop()
    white = sample_store / ".metaapp" / "heads" / "white_matter" / f"v{before['white matter']['version']:04d}.pt"
    white.write_bytes(b"half a head")  # a disk fault, a copy gone wrong
    (sample_store / "datastore_v2.json").write_text('{"name": "new-dataset", "objects": {"mni_0')

    server.start()  # starts all the same
    damaged = info(server)["damaged_at_start"]
    assert any("datastore_v2.json" in d and "restored" in d for d in damaged), damaged
    assert any("'white matter' version" in d for d in damaged), damaged
    after = server.wait_ready()
    assert after["white matter"]["version"] > before["white matter"]["version"], "re-adapted, under a new number"
    assert after["grey matter"]["version"] == before["grey matter"]["version"]
    stored = requests.get(f"{server.url}/metaapp/classes?image=mni_03", timeout=30).json()["corrections"]
    assert stored["mni_03"], "the class correction came back with the datastore file"
    assert list(sample_store.glob("datastore_v2.json.damaged-*")), "the damaged file is kept aside"
