"""Click corrections through the real clients against a real `metaapp serve` process: points go in,
a corrected label comes out and gets better with the points; bad points get a clear 4xx; the
structure's shared head changes only when the label is saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
from conftest import slicer_client_module
from monailabel.client import MONAILabelClient
from scipy import ndimage

from monailabel_metaapp.core.adaptation import dice
from monailabel_metaapp.core.clicks import next_click
from monailabel_metaapp.lib.ohif import ohif_dir
from monailabel_metaapp.shared_data import one_structure_label

MODEL = "fewshot_seg_clicks"


def click_through(
    infer, image_id: str, structure: str | None, ref: sitk.Image, value: int, n: int, shown: np.ndarray | None = None
) -> list:
    """Simulated annotator: n clicks, each at the deepest point of the largest error of the label shown
    (at first `shown`, default nothing), every point so far sent with each request (as Slicer and OHIF
    send them). Returns [(Dice, result params)] after each click."""
    truth = sitk.GetArrayFromImage(ref) == value
    spacing = tuple(reversed(ref.GetSpacing()))
    shown = np.zeros_like(truth) if shown is None else shown
    fg, bg, out = [], [], []
    for _ in range(n):
        c = next_click(shown, truth, spacing)
        (fg if c.foreground else bg).append(list(c.ijk))
        params = {"foreground": fg, "background": bg} | ({"label": structure} if structure else {})
        res, reply = infer(MODEL, image_id, params)
        reply = reply if isinstance(reply, dict) else json.loads(reply)
        shown = sitk.GetArrayFromImage(sitk.ReadImage(res)) == 1
        out.append((dice(shown, truth), reply))
    return out


def head_files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / ".metaapp" / "heads").rglob("*")) if p.is_file()}


def test_slicer_points_correct_a_structure_and_only_a_save_changes_its_head(cmr_store, shared, start_server, tmp_path):
    server = start_server(cmr_store)
    st = server.wait_ready(rv_blood_pool=1)
    version = st["rv blood pool"]["version"]
    heads_before = head_files(cmr_store)
    slicer = slicer_client_module().MONAILabelClient(server.url, tmpdir=str(tmp_path))
    assert slicer.info()["models"][MODEL]["type"] == "deepgrow"  # Slicer shows its point tools for it

    ref = sitk.ReadImage(str(shared / "cmr_bssfp" / "label_28.nii.gz"))
    res, params = slicer.infer("fewshot_seg", "cmr_28", {"structures": "rv blood pool"})
    first = sitk.GetArrayFromImage(sitk.ReadImage(res)) == params["label_names"]["rv blood pool"]
    before = dice(first, sitk.GetArrayFromImage(ref) == 600)

    def infer(model, image_id, params):
        return slicer.infer(model, image_id, params | {"result_extension": ".nrrd"})

    runs = click_through(infer, "cmr_28", "rv blood pool", ref, 600, 4, first)
    dices = [d for d, _ in runs]
    assert max(dices[1:]) > before + 0.03, f"Dice before the points {before:.3f}, with them {dices}"
    assert runs[-1][1]["structure"] == "rv blood pool" and runs[-1][1]["head_version"] == version
    # the points taught a per-study copy only
    assert server.structures()["rv blood pool"]["version"] == version
    assert head_files(cmr_store) == heads_before, "clicks changed the structure's stored head"

    # the annotator saves the corrected label: now it teaches the shared head, and the copy is gone
    lbl = one_structure_label(shared / "cmr_bssfp" / "label_28.nii.gz", 600, tmp_path / "rv28.nii.gz")
    slicer.save_label("cmr_28", str(lbl), params={"label_info": [{"name": "rv blood pool", "idx": 1}]})
    st = server.wait_ready(rv_blood_pool=version + 1)
    assert st["rv blood pool"]["n_labels"] == 3
    z, y, x = np.argwhere(sitk.GetArrayFromImage(ref) == 600)[0]
    _, reply = infer(MODEL, "cmr_28", {"label": "rv blood pool", "foreground": [[int(x), int(y), int(z)]]})
    assert reply["head_version"] == st["rv blood pool"]["version"], "after the save, clicks start from the new head"


def test_points_alone_start_a_structure_and_bad_points_get_a_clear_4xx(sample_store, start_server, tmp_path):
    server = start_server(sample_store)
    server.wait_ready()
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    ref = sitk.ReadImage(str(next((sample_store / ".references").glob("mni_03.*"))))
    structures = server.structures()

    # a name the app has never seen: its first foreground points start a head (a per-study copy)
    runs = click_through(client.infer, "mni_03", "ventricle wall", ref, 2, 3)
    dices = [d for d, _ in runs]
    assert runs[0][1]["learned_from"] == "points alone"
    assert dices[-1] > 0.3 and dices[-1] > dices[0] - 0.05, dices
    assert server.structures() == structures, "points alone must not register a structure before a save"

    url = f"{server.url}/infer/{MODEL}?image=mni_03&output=json"

    def post(params: dict) -> requests.Response:
        return requests.post(url, data={"params": json.dumps(params)}, timeout=120)

    size = ref.GetSize()
    r = post({"label": "white matter", "foreground": [[size[0] + 5, 10, 10]]})
    assert r.status_code == 422 and "outside the image" in r.json()["detail"]
    r = post({"label": "white matter", "foreground": [[1, 2]]})
    assert r.status_code == 422 and "[i, j, k]" in r.json()["detail"]
    r = post({"label": "spleen", "background": [[10, 10, 10]]})
    assert r.status_code == 400 and "unknown structure 'spleen'" in r.json()["detail"]
    r = post({"label": "background", "foreground": [[10, 10, 10]]})  # OHIF with its background label selected
    assert r.status_code == 400 and "not background" in r.json()["detail"]
    r = post({"label": "white matter", "foreground": [], "background": []})
    assert r.status_code == 400 and "no points" in r.json()["detail"]
    r = requests.post(f"{server.url}/infer/{MODEL}?image=no_such_study", timeout=60)
    assert r.status_code == 404
    # a known structure with a head, points without its name (OHIF's deepgrow prompts): the head most
    # sure at the foreground points is the one corrected
    depth = ndimage.distance_transform_edt(sitk.GetArrayFromImage(ref) == 2)
    z, y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)  # deep inside the white matter
    r = post({"foreground": [[int(x), int(y), int(z)]]})
    assert r.status_code == 200 and r.json()["structure"] == "white matter"
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200

    # the OHIF the app serves sends the label its point prompts were placed for
    panel = next(f for f in ohif_dir().glob("*.bundle.*.js") if "Point Prompts" in f.read_text(errors="ignore"))
    served = requests.get(f"{server.url}/ohif/{panel.name}", timeout=30).text
    deepgrow_branch = served[served.index("params['foreground'] = fg;") :][:200]
    assert "params['label'] = currentLabel;" in deepgrow_branch
