"""On a structure the encoder never saw, where should refinement start: from the meta-learned weights
or from fresh weights of the same network?

Fine-tuned from the meta-learned weights, refinement on the held-out RV blood pool stayed below a UNet
trained from scratch however long it ran. This asks whether the network or its start holds it back.
Each method trains one network end to end, unguarded, on every slice of the support, and is scored
at each mark by its mean whole-volume Dice over the query studies:
* `meta`: `core.refine.Refinement` from the meta-learned encoder and the quick head, no teacher
  (the timeline's `finetune`);
* `fresh`: the same network and recipe from freshly drawn weights (`core.refine.fresh_adapter`),
  with a head adapted on those weights;
* `light`: the same recipe from freshly drawn weights of the light network the app's fresh start
  trains (`RefineConfig.fresh_emb`, `networks.light_config`);
* `scratch`: `evaluate.ScratchTrainer`, a MONAI UNet from random init (the timeline's baseline);
* `meta_kd`, `fresh_kd`: `meta` and `fresh` with the app's one-label teacher: the candidate's
  predictions on the anchor studies are pulled towards the quick head's (`RefineConfig.distill`), the
  quick head of the meta-learned encoder for both. `meta_kd` is the app's run at one label, unguarded.
Marks are process CPU seconds of each method's own steps on one thread (building the runs and
scoring are not counted). Draws as in `metaapp evaluate seg --timeline` (`--draws 0` is its repeat 0).

    OMP_NUM_THREADS=1 python benchmarks/experiments/fresh_start.py --studies DIR --structure 600
        --model FOLD.pt [--shots 1] [--draws 0,1,2] [--queries 4] [--marks 10,30,60,150]
        [--methods meta,fresh,light,scratch] --out F.json
    ... --combine A.json B.json --out F.json   (merge per-draw files)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scratch_candidate import draw_studies, mean_at, scratch_dice  # noqa: E402

from monailabel_metaapp.core.refine import RefineConfig, Refinement, fresh_adapter, refined_adapter  # noqa: E402
from monailabel_metaapp.evaluate import ScratchTrainer, mean_query_dice  # noqa: E402
from monailabel_metaapp.evaluate_common import int_list, write_result  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG  # noqa: E402

METHODS = ("meta", "fresh", "light", "scratch", "meta_kd", "fresh_kd")


def run_draw(studies: str, value: int, model: str, shots: int, queries: int, draw: int, marks, methods) -> list[dict]:
    ad, support, query, anchors, masks, quick = draw_studies(studies, value, model, shots, queries, draw)
    stacks = [s.stack for s in support]
    rows = [{"draw": draw, "method": "quick head", "seconds": 0.0, "dice": mean_query_dice(ad, quick, query, value)}]
    cfg = RefineConfig(distill=0.0)
    for method in methods:
        if method == "scratch":
            net = ScratchTrainer(stacks, masks, ad.device, draw)
            step, score = net.step, lambda net=net: scratch_dice(net, query, value, quick.one_piece)
        else:
            warm = method.startswith("meta")
            start = ad if warm else fresh_adapter(ad, draw, cfg.fresh_emb if method == "light" else 0)
            head = quick if warm else start.adapt(stacks, masks)
            taught = method.endswith("_kd")  # the live quick head teaches on the anchors, as in the app
            run = Refinement(
                ad,
                stacks,
                masks,
                quick,
                RefineConfig(distill=1.0) if taught else cfg,
                seed=draw,
                guard=False,
                anchors=anchors if taught else None,
                start_from=None if warm else (start, head),
            )

            def score(run=run, start=start) -> float:
                run.model.encoder.net.eval()
                d = mean_query_dice(refined_adapter(start, run.encoder_state()), run.head(), query, value)
                run.model.encoder.net.train()
                return d

            step = run.step
        clock, pending = 0.0, sorted(marks)
        while pending:
            t0 = time.process_time()
            step()
            clock += time.process_time() - t0
            while pending and clock >= pending[0]:
                rows.append({"draw": draw, "method": method, "seconds": pending.pop(0), "dice": score()})
                print(f"draw {draw}: {method} {rows[-1]['seconds']:.0f} s {rows[-1]['dice']:.3f}", flush=True)
    return rows


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = result["rows"], result["settings"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.axhline(mean_at(rows, "quick head", 0.0), color="grey", ls=":", label="quick head")
    for method in METHODS:
        marks = sorted({r["seconds"] for r in rows if r["method"] == method})
        if marks:
            ax.plot(marks, [mean_at(rows, method, m) for m in marks], "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("seconds of compute on one core")
    ax.set_ylabel("mean query Dice (unguarded)")
    ax.set_title(f"k = {s['shots']}, structure {s['structure']}, draws {s['draws']}: where to start", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", required=True)
    ap.add_argument("--structure", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--draws", type=int_list, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=1, help="labelled studies of the structure (k)")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--marks", default="10,30,60,150")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--combine", nargs="*", type=Path, help="merge the rows of earlier JSON files instead of running")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    methods = a.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose among {', '.join(METHODS)}")
    settings = {k: getattr(a, k) for k in ("studies", "structure", "model", "draws", "shots", "queries")}
    if a.combine:
        parts = [json.loads(p.read_text()) for p in a.combine]
        rows = [r for p in parts for r in p["rows"]]
        settings["draws"] = sorted({r["draw"] for r in rows})
        settings["runs"] = [p.get("provenance") for p in parts]  # each draw's commit, weights and command
    else:
        marks = [float(m) for m in a.marks.split(",")]
        rows = []
        for d in a.draws:
            rows += run_draw(a.studies, a.structure, a.model, a.shots, a.queries, d, marks, methods)
    write_result({"settings": settings, "rows": rows}, a.out, plot, weights=[a.model or SHIPPED_SEG])


if __name__ == "__main__":
    main()
