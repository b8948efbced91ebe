"""Several meta-training runs of one fold, each adapted to the same support, their probabilities averaged.

Runs of one recipe that differ only in their seed transfer very differently to a held-out structure
(0.18-0.56 1-shot Dice on the myocardium fold), while a run's checkpoints 30-60 steps apart score
alike: what a run learns is a draw. An ensemble averages over the draws. Scored on the supports and
queries of `benchmarks/fewshot_seg.py` (whole-volume protocol, cmr 26-35), every member and every
subset of two or more members in the same run, so the members' own rows check against their fold
results.

    python benchmarks/experiments/seed_ensemble.py --fold 200 --members s0=A/fold200.pt s1=B/fold200.pt \\
        s2=C/fold200.pt --shots 1,3 --out benchmarks/results/loso_bank/ensemble/fold200.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from monailabel_metaapp.core.adaptation import SegAdapter, dice  # noqa: E402
from monailabel_metaapp.core.checkpoint import load_model  # noqa: E402
from monailabel_metaapp.evaluate import _probs_to_mask, draw_order, load_eval_studies  # noqa: E402
from monailabel_metaapp.evaluate_common import write_result  # noqa: E402
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view, require_shared_datasets  # noqa: E402

TEST_IDS = list(range(26, 36))


def score(members: dict[str, Path], value: int, shots: list[int], repeats: int, queries: int) -> list[dict]:
    """Dice per (k, subset of members) over the (support, query) pairs of `evaluate_seg` (seed 0)."""
    adapters = {n: SegAdapter(load_model(p), torch.device("cpu")) for n, p in members.items()}
    size = next(iter(adapters.values())).size
    data = load_eval_studies(cmr_view(Path(tempfile.mkdtemp()) / "cmr_test", TEST_IDS), size)
    pool = [s for s in data if (s.ref == value).any()]
    subsets = [c for r in range(1, len(members) + 1) for c in itertools.combinations(members, r)]
    values: dict[tuple, list[float]] = {}
    for k in shots:
        for r in range(repeats):
            order = draw_order(pool, 0, value, k, r)
            support, query = order[:k], order[k : k + queries]
            heads = {n: ad.adapt([s.stack for s in support], [s.lstack == value for s in support])
                     for n, ad in adapters.items()}  # fmt: skip
            one_piece = next(iter(heads.values())).one_piece
            for q in query:
                probs = {n: adapters[n].predict(q.stack, [heads[n]]) for n in members}
                for sub in subsets:
                    mean = torch.stack([probs[n] for n in sub]).mean(0)
                    pred = _probs_to_mask(mean, q.geom, one_piece)
                    values.setdefault((k, sub), []).append(dice(pred, q.ref == value))
            print(f"k={k} repeat {r}: " + ", ".join(f"{'+'.join(s)} {statistics.fmean(values[(k, s)]):.3f}"
                                                  for s in subsets))  # fmt: skip
    return [
        {"shots": k, "members": list(sub), "dice_mean": round(statistics.fmean(v), 4), "n": len(v), "values": v}
        for (k, sub), v in values.items()
    ]


def plot(rows: list[dict], png: Path, title: str) -> None:
    shots = sorted({r["shots"] for r in rows})
    fig, axes = plt.subplots(1, len(shots), figsize=(5 * len(shots), 4), squeeze=False)
    for ax, k in zip(axes[0], shots):
        sub = [r for r in rows if r["shots"] == k]
        colours = ["C0" if len(r["members"]) == 1 else "C1" for r in sub]
        ax.bar(range(len(sub)), [r["dice_mean"] for r in sub], color=colours)
        ax.set_xticks(range(len(sub)), ["+".join(r["members"]) for r in sub], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{k}-shot")
        ax.set_ylabel("whole-volume Dice (held-out structure)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", type=int, required=True, help="held-out label value (200, 500, 600)")
    ap.add_argument("--members", nargs="+", required=True, help="NAME=weights of runs that held out --fold")
    ap.add_argument("--shots", default="1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    require_shared_datasets()
    members = {m.split("=", 1)[0]: Path(m.split("=", 1)[1]) for m in a.members}
    name = next(n for n, v in CMR_STRUCTURES.items() if v == a.fold)
    t0 = time.time()
    rows = score(members, a.fold, [int(k) for k in a.shots.split(",")], a.repeats, a.queries)
    result = {
        "settings": {"fold": a.fold, "structure": name, "members": {n: str(p) for n, p in members.items()},
                     "repeats": a.repeats, "queries": a.queries, "seconds": round(time.time() - t0, 1)},
        "rows": rows,
    }  # fmt: skip
    title = f"{name} fold: members alone and averaged"
    out = write_result(result, a.out, lambda res, png: plot(res["rows"], png, title), list(members.values()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
