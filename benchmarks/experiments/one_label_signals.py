"""With one labelled study, which signal that needs no other label tells whether fine-tuning on that
study is making the network better or worse on new studies?

A guard for refinement from one label needs such a signal. For one structure, the network is
fine-tuned end to end on the one labelled study (the unguarded `finetune` of the refinement
timeline, `core.refine.Refinement(guard=False)`); every `--every` steps it is scored by its Dice on
query studies (the truth the guard cannot see) and by signals computed from the labelled study and
3 unlabelled studies of the site (the anchors):
* `reverse`: reverse validation. A quick head adapted on the network's predictions on the anchors,
  with the frozen meta-learned encoder, scored on the labelled study's support slices.
* `head_agreement`: mean Dice between the network's and the quick head's predictions on the anchors.
* `volume_ratio`: mean predicted volume on an anchor over the labelled volume (log2; 0 = same size).
* `flip_consistency`: mean Dice between the prediction on an anchor and the flipped-back prediction
  on its left-right mirror image.
Support, query and anchor draws are those of `metaapp evaluate seg --timeline` (seed 0, repeat 0).

    python benchmarks/experiments/one_label_signals.py --studies DIR --structure 600 [--model FILE]
        [--queries 5] [--steps 150] [--every 15] --out trace.json
    python benchmarks/experiments/one_label_signals.py --combine a.json b.json ... --out DIR

--combine writes signals.json (per trace, the Spearman correlation of each signal with the query
Dice over the checkpoints) and signals.png (each signal and the query Dice against steps).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from tqdm import tqdm  # noqa: E402

from monailabel_metaapp.core.adaptation import SegAdapter  # noqa: E402
from monailabel_metaapp.core.refine import RefineConfig, Refinement, pooled_dice  # noqa: E402
from monailabel_metaapp.evaluate import draw_order, mean_query_dice, setup  # noqa: E402
from monailabel_metaapp.evaluate_timeline import ANCHORS  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp  # noqa: E402

SIGNALS = ["reverse", "head_agreement", "volume_ratio", "flip_consistency"]


def reverse_score(base: SegAdapter, anchors, predicted, stack, mask) -> float:
    """Dice on the labelled study's support slices of a quick head `base` adapts on `predicted`."""
    keep = [j for j, m in enumerate(predicted) if bool(m.any())]
    if not keep:
        return 0.0
    head = base.adapt([anchors[j] for j in keep], [predicted[j] for j in keep])
    idx = base.support_slices(mask)
    return pooled_dice([base.predict(stack[idx], [head])[0]], [mask[idx]])


def signals(base: SegAdapter, ad: SegAdapter, head, ref, anchors, stack, mask) -> dict[str, float]:
    """Every label-free signal of (ad, head) on the anchors and the labelled study (`ref`: the quick
    head's masks on the anchors)."""
    pred = [ad.predict(st, [head])[0] >= 0.5 for st in anchors]
    mirrored = [ad.predict(st.flip(-1), [head])[0].flip(-1) >= 0.5 for st in anchors]
    vol = max(1.0, float(mask.sum()))
    return {
        "reverse": reverse_score(base, anchors, pred, stack, mask),
        "head_agreement": sum(pooled_dice([p.float()], [r]) for p, r in zip(pred, ref)) / len(pred),
        "volume_ratio": sum(math.log2(max(1.0, float(p.sum())) / vol) for p in pred) / len(pred),
        "flip_consistency": sum(pooled_dice([p.float()], [m]) for p, m in zip(pred, mirrored)) / len(pred),
    }


def one_label_draw(studies: str, value: int, model: str | None, queries: int, draw: int = 0):
    """(adapter, support study, query studies, anchor stacks, support mask, quick head) of one draw of
    `metaapp evaluate seg --timeline` at one label (`draw` is its repeat)."""
    _, base, data, _ = setup(studies, {"s": value}, model, "cpu")
    pool = [s for s in data if (s.ref == value).any()]
    order = draw_order(pool, 0, value, 1, draw)
    support, query = order[0], order[1 : 1 + queries]
    anchors = [s.stack for s in order[1 + queries : 1 + queries + ANCHORS]]
    mask = support.lstack == value
    return base, support, query, anchors, mask, base.adapt([support.stack], [mask])


def trace(studies: str, value: int, model: str | None, queries: int, steps: int, every: int) -> dict:
    torch.manual_seed(0)
    base, support, query, anchors, mask, quick = one_label_draw(studies, value, model, queries)
    ref = [base.predict(st, [quick])[0] >= 0.5 for st in anchors]  # fixed: computed once
    run = Refinement(base, [support.stack], [mask], quick, RefineConfig(), seed=0, guard=False)

    def query_dice(ad: SegAdapter, head) -> float:
        return mean_query_dice(ad, head, query, value)

    rows = [
        {
            "steps": 0,
            "query": query_dice(base, quick),
            **signals(base, base, quick, ref, anchors, support.stack, mask),
        }
    ]
    for _ in tqdm(range(steps // every), desc=f"structure {value}", unit="checkpoint"):
        for _ in range(every):
            run.step()
        run.model.encoder.net.eval()
        head = run.head()
        rows.append(
            {
                "steps": run.steps,
                "query": query_dice(run.adapter, head),
                **signals(base, run.adapter, head, ref, anchors, support.stack, mask),
            }
        )
        run.model.encoder.net.train()
    settings = {"studies": studies, "structure": value, "model": model or "shipped", "queries": queries}
    settings |= {"steps": steps, "every": every, "refine": RefineConfig().to_dict()}
    return {"settings": settings, "rows": rows, "provenance": stamp([model] if model else [SHIPPED_SEG])}


def combine(files: list[Path], out: Path) -> None:
    traces = [json.loads(Path(f).read_text()) | {"file": Path(f).name} for f in files]
    summary = []
    fig, axes = plt.subplots(1, len(traces), figsize=(4 * len(traces), 3.4), squeeze=False)
    for t, ax in zip(traces, axes[0]):
        rows, name = t["rows"], f"{Path(t['settings']['model']).stem} / {t['settings']['structure']}"
        q = [r["query"] for r in rows]
        rho = {s: spearmanr([r[s] for r in rows], q).statistic for s in SIGNALS}
        summary.append({"trace": t["file"], "name": name, "query_first_last": [q[0], q[-1]], "spearman": rho})
        x = [r["steps"] for r in rows]
        ax.plot(x, q, "k-", lw=2, label="query Dice (truth)")
        for s in SIGNALS:
            v = [r[s] for r in rows]
            ax.plot(x, [a - v[0] + q[0] for a in v], label=f"{s} (rho {rho[s]:+.2f})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("fine-tuning steps on the one study")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("query Dice; signals shifted to start there")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "signals.png", dpi=110)
    weights = [w for t in traces for w in t["provenance"]["weights"]]
    (out / "signals.json").write_text(json.dumps({"summary": summary, "provenance": stamp(weights)}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies")
    ap.add_argument("--structure", type=int)
    ap.add_argument("--model", help="meta-trained weights (default: the shipped model)")
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=15)
    ap.add_argument("--combine", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.combine:
        combine(a.combine, a.out)
        return
    if not a.studies or a.structure is None:
        ap.error("give --studies and --structure (one trace) or --combine")
    torch.set_num_threads(1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(trace(a.studies, a.structure, a.model, a.queries, a.steps, a.every), indent=1))


if __name__ == "__main__":
    main()
