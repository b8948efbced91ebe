"""The app against a real PACS (Debian's Orthanc + DICOMweb plugin on 127.0.0.1), through real clients:
labels saved from Slicer become DICOM SEGs on the PACS with the image's geometry; SEGs stored there by
another client (OHIF's export, another workstation) become final labels and adapt the heads; a PACS
that goes down loses no label."""

from __future__ import annotations

import json
import time

import numpy as np
import requests
import SimpleITK as sitk
from conftest import on_grid, pacs_image, sample_label, slicer_client_module
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient
from pydicom.dataset import Dataset

from monailabel_metaapp.core.adaptation import dice
from monailabel_metaapp.pacs import orthanc as pacs
from monailabel_metaapp.pacs.dicom_io import (
    label_to_seg,
    read_dataset,
    seg_referenced_series,
    seg_to_label,
)


def _segs(client: DICOMwebClient, image_series: str) -> list[Dataset]:
    out = []
    for d in client.search_for_series(search_filters={"Modality": "SEG"}):
        s = Dataset.from_json(d)
        seg = client.retrieve_series(str(s.StudyInstanceUID), str(s.SeriesInstanceUID))[0]
        if seg_referenced_series(seg) == image_series:
            out.append(seg)
    return out


def _wait(predicate, timeout: float, what: str, server=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} not within {timeout} s" + (f"\n{server.log_tail()}" if server else ""))


def _pacs_info(server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=10).json()["metaapp"]["pacs"]


def test_slicer_label_becomes_a_seg_on_the_pacs_with_the_image_geometry(
    orthanc, loaded, pacs_server, samples_src, tmp_path
):
    client = DICOMwebClient(orthanc.dicomweb)
    image_id = loaded["mni_01"]
    grid = pacs_image(client, image_id, tmp_path / "img")
    sent = on_grid(sample_label(samples_src, "mni_01"), grid, 2)
    sitk.WriteImage(sent, str(tmp_path / "wm.nrrd"))

    slicer = slicer_client_module().MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path))
    reply = slicer.save_label(
        image_id, str(tmp_path / "wm.nrrd"), params={"label_info": [{"name": "white matter", "idx": 1}]}
    )
    reply = reply if isinstance(reply, dict) else json.loads(reply)
    assert "white matter" in reply["metaapp"]["fewshot_seg"]["adapting"]

    segs = _wait(lambda: _segs(client, image_id), 30, "the SEG on the PACS", pacs_server)
    assert len(segs) == 1, "the saved label must be stored on the PACS as one SEG referencing the image series"
    back, names = seg_to_label(segs[0], grid)
    assert names == {"white matter": 1}
    a, b = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sent)
    assert a.shape == b.shape and int(b.sum()) > 1000
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ between the label sent and the SEG read back"

    st = pacs_server.wait_ready(white_matter=1)
    assert st["white matter"]["n_labels"] == 1
    assert _pacs_info(pacs_server)["pending_uploads"] == []

    r = requests.put(
        f"{pacs_server.url}/datastore/label",
        params={"image": "1.2.3.4.not.on.the.pacs"},
        files={"label": ("wm.nrrd", (tmp_path / "wm.nrrd").read_bytes())},
        timeout=30,
    )
    assert r.status_code == 404 and "not on the PACS" in r.text, r.text


