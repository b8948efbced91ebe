"""With two starts, should the seconds follow the guard's ranking? What the app serves after each mark
when the run ahead on the held-out study gets `lead` of the seconds, set beside equal shares
(`lead=0.5`), on the same structures, supports and draws.

Each input is a `scratch_candidate.py --methods app --shots 3 --refine lead=L` result (draws merged with
its `--combine`); the inputs differ only in L. Writes `seconds_split.json` (mean served Dice per
structure, lead and mark, with each draw's values and each run's seconds) and `seconds_split.png`.

    python benchmarks/experiments/seconds_split.py --runs A_lead75.json A_lead50.json ... --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from monailabel_metaapp.provenance import stamp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cells: dict[tuple, list[dict]] = {}
    sources = []
    for f in a.runs:
        d = json.loads(f.read_text())
        s = d["settings"]
        lead, group = s["refine"]["lead"], f"{Path(s['model']).stem} / {s['structure']}"
        sources.append({"file": f.name, "lead": lead, "settings": s, "provenance": d.get("provenance")})
        for r in (r for r in d["rows"] if r["method"] == "app"):
            cells.setdefault((group, lead, r["seconds"]), []).append(r)
    rows = [
        {
            "group": group,
            "lead": lead,
            "seconds": mark,
            "dice_mean": sum(r["dice"] for r in rs) / len(rs),
            "by_draw": {r["draw"]: round(r["dice"], 4) for r in rs},
            "seconds_by_start": {r["draw"]: {k: r.get(f"seconds_{k}") for k in ("warm", "fresh")} for r in rs},
        }
        for (group, lead, mark), rs in sorted(cells.items())
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "seconds_split.json").write_text(
        json.dumps({"rows": rows, "runs": sources, "provenance": stamp()}, indent=1)
    )
    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for lead in sorted({r["lead"] for r in rows if r["group"] == group}, reverse=True):
            pts = [r for r in rows if r["group"] == group and r["lead"] == lead]
            label = "equal shares" if lead == 0.5 else f"leader gets {lead:.0%}"
            ax.plot([r["seconds"] for r in pts], [r["dice_mean"] for r in pts], "o-", label=label)
        ax.set_xscale("log")
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("seconds of compute after the save")
    axes[0][0].set_ylabel("mean query Dice served")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out / "seconds_split.png", dpi=120)
    plt.close(fig)
    for r in rows:
        print(f"{r['group']:>16}  lead {r['lead']:.2f}  {r['seconds']:>5.0f} s  {r['dice_mean']:.3f}  {r['by_draw']}")


if __name__ == "__main__":
    main()
