"""Faults: the server killed while it learns (segmentation heads, the classifier), and files
damaged while it was down. After a restart every acknowledged save is there, every head loads,
versions never go back, and what was damaged is skipped or rebuilt and named in `/info/`."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from monailabel.client import MONAILabelClient
from test_cls_app import LV, RV, roi_of, wait_head

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


def test_kill_9_while_the_classifier_adapts_loses_no_correction(cmr_store, shared, start_server):
    """Class corrections acknowledged, then SIGKILL at once or moments later (the classifier's head
    adapts in milliseconds, so some kills land before, some during, some after it): after a restart
    every acknowledged correction is stored, the head re-learns from all of them, and its version
    never goes back."""
    server = start_server(cmr_store)
    server.wait_ready()
    acknowledged: dict[tuple[str, str], str] = {}
    examples = {"left": 0, "right": 0}
    version = 0
    for i, delay in zip((28, 29, 30), (0.0, 0.05, 0.5)):
        ref = shared / "cmr_bssfp" / f"label_{i}.nii.gz"
        for value, cls in ((LV, "left"), (RV, "right")):
            body = {"class": cls, "roi": roi_of(ref, value)}
            r = requests.put(f"{server.url}/metaapp/classes/cmr_{i}", json=body, timeout=60)
            assert r.status_code == 200, r.text
            acknowledged[(f"cmr_{i}", r.json()["key"])] = cls
            examples[cls] += 1
        time.sleep(delay)
        server.proc.kill()
        server.proc.wait(30)
        server.start()
        assert info(server)["damaged_at_start"] == []
        stored = requests.get(f"{server.url}/metaapp/classes", timeout=30).json()["corrections"]
        lost = [k for k, cls in acknowledged.items() if stored.get(k[0], {}).get(k[1], {}).get("class") != cls]
        assert not lost, f"acknowledged class corrections missing after kill -9: {lost}"
        head = wait_head(server.url, "region", examples)
        assert head["version"] >= version, f"the classifier's head went back from {version} to {head['version']}"
        version = head["version"]


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


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs to fill up (needs root; skipped where it cannot be mounted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"a small tmpfs cannot be mounted here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (2**20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_gets_507_keeps_the_live_head_and_leaves_nothing_half_written(
    small_disk, sample_store, start_server
):
    store = small_disk / "studies"
    shutil.copytree(sample_store, store)
    server = start_server(store)
    before = server.wait_ready()
    filler = fill(small_disk)
    labels, heads = files(store / "labels"), files(store / ".metaapp" / "heads")

    names = {"label_info": [{"name": n, "idx": v} for n, v in {"grey matter": 1, "white matter": 2}.items()]}
    upload = {"label": ("mni_01.nii.gz", (sample_store / "labels" / "final" / "mni_01.nii.gz").read_bytes())}
    r = requests.put(f"{server.url}/datastore/label?image=mni_01", files=upload, data={"params": json.dumps(names)})
    assert r.status_code == 507 and "no space left" in r.json()["detail"], r.text

    # every head re-adapts, and none can be written
    r = requests.post(f"{server.url}/train/fewshot_seg", json={}, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.time() + 240
    st = server.structures()
    while any(s["state"] in ("queued", "adapting") for s in st.values()):
        assert time.time() < deadline, st
        time.sleep(0.5)
        st = server.structures()
    assert all(st[n]["state"] == "failed" and "No space" in st[n]["error"] for n in before), st
    assert {n: s["version"] for n, s in st.items()} == {n: s["version"] for n, s in before.items()}
    r = requests.post(f"{server.url}/infer/fewshot_seg?image=mni_03&output=json", timeout=120)
    assert r.status_code == 200 and r.json()["head_versions"] == {n: s["version"] for n, s in before.items()}
    assert files(store / "labels") == labels and files(store / ".metaapp" / "heads") == heads
    assert not [p for p in store.rglob("*") if p.name.endswith((".tmp", ".previous"))], "half-written files left"

    filler.unlink()  # space again: the same requests go through
    r = requests.put(f"{server.url}/datastore/label?image=mni_01", files=upload, data={"params": json.dumps(names)})
    assert r.status_code == 200, r.text
    after = server.wait_ready()
    assert all(after[n]["version"] > before[n]["version"] and after[n]["state"] == "ready" for n in names_of(names))


def names_of(params: dict) -> list[str]:
    return [i["name"] for i in params["label_info"]]