def test_seg_stored_on_the_pacs_by_another_client_is_learned_and_newer_wins(
    orthanc, loaded, pacs_server, samples_src, tmp_path
):
    """What OHIF's "Export DICOM SEG" does (STOW of a SEG that covers only the labelled frames)."""
    client = DICOMwebClient(orthanc.dicomweb)
    ml = MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path))
    target = loaded["mni_01"]
    reference = on_grid(sample_label(samples_src, "mni_01"), pacs_image(client, target, tmp_path / "t"), 2)

    def wm_dice() -> float:
        res, params = ml.infer("fewshot_seg", target, {})
        value = params["label_names"].get("white matter")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(res))
        return 0.0 if value is None else dice(pred == value, sitk.GetArrayFromImage(reference) > 0)

    before = wm_dice()
    src = loaded["mni_02"]
    grid = pacs_image(client, src, tmp_path / "s")
    full = on_grid(sample_label(samples_src, "mni_02"), grid, 2)
    partial = sitk.GetArrayFromImage(full)
    partial[: partial.shape[0] // 3] = 0  # a correction on some slices only: the SEG holds fewer frames
    part = sitk.GetImageFromArray(partial)
    part.CopyInformation(grid)
    source = [read_dataset(f) for f in sorted((tmp_path / "s").glob("*.dcm"))]
    seg = label_to_seg(part, {"white matter": 1}, source, "a correction from another viewer")
    assert seg.NumberOfFrames < grid.GetSize()[2]
    t0 = time.time()
    client.store_instances([seg])
    st = pacs_server.wait_ready(timeout=60, white_matter=1)
    learned_s = time.time() - t0
    assert learned_s < 30, f"the SEG took {learned_s:.1f} s to become a head"
    assert st["white matter"]["n_labels"] == 1
    after = wm_dice()
    assert after > before + 0.3, f"white matter Dice on another study: before {before:.3f}, after {after:.3f}"

    # the stored final label is the SEG on the image grid
    labelled = requests.get(f"{pacs_server.url}/datastore/label?label={src}&tag=final", timeout=30)
    assert labelled.status_code == 200
    (tmp_path / "final.nii.gz").write_bytes(labelled.content)
    final = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "final.nii.gz")))
    assert np.array_equal(final > 0, partial > 0)

    # a newer SEG for the same image replaces the label (MONAI Label's own datastore would ignore it)
    seg2 = label_to_seg(full, {"white matter": 1}, source, "a later correction")
    client.store_instances([seg2])
    st = pacs_server.wait_ready(timeout=60, white_matter=2)
    assert st["white matter"]["version"] == 2
    labelled = requests.get(f"{pacs_server.url}/datastore/label?label={src}&tag=final", timeout=30)
    (tmp_path / "final2.nii.gz").write_bytes(labelled.content)
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "final2.nii.gz"))) > 0, sitk.GetArrayFromImage(full) > 0
    )


def test_pacs_down_keeps_the_label_and_uploads_it_when_back(orthanc, loaded, pacs_server, samples_src, tmp_path):
    client = DICOMwebClient(orthanc.dicomweb)
    image_id = loaded["mni_01"]
    grid = pacs_image(client, image_id, tmp_path / "img")
    ml = MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path))
    ml.infer("fewshot_seg", image_id, {})  # the image is now in the app's cache
    sent = on_grid(sample_label(samples_src, "mni_01"), grid, 3)
    sitk.WriteImage(sent, str(tmp_path / "csf.nii.gz"))

    orthanc.stop()
    reply = ml.save_label(image_id, str(tmp_path / "csf.nii.gz"), params={"label_info": [{"name": "csf", "idx": 1}]})
    assert "csf" in reply["metaapp"]["fewshot_seg"]["adapting"]
    info = _wait(lambda: (i := _pacs_info(pacs_server))["reachable"] is False and i, 30, "PACS down seen", pacs_server)
    assert info["pending_uploads"] == [image_id] and info["last_error"], info
    pacs_server.wait_ready(csf=1)  # the app keeps learning while the PACS is down
    res, params = ml.infer("fewshot_seg", image_id, {})
    assert "csf" in params["label_names"]
    r = requests.put(
        f"{pacs_server.url}/datastore/label",
        params={"image": "1.2.3.4.not.on.the.pacs"},
        files={"label": ("x.nii.gz", (tmp_path / "csf.nii.gz").read_bytes())},
        timeout=30,
    )
    assert r.status_code == 503 and "unreachable" in r.text, r.text  # the app cannot know: it says why

    back = pacs.Orthanc(orthanc.folder, port=orthanc.port).start()
    try:
        _wait(lambda: _pacs_info(pacs_server)["pending_uploads"] == [], 60, "pending upload done", pacs_server)
        segs = _segs(DICOMwebClient(back.dicomweb), image_id)
        assert len(segs) == 1
        a = sitk.GetArrayFromImage(seg_to_label(segs[0], grid)[0])
        assert np.array_equal(a > 0, sitk.GetArrayFromImage(sent) > 0)
        assert _pacs_info(pacs_server)["reachable"] is True
    finally:
        back.stop()


def test_app_starts_while_the_pacs_is_down_and_recovers(orthanc, loaded, start_server, tmp_path):
    port, folder = orthanc.port, orthanc.folder
    orthanc.stop()
    env = {
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "cache"),
    }
    server = start_server(orthanc.dicomweb, conf={"pacs_poll_seconds": 2}, env=env)
    info = _wait(lambda: (i := _pacs_info(server))["reachable"] is False and i, 30, "PACS down seen", server)
    r = requests.post(f"{server.url}/infer/fewshot_seg", params={"image": loaded["mni_03"]}, timeout=30)
    assert r.status_code == 503 and "unreachable" in r.text, r.text
    assert info["last_error"]

    back = pacs.Orthanc(folder, port=port).start()
    try:
        _wait(lambda: _pacs_info(server)["reachable"] is True, 30, "PACS back", server)
        ml = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        res, params = ml.infer("fewshot_seg", loaded["mni_03"], {})
        assert (
            sitk.ReadImage(res).GetSize()
            == pacs_image(DICOMwebClient(back.dicomweb), loaded["mni_03"], tmp_path / "i").GetSize()
        )
    finally:
        back.stop()


