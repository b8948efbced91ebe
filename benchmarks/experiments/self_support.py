"""Self-support prototypes at test time: do prototypes of the query's own surest voxels, added beside
the support's, improve the adapted head's whole-volume Dice?

Self-support (Fan et al., ECCV 2022, *Self-Support Few-Shot Semantic Segmentation*): predict the
query with the adapted head, take the features of its surest voxels (foreground: probability >= 0.8
inside the largest 3D component when the structure is one piece; background: <= 0.2), cluster them
into as many prototypes as the head has, and predict again with both sets. Written here, not in the
product: it was not adopted (it helps cardiac blood pools at one label and costs brain tissues).

Both methods use the same heads (`meta`: the product's prediction; `self_support`: the same head
with the query's prototypes added), the same draws as `metaapp evaluate seg` (seeded per structure,
k and repeat), whole-volume 3D Dice on the original grid.

    python benchmarks/experiments/self_support.py --studies DIR --shots 1,3,5 --repeats 4 --queries 5 \
        --out benchmarks/results/self_support/cmr.json [--model FILE]

Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import Head, SegAdapter, dice, largest_component
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.networks import prototypes
from monailabel_metaapp.evaluate import (
    _probs_to_mask,
    dice_row,
    draw_order,
    load_eval_studies,
    plot_rows,
    structure_labels,
)
from monailabel_metaapp.evaluate_common import int_list, write_result
from monailabel_metaapp.provenance import SHIPPED_SEG

SURE_FG, SURE_BG = 0.8, 0.2


def with_query_prototypes(head: Head, feats: torch.Tensor, probs: torch.Tensor) -> Head:
    """The head with prototypes of the query's surest voxels added (unchanged when too few are sure)."""
    sure = probs >= 0.5
    if head.one_piece and bool(sure.any()):
        sure = torch.from_numpy(largest_component(sure.numpy()))
    fg, bg = sure & (probs >= SURE_FG), probs <= SURE_BG
    if int(fg.sum()) < 20 or int(bg.sum()) < 20:
        return head
    f = feats.permute(0, 2, 3, 1)
    p = dict(head.params)
    p["fg"] = torch.cat([p["fg"], prototypes(f[fg], p["fg"].shape[0], fallback=f[bg])])
    p["bg"] = torch.cat([p["bg"], prototypes(f[bg], p["bg"].shape[0], fallback=f[fg])])
    return Head(params=p, n_labels=head.n_labels, seconds=head.seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", required=True, help="datastore folder with final labels (or sample studies)")
    ap.add_argument("--model", help="segmentation weights (default: the shipped ones)")
    ap.add_argument("--shots", default="1,3,5")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    adapter = SegAdapter(load_model(a.model, "cpu"), "cpu")
    data = load_eval_studies(a.studies, adapter.size)
    labels = structure_labels(a.studies, data)
    shots = int_list(a.shots)
    dices: dict[tuple, list[float]] = {}
    bar = tqdm(total=len(labels) * len(shots) * a.repeats, desc="self-support", unit="episode")
    for name, v in labels.items():
        pool = [s for s in data if (s.ref == v).any()]
        for k in shots:
            for r in range(a.repeats):
                order = draw_order(pool, a.seed, v, k, r)  # the draws of `metaapp evaluate seg`
                support, query = order[:k], order[k : k + a.queries]
                head = adapter.adapt([s.stack for s in support], [s.lstack == v for s in support])
                for q in query:
                    feats = adapter.embed(q.stack)
                    probs = adapter.predict(q.stack, [head], feats=feats)
                    own = adapter.predict(q.stack, [with_query_prototypes(head, feats, probs[0])], feats=feats)
                    for method, p in (("meta", probs), ("self_support", own)):
                        pred = _probs_to_mask(p, q.geom, head.one_piece)
                        dices.setdefault((name, k, method), []).append(dice(pred, q.ref == v))
                bar.update(1)
    bar.close()
    rows = [dice_row(n, k, m, d) for (n, k, m), d in dices.items()]
    gains = {
        f"k={k}": round(
            statistics.fmean(
                statistics.fmean(dices[(n, k, "self_support")]) - statistics.fmean(dices[(n, k, "meta")])
                for n in labels
            ),
            4,
        )
        for k in shots
    }
    result = {
        "question": "do prototypes of the query's own surest voxels, added beside the support's, improve "
        "the adapted head's whole-volume Dice?",
        "settings": {
            "studies": a.studies,
            "labels": labels,
            "shots": shots,
            "repeats": a.repeats,
            "queries": a.queries,
            "seed": a.seed,
            "sure_foreground": SURE_FG,
            "sure_background": SURE_BG,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
        "mean_gain_over_structures": gains,
    }
    write_result(
        result, a.out, lambda r, png: plot_rows(r["rows"], png, "self-support prototypes"), [a.model or SHIPPED_SEG]
    )
    for r in sorted(rows, key=lambda r: (r["structure"], r["shots"], r["method"])):
        print(f"{r['structure']:>14} k={r['shots']} {r['method']:>12}: {r['dice_mean']:.3f} (n={r['n']})")
    print("mean gain over structures:", gains)


if __name__ == "__main__":
    main()
