"""What limits a click? For each simulated click of `metaapp evaluate clicks` (the product's `meta`
method, k saved labels), how many of the wrong voxels near the click does the corrected copy of the
head fix, how many would the best single threshold on its probabilities fix, and what happens if the
correction reached further than `core.clicks.REACH`?

Counts are voxels of the model grid (160 x 160 per slice) against the reference cut the same way,
summed over clicks: `before` (what was shown), `copy` (the copy's label at 0.5, as the app shows it),
`best_threshold` (the copy's probabilities at the threshold that fixes most, chosen per click with
the reference: an upper bound for any threshold rule), at 1, 2 and 4 times the app's reach. Writes
JSON + PNG.

    OMP_NUM_THREADS=1 python benchmarks/experiments/click_reach.py --studies <cmr view> \
        --labels '{"lv blood pool": 500, "rv blood pool": 600}' --out F.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from monailabel_metaapp.core import clicks as C  # noqa: E402
from monailabel_metaapp.core.adaptation import DEFAULT_ADAPT_STEPS, SegAdapter  # noqa: E402
from monailabel_metaapp.core.checkpoint import load_model  # noqa: E402
from monailabel_metaapp.core.volume import grid_spacing  # noqa: E402
from monailabel_metaapp.evaluate import load_eval_studies  # noqa: E402
from monailabel_metaapp.evaluate_clicks import MetaClicks, served_version, spacing_zyx  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp  # noqa: E402

REACHES = (1, 2, 4)
THRESHOLDS = tuple(t / 10 for t in range(1, 10))


def click_and_count(session: MetaClicks, click: C.Click, ref: torch.Tensor) -> tuple:
    """Apply `click` as the app does, then count the wrong voxels within each multiple of its reach:
    shown before it, the corrected copy's label at 0.5, and the copy at its best threshold.
    Returns (the new prediction on the original grid, {multiple: counts})."""
    adapter, q = session.adapter, session.study
    before = session.state.shown
    pred = session.click(click)  # the app's correction: `state.head` is now the corrected copy
    prob = adapter.predict(q.stack, [session.state.head], feats=session.feats.float())[0]
    grid = [session.state.grid[-1]]
    spacing = grid_spacing(q.geom, adapter.size)
    reach = C.reach_mm(before, spacing)
    out = {}
    for m in REACHES:
        near = C.near_clicks(grid, before.shape, spacing, reach * m)
        wrong = [int(((prob >= t) != ref)[near].sum()) for t in THRESHOLDS]
        out[m] = {
            "before": int((before != ref)[near].sum()),
            "copy": wrong[THRESHOLDS.index(0.5)],
            "best_threshold": min(wrong),
        }
    return pred, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", required=True)
    ap.add_argument("--labels", required=True, help='JSON {"name": label value}')
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    adapter = SegAdapter(load_model(None, torch.device("cpu")), torch.device("cpu"), steps=DEFAULT_ADAPT_STEPS)
    data = load_eval_studies(a.studies, adapter.size)
    rows = []
    for name, v in json.loads(a.labels).items():
        pool = [s for s in data if (s.ref == v).any()]
        total = {m: {"before": 0, "copy": 0, "best_threshold": 0} for m in REACHES}
        n = 0
        for r in range(a.repeats):  # the splits of `evaluate clicks` with the same seed
            order = random.Random(f"{a.seed}-{v}-{r}").sample(pool, len(pool))
            own, head, saved = served_version(adapter, order[: a.shots], v)
            for q in order[a.shots : a.shots + a.queries]:
                ref, grid_ref = q.ref == v, q.lstack == v
                session = MetaClicks(own, q, head, saved)
                pred = session.first()
                for _ in range(a.clicks):
                    click = C.next_click(pred, ref, spacing_zyx(q))
                    if click is None:
                        break
                    pred, near_counts = click_and_count(session, click, grid_ref)
                    for m, counts in near_counts.items():
                        for key, value in counts.items():
                            total[m][key] += value
                    n += 1
        for m, counts in total.items():
            fixed = {k: round(1 - counts[k] / max(counts["before"], 1), 3) for k in ("copy", "best_threshold")}
            rows.append({"structure": name, "reach_x": m, "clicks": n, **counts, "share_fixed": fixed})
            before, copy, best = counts["before"], counts["copy"], counts["best_threshold"]
            print(f"{name:>14} reach x{m}: wrong {before} -> copy {copy}, best threshold {best}")
    settings = vars(a) | {"out": str(a.out), "model": "shipped"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": settings, "rows": rows, "provenance": stamp([SHIPPED_SEG])}, indent=1))
    names = list(dict.fromkeys(r["structure"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["structure"] == name]
        for key in ("copy", "best_threshold"):
            ax.plot([r["reach_x"] for r in rs], [r["share_fixed"][key] for r in rs], "o-", label=key)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("reach, multiple of the app's")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of the wrong voxels near the click fixed")
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
