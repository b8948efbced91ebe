"""An annotator's correction in the OHIF viewer the app serves reaches the model: headless Chromium
(Debian's, driven by Playwright) opens a study from a real Orthanc in OHIF's segmentation mode, paints
a structure with the brush, exports the DICOM SEG to the PACS; the app picks it up, stores it as the
final label, adapts a head, and inference on another study finds the structure. On that study, OHIF's
Point Prompts tab then sends foreground points where the shown brain misses it to `fewshot_seg_clicks`,
and OHIF shows the app's correction. Screenshots of each step go to test-artifacts/ohif/ (or
$METAAPP_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import requests
import SimpleITK as sitk
from conftest import REPO, on_grid, pacs_image, sample_label
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient
from pydicom.dataset import Dataset

from monailabel_metaapp.core.adaptation import dice

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) is not installed")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _artifacts() -> Path:
    out = Path(os.environ.get("METAAPP_ARTIFACTS", REPO / "test-artifacts")) / "ohif"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_ohif_brush_correction_exported_as_seg_teaches_the_app(
    browser, orthanc, loaded, pacs_server, samples_src, tmp_path
):
    shots = _artifacts()
    client = DICOMwebClient(orthanc.dicomweb)
    study = str(
        Dataset.from_json(client.search_for_series(search_filters={"SeriesInstanceUID": loaded["mni_01"]})[0])[
            "StudyInstanceUID"
        ].value
    )
    other = loaded["mni_02"]
    reference = on_grid(sample_label(samples_src, "mni_02"), pacs_image(client, other, tmp_path / "o"), None)
    ml = MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path))

    def brain_dice() -> float:
        res, params = ml.infer("fewshot_seg", other, {})
        value = params["label_names"].get("brain")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(res))
        return 0.0 if value is None else dice(pred == value, sitk.GetArrayFromImage(reference) > 0)

    before = brain_dice()

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    outside: list[str] = []
    page.on("request", lambda r: r.url.startswith(("http://127.0.0.1", "data:", "blob:")) or outside.append(r.url))
    page.goto(f"{pacs_server.url}/ohif/", wait_until="networkidle", timeout=120_000)
    page.get_by_text("mni_01").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "01_study_list.png"))

    page.goto(f"{pacs_server.url}/ohif/segmentation?StudyInstanceUIDs={study}", wait_until="networkidle")
    page.get_by_text("Confirm and Hide").click()
    box = page.locator("[data-cy=viewport-pane]").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    for _ in range(43):  # to the middle slice
        page.mouse.wheel(0, 100)
        time.sleep(0.03)
    page.screenshot(path=str(shots / "02_study_open.png"))

    # a new segment named as the structure, painted with a 25 mm spherical brush on three slices
    page.get_by_text("Add Segmentation").click()
    row = page.locator("[data-cy=data-row]").first
    row.hover()
    row.locator("svg").last.click()
    page.get_by_role("menuitem", name="Rename").click()
    page.locator("input[type=text]").first.fill("brain")
    page.get_by_role("button", name="Save").click()
    page.locator("[data-cy=Brush]").click()
    page.get_by_text("Sphere", exact=True).click()

    def paint():
        for dy in range(-160, 161, 80):
            page.mouse.move(cx - 130, cy + dy)
            page.mouse.down()
            for dx in range(-130, 131, 26):
                page.mouse.move(cx + dx, cy + dy, steps=2)
            page.mouse.up()

    paint()
    for step in (-18, 36):
        for _ in range(abs(step)):
            page.mouse.wheel(0, 100 if step > 0 else -100)
            time.sleep(0.03)
        paint()
    page.screenshot(path=str(shots / "03_painted.png"))

    _open_seg_export(page)
    page.locator("input[type=text]").first.fill("brain correction")
    t0 = time.time()
    page.get_by_role("button", name="Save").click()

    st = pacs_server.wait_ready(timeout=60, brain=1)
    learned_s = time.time() - t0
    page.screenshot(path=str(shots / "04_exported.png"))
    assert learned_s <= 30, f"the exported SEG became a head after {learned_s:.1f} s"
    assert st["brain"]["n_labels"] == 1 and st["brain"]["version"] >= 1
    labelled = requests.get(f"{pacs_server.url}/datastore/?output=all", timeout=30).json()
    final = labelled["objects"][loaded["mni_01"]]["labels"]["final"]
    assert final["info"]["pacs"]["source"] == "pacs"

    after = brain_dice()
    # the annotator's next study, run in OHIF's MONAI Label mode: the new head already segments it
    other_study = str(
        Dataset.from_json(client.search_for_series(search_filters={"SeriesInstanceUID": other})[0])[
            "StudyInstanceUID"
        ].value
    )
    page.goto(f"{pacs_server.url}/ohif/monai-label?StudyInstanceUIDs={other_study}", wait_until="networkidle")
    server_box = page.locator("input[type=text]").first
    server_box.fill(pacs_server.url + "/")
    sb = server_box.bounding_box()
    page.mouse.click(sb["x"] + sb["width"] + 30, sb["y"] + sb["height"] / 2)  # the panel's refresh button
    page.locator('button[title="Run Segmentation"]').click()
    page.wait_for_timeout(8000)
    page.screenshot(path=str(shots / "05_next_study_in_ohif.png"))
    (shots / "result.json").write_text(
        json.dumps({"dice_before": before, "dice_after": after, "export_to_head_seconds": learned_s}, indent=2)
    )
    _overlay(pacs_server.url, ml, other, tmp_path, shots / "06_next_study_result.png")
    assert after > before + 0.3, f"brain Dice on another study: before {before:.3f}, after {after:.3f}"

    _point_prompts(page, pacs_server, reference, shots, tmp_path)
    assert outside == [], f"the viewer reached outside 127.0.0.1: {outside}"


# the label map OHIF's MONAI Label mode shows (segmentation '1'), flat in the volume's index order
LABELMAP_JS = """() => Array.from(
  window.services.segmentationService.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray())"""


SEGMENTS_JS = """() => Object.fromEntries(Object.values(
  window.services.segmentationService.getSegmentations()[0].segments).map(s => [s.label, s.segmentIndex]))"""
# page position and voxel index [i, j, k] of every 6th canvas pixel of the axial viewport inside the image
AXIAL_JS = """() => {
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport('mpr-axial');
  const {imageData, dimensions} = vp.getImageData();
  const r = vp.element.getBoundingClientRect();
  const out = [];
  for (let y = 0; y < r.height; y += 6) for (let x = 0; x < r.width; x += 6) {
    const ijk = imageData.worldToIndex(vp.canvasToWorld([x, y])).map(Math.round);
    if (ijk.every((v, a) => v >= 0 && v < dimensions[a])) out.push([r.x + x, r.y + y, ijk]);
  }
  return out;
}"""


def _open_seg_export(page, tries: int = 3) -> None:
    """Export DICOM SEG from the segmentation's ••• menu (the app's OHIF fix makes it reach the PACS).
    On a loaded machine the menu can close before a click lands, so it is opened again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        title = page.get_by_text("Segmentation 1").first.bounding_box()
        page.mouse.click(title["x"] - 30, title["y"] + title["height"] / 2)
        try:
            page.get_by_role("menuitem", name="Export & Download").hover(timeout=15_000)
            page.get_by_role("menuitem", name="Export DICOM SEG").click(timeout=15_000)
            page.locator("input[type=text]").first.wait_for(timeout=20_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
            page.keyboard.press("Escape")


def _point_prompts(page, server, reference: sitk.Image, shots: Path, tmp: Path) -> None:
    """OHIF's Point Prompts tab: foreground points on the brain where the shown label misses it, run
    with `fewshot_seg_clicks`; the app gets the points with the label, and OHIF shows its correction."""
    import numpy as np

    ref = sitk.GetArrayFromImage(reference) > 0
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(reference > 0, insideIsPositive=True))
    banner = page.get_by_text("Confirm and Hide")
    if banner.is_visible():
        banner.click()
    page.get_by_text("Point Prompts", exact=True).click()
    models = page.locator("select.selectBox", has=page.locator("option[value=fewshot_seg_clicks]"))
    models.select_option("fewshot_seg_clicks")
    assert models.input_value() == "fewshot_seg_clicks"
    page.locator("tr.clickable-row", has_text="brain").click()

    brain = page.evaluate(SEGMENTS_JS)["brain"]
    shown = np.array(page.evaluate(LABELMAP_JS), dtype=np.uint8).reshape(ref.shape)
    # where the label OHIF shows misses the brain, deepest inside it first
    pixels = [(x, y, [int(v) for v in ijk]) for x, y, ijk in page.evaluate(AXIAL_JS)]  # Math.round: -0.0
    misses = [(x, y, ijk) for x, y, ijk in pixels if ref[tuple(ijk[::-1])] and shown[tuple(ijk[::-1])] != brain]
    assert misses, "the shown label misses no brain voxel on the axial slice: nothing for a point to correct"
    misses.sort(key=lambda m: -depth[tuple(m[2][::-1])])
    points = [misses[0]]
    far = [m for m in misses if np.hypot(m[0] - points[0][0], m[1] - points[0][1]) > 30]
    points += far[:1]
    for x, y, _ in points:
        page.mouse.click(x, y)
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "07_point_prompts_placed.png"))

    with page.expect_response(lambda r: "/infer/fewshot_seg_clicks" in r.url, timeout=180_000) as reply:
        page.locator('button[title="Run PointPrompts"]').click()
    res = reply.value
    assert res.status == 200, res.text()
    body = res.request.post_data
    sent = json.loads(body[body.index("{") : body.rindex("}") + 1])
    placed = [list(ijk) for _, _, ijk in points]
    assert sent["label"] == "brain" and sent["foreground"] == placed, sent
    page.get_by_text("Running Inference for Point Prompts - Successful").wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "07_point_prompts.png"))

    logged = [ln for ln in server.log_path.read_text(errors="replace").splitlines() if "Infer Request" in ln]
    assert any(
        "'fewshot_seg_clicks'" in ln and "'label': 'brain'" in ln and f"'foreground': {placed}" in ln for ln in logged
    ), "the app logged no fewshot_seg_clicks request with the points and the label:\n" + "\n".join(logged[-5:])

    (tmp / "points.nrrd").write_bytes(res.body())
    corrected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "points.nrrd"))) == 1
    now = np.array(page.evaluate(LABELMAP_JS), dtype=np.uint8).reshape(ref.shape)
    assert all(now[tuple(ijk[::-1])] == brain for ijk in placed), "a placed point is not brain in OHIF"
    assert np.array_equal(now == brain, corrected), "the brain OHIF shows is not the app's correction"
    changed = {
        "gained": int(((now == brain) & (shown != brain)).sum()),
        "lost": int(((now != brain) & (shown == brain)).sum()),
    }
    (shots / "point_prompts.json").write_text(json.dumps({"foreground": placed, "label": "brain", **changed}, indent=2))


def _overlay(url: str, ml: MONAILabelClient, image_id: str, tmp: Path, out: Path) -> None:
    """The next study with the adapted head's result, as the annotator would see it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res, _ = ml.infer("fewshot_seg", image_id, {})
    pred = sitk.GetArrayFromImage(sitk.ReadImage(res))
    img_file = tmp / "next.nii.gz"
    img_file.write_bytes(requests.get(f"{url}/datastore/image", params={"image": image_id}, timeout=60).content)
    z = int(np.argmax(pred.reshape(pred.shape[0], -1).sum(1)))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(sitk.GetArrayFromImage(sitk.ReadImage(str(img_file)))[z], cmap="gray")
    ax.imshow(np.ma.masked_equal(pred[z], 0), alpha=0.4, cmap="autumn")
    ax.set_title("next study: the head learned from the OHIF correction")
    ax.axis("off")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
