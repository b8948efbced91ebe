"""How soon after a save does a structure's first refined version go live, and is it as good?

Every second between a save and the first refined version is served by the quick head. Before the
first training step the guard prepares its bar: the quick head adapted on the training slices and
scored on the held-out block, and the quick head's predictions on the anchor studies. From two
labelled studies a second run from freshly drawn weights trains beside the warm one. Two orders of
that work, side by side in one process on one torch thread, on the same supports and anchors:

* `app`: what the app does. The guard takes the embeddings the app has cached from inference and
  active-learning scoring (half precision), and the fresh run starts at the warm run's first
  validation, so the warm run alone can publish the first version.
* `embed_both`: the guard embeds the support and anchor studies itself, and the fresh run is built
  with the warm one and shares the seconds from the first step (`TwoStartRefinement.start_fresh`).

Clock: compute seconds from the save (process CPU time over torch threads): the quick head's
adaptation on cached embeddings, the guard's construction, then steps and validations until a version
passes the guard (`--cap`: give up). Each first version is scored by its mean whole-volume Dice on
the query studies, beside the quick head's.

    OMP_NUM_THREADS=1 python benchmarks/refine_first_version.py --studies DIR [--model FILE]
        [--shots 1,2,3,5] [--draws 0,1] [--queries 3] [--out benchmarks/results/refine_first_version.json]

DIR is a datastore of studies with final labels (e.g. `shared_data.cmr_view`); writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monailabel_metaapp.core.refine import (  # noqa: E402
    RefineConfig,
    TwoStartRefinement,
    refined_adapter,
    start_refinement,
)
from monailabel_metaapp.evaluate import mean_query_dice, setup  # noqa: E402
from monailabel_metaapp.evaluate_common import plot_curves, write_result  # noqa: E402
from monailabel_metaapp.evaluate_timeline import ANCHORS, compute_seconds  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "refine_first_version.json"
ARMS = ("app", "embed_both")


def first_version(adapter, stacks, masks, head, anchors, cached, anchor_cached, arm: str, cap: float) -> dict:
    """Seconds of the guard's construction and of training until the first version passes it, and
    that version (None when none passed within `cap` seconds)."""
    cfg = RefineConfig()
    t0 = compute_seconds()
    if arm == "app":
        run = start_refinement(
            adapter, stacks, masks, head, cfg, anchors=anchors, feats=cached, anchor_feats=anchor_cached
        )
    else:
        run = start_refinement(adapter, stacks, masks, head, cfg, anchors=anchors)
        if isinstance(run, TwoStartRefinement):
            run.start_fresh()
    build = compute_seconds() - t0
    t1 = compute_seconds()
    version = None
    while compute_seconds() - t1 < cap and version is None:
        result = run.advance()
        if result is not None and result[1]:
            version = (refined_adapter(adapter, run.encoder_state()), run.head(), run.start, run.steps)
    return {"build": build, "train": compute_seconds() - t1, "version": version}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", required=True)
    ap.add_argument("--model", default=None, help="segmentation weights (default: the shipped ones)")
    ap.add_argument("--shots", default="1,2,3,5")
    ap.add_argument("--draws", default="0,1")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--cap", type=float, default=60.0, help="seconds of training before giving up")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(1)
    shots = [int(x) for x in a.shots.split(",")]
    draws = [int(x) for x in a.draws.split(",")]
    _, adapter, data, labels = setup(a.studies, None, a.model, "cpu")
    rows = []
    for name, v in labels.items():
        pool = [s for s in data if (s.ref == v).any()]
        for k in shots:
            for d in draws:
                order = random.Random(f"first-{v}-{k}-{d}").sample(pool, len(pool))
                support, query = order[:k], order[k : k + a.queries]
                anchor_studies = order[k + a.queries : k + a.queries + ANCHORS]
                stacks, masks = [s.stack for s in support], [s.lstack == v for s in support]
                anchors = [s.stack for s in anchor_studies]
                cached = [adapter.embed(st).half().float() for st in stacks]  # as the app caches them
                anchor_cached = [adapter.embed(st).half().float() for st in anchors]
                t0 = compute_seconds()
                head = adapter.adapt(stacks, masks, feats=cached)
                head_seconds = compute_seconds() - t0
                quick = mean_query_dice(adapter, head, query, v)
                for arm in ARMS:  # same supports, anchors and seeds for both
                    torch.manual_seed(d)
                    r = first_version(adapter, stacks, masks, head, anchors, cached, anchor_cached, arm, a.cap)
                    version = r.pop("version")
                    row = {"structure": name, "shots": k, "draw": d, "arm": arm, "head": round(head_seconds, 2)}
                    row |= {key: round(val, 2) for key, val in r.items()}
                    row["seconds"] = round(head_seconds + r["build"] + r["train"], 2) if version else None
                    row["quick_head_dice"] = round(quick, 4)
                    row["dice"] = round(mean_query_dice(version[0], version[1], query, v), 4) if version else None
                    row["start"], row["steps"] = (version[2], version[3]) if version else (None, None)
                    rows.append(row)
                    print(row, flush=True)
    summary = []
    for k in shots:
        for arm in ARMS:
            sel = [r for r in rows if r["shots"] == k and r["arm"] == arm]
            live = [r for r in sel if r["seconds"] is not None]
            summary.append(
                {
                    "shots": k,
                    "arm": arm,
                    "published": f"{len(live)}/{len(sel)}",
                    "seconds_median": round(statistics.median(r["seconds"] for r in live), 2) if live else None,
                    "build_median": round(statistics.median(r["build"] for r in sel), 2),
                    "dice_mean": round(statistics.fmean(r["dice"] for r in live), 4) if live else None,
                    "quick_head_dice_mean": round(statistics.fmean(r["quick_head_dice"] for r in live), 4)
                    if live
                    else None,
                }
            )
    for s in summary:
        print(s)
    settings = {"studies": a.studies, "model": a.model or "shipped", "shots": shots, "draws": draws}
    settings |= {"queries": a.queries, "cap": a.cap, "labels": labels, "threads": 1}
    result = {"settings": settings, "rows": rows, "summary": summary}
    write_result(result, a.out, plot, [a.model or SHIPPED_SEG])


def plot(result: dict, png: Path) -> None:
    """Median seconds from the save to the first refined version, per k, one line per arm."""
    points = [
        {"method": s["arm"], "shots": s["shots"], "seconds": s["seconds_median"], "spread": 0.0}
        for s in result["summary"]
        if s["seconds_median"] is not None
    ]
    plot_curves(
        points,
        png,
        "seconds",
        "spread",
        "seconds to the first refined version",
        "labelled studies",
        None,
        "first refined version after a save (median)",
        xticks=result["settings"]["shots"],
    )


if __name__ == "__main__":
    main()
