"""Seconds per click correction through the real REST API, beside a plain inference of the same
study in the same run: a real `metaapp serve`, one labelled cardiac study (LV blood pool head), a
256x256x40 query study whose embeddings are cached by a first inference, then simulated clicks
(each at the deepest point of the largest error, every point so far sent, as Slicer sends them).

    python benchmarks/click_latency.py [--clicks 8] [--slices 40] [--out benchmarks/results/click_latency.json]

Needs ../shared/datasets (real cardiac MRI); writes JSON + PNG. Site adaptation is off so that the
numbers are those of the request alone; the clicks start once every head is adapted and the first
active-learning scoring pass is done, as on a server that has been up for a while."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_latency import build_store, resample_slices  # noqa: E402

from monailabel_metaapp.core.adaptation import dice  # noqa: E402
from monailabel_metaapp.core.clicks import next_click  # noqa: E402
from monailabel_metaapp.devserver import Server  # noqa: E402
from monailabel_metaapp.evaluate_common import plot_curves  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp  # noqa: E402
from monailabel_metaapp.shared_data import require_shared_datasets, shared_datasets  # noqa: E402

STRUCTURE, VALUE = "lv blood pool", 500


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clicks", type=int, default=8)
    ap.add_argument("--slices", type=int, default=40, help="resample the 13-19 slice cardiac stacks to this many")
    ap.add_argument("--out", default="benchmarks/results/click_latency.json")
    a = ap.parse_args()
    require_shared_datasets()
    root = Path(tempfile.mkdtemp())
    store, _, _, query = build_store(root, a.slices)
    ref_img = sitk.ReadImage(str(shared_datasets() / "cmr_bssfp" / f"label_{query.split('_')[1]}.nii.gz"))
    ref_img = resample_slices(ref_img, a.slices, nearest=True)
    truth = sitk.GetArrayFromImage(ref_img) == VALUE
    spacing = tuple(reversed(ref_img.GetSpacing()))
    server = Server(store, root / "server.log", {"site_adapt": "false"}).start()
    try:
        server.wait_ready(lv_blood_pool=1)
        server.wait_scores()  # every head adapted and the first scoring pass done: the click's time alone
        client = MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp())
        infers, clicks, server_s, dices = [], [], [], []
        for _ in range(3):  # the first one embeds the study; the others are what a click is compared with
            t0 = time.perf_counter()
            res, params = client.infer("fewshot_seg", query, {"structures": STRUCTURE})
            infers.append(time.perf_counter() - t0)
        shown = sitk.GetArrayFromImage(sitk.ReadImage(res)) == params["label_names"][STRUCTURE]
        dices.append(dice(shown, truth))
        fg, bg = [], []
        for _ in range(a.clicks):
            c = next_click(shown, truth, spacing)
            (fg if c.foreground else bg).append(list(c.ijk))
            t0 = time.perf_counter()
            res, params = client.infer(
                "fewshot_seg_clicks", query, {"label": STRUCTURE, "foreground": fg, "background": bg}
            )
            clicks.append(time.perf_counter() - t0)
            server_s.append(params["latencies"]["total"])
            shown = sitk.GetArrayFromImage(sitk.ReadImage(res)) == 1
            dices.append(dice(shown, truth))
    finally:
        server.stop()
    infer_med = statistics.median(infers[1:])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "volume": {"id": query, "size_xyz": list(ref_img.GetSize()), "resampled_to_slices": a.slices},
        "structure": STRUCTURE,
        "infer_s": infers,
        "click_s": clicks,
        "click_server_s": server_s,
        "dice_after_clicks": [round(d, 4) for d in dices],
        "median_click_s": statistics.median(clicks),
        "median_infer_s": infer_med,
        "click_over_infer": statistics.median(clicks) / infer_med,
        "target_click_s": 1.0,
        "provenance": stamp([SHIPPED_SEG]),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("median_click_s", "median_infer_s", "click_over_infer")}, indent=2))


def plot(r: dict, png: Path) -> None:
    """Seconds of each click's round trip beside a plain inference and the 1-s target."""
    rows = []
    for i, t in enumerate(r["click_s"], 1):
        rows.append({"method": "click correction (round trip)", "click": i, "s": t, "err": 0.0})
        rows.append({"method": "plain inference, embeddings cached", "click": i, "s": r["median_infer_s"], "err": 0.0})
        rows.append({"method": "target", "click": i, "s": r["target_click_s"], "err": 0.0})
    title = f"Click latency, {r['volume']['size_xyz']} study, {r['machine']['threads']} threads"
    plot_curves(rows, png, "s", "err", "seconds", "click", title=title, x="click")


if __name__ == "__main__":
    main()