def test_kill_9_during_a_pacs_upload_keeps_the_label_and_stores_one_seg(
    orthanc, loaded, pacs_server, samples_src, tmp_path
):
    """The server killed (SIGKILL) while saved labels are on their way to the PACS: after a restart
    each label is still the app's final label and reaches the PACS exactly once, as it was sent."""
    client = DICOMwebClient(orthanc.dicomweb)
    ml = MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path))
    saves: dict[str, int] = {}
    plan = [("mni_01", "csf", 3, 0.0), ("mni_02", "csf", 3, 0.2), ("mni_01", "white matter", 2, 0.6)]
    for image, name, value, delay in plan + [("mni_02", "white matter", 2, 1.5)]:
        image_id = loaded[image]
        grid = pacs_image(client, image_id, tmp_path / image)
        sent = on_grid(sample_label(samples_src, image), grid, value)
        path = tmp_path / f"{image}_{value}.nii.gz"
        sitk.WriteImage(sent, str(path))
        ml.save_label(image_id, str(path), params={"label_info": [{"name": name, "idx": 1}]})
        saves[image] = saves.get(image, 0) + 1
        time.sleep(delay)  # acknowledged; its upload is queued, running or done
        pacs_server.proc.kill()
        pacs_server.proc.wait(30)
        pacs_server.start()
        _wait(lambda: _pacs_info(pacs_server)["pending_uploads"] == [], 60, "pending upload done", pacs_server)
        segs = _segs(client, image_id)
        assert len(segs) == saves[image], f"{image}: {len(segs)} SEGs on the PACS after {saves[image]} saves"
        want = sitk.GetArrayFromImage(sent) > 0
        assert any(np.array_equal(sitk.GetArrayFromImage(seg_to_label(s, grid)[0]) > 0, want) for s in segs)
        r = requests.get(f"{pacs_server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=30)
        assert r.status_code == 200, f"{image}: the acknowledged label is gone after kill -9"
    wm = pacs_server.wait_ready()["white matter"]
    assert wm["n_labels"] == 2 and wm["state"] == "ready", wm


def test_a_retried_upload_stores_the_same_seg_again_not_a_second_one(orthanc, loaded, samples_src, tmp_path):
    """An upload that reached the PACS just before a crash is retried after the restart: with the same
    identity (image and label content) it is the same SEG, which the PACS takes without a duplicate."""
    client = DICOMwebClient(orthanc.dicomweb)
    image_id = loaded["mni_02"]
    grid = pacs_image(client, image_id, tmp_path / "s")
    label = on_grid(sample_label(samples_src, "mni_02"), grid, 3)
    source = [read_dataset(f) for f in sorted((tmp_path / "s").glob("*.dcm"))]
    first = label_to_seg(label, {"csf": 1}, source, identity=f"{image_id}/abc")
    time.sleep(0.01)
    again = label_to_seg(label, {"csf": 1}, source, identity=f"{image_id}/abc")
    other = label_to_seg(label, {"csf": 1}, source, identity=f"{image_id}/def")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    client.store_instances([first])
    client.store_instances([again])  # no error: the PACS already holds it
    assert [str(s.SeriesInstanceUID) for s in _segs(client, image_id)] == [str(first.SeriesInstanceUID)]


def test_a_damaged_pacs_cache_file_is_restored_from_its_copy(tmp_path):
    """The PACS cache's datastore file is written atomically with a copy beside it, as a studies folder's:
    a file left damaged (a crash, a full disk) is moved aside and the copy read, not a start-up failure."""
    from monailabel_metaapp.pacs.datastore import PacsDatastore

    client = DICOMwebClient(url="http://127.0.0.1:9/dicom-web")  # never reached: no poller is started
    store = PacsDatastore(client, {"Modality": "MR"}, cache_path=str(tmp_path))
    store.set_description("site PACS cache")
    store._observer.stop()
    path = store._datastore_config_path
    assert json.loads(open(path + ".bak").read())["description"] == "site PACS cache"
    open(path, "w").close()  # what an in-place write killed half-way leaves

    again = PacsDatastore(client, {"Modality": "MR"}, cache_path=str(tmp_path))
    again._observer.stop()
    assert again.description() == "site PACS cache"
    assert any("restored from datastore_v2.json.bak" in p for p in again.problems), again.problems
