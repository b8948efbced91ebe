"""Refinement settings side by side: what the app serves after each mark under arms that differ only
in their `--refine` settings (e.g. `lead=0.75` against `lead=0.5`), on the same structures, supports
and draws.

Each input is a `scratch_candidate.py --methods app --shots K --refine ...` result (draws merged with
its `--combine`, or one input per draw under the same arm name); the rows of an input run with
`--methods app,scratch` also give the arm `scratch`. Inputs are grouped by weights, structure and k.
An arm is named by the refine settings in which the inputs of one structure differ,
or by `--arms` (one name per input, in order) when the arms differ in their code instead: each input
then ran from its own checkout, and its `provenance` names the commit.
Writes `arms.json` (mean served Dice per structure, arm and mark, with each draw's values, the start
it served and each run's seconds) and `arms.png` (one panel per structure, one line per arm).

    python benchmarks/experiments/refine_arms.py --runs A_lead75.json A_lead50.json ... --out DIR
    python benchmarks/experiments/refine_arms.py --runs A_old.json A_new.json --arms before after --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from monailabel_metaapp.provenance import stamp  # noqa: E402


def arm_names(settings: list[dict]) -> list[str]:
    """Each input's arm: the refine settings in which the inputs differ ('default' when none do)."""
    shared = {k for k in settings[0] if all(s.get(k) == settings[0][k] for s in settings)}
    keys = sorted({k for s in settings for k in s} - shared)
    return [", ".join(f"{k}={s.get(k)}" for k in keys) or "default" for s in settings]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--arms", nargs="+", help="each input's arm name (default: from the refine settings)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.arms and len(a.arms) != len(a.runs):
        ap.error(f"--arms names {len(a.arms)} arms for {len(a.runs)} inputs")
    results = [json.loads(f.read_text()) for f in a.runs]
    group_of = [
        f"{Path(d['settings']['model']).stem} / {d['settings']['structure']} / k={d['settings'].get('shots', 1)}"
        for d in results
    ]
    arm_of = [""] * len(results)
    for group in set(group_of):
        members = [i for i, g in enumerate(group_of) if g == group]
        for i, name in zip(members, arm_names([results[i]["settings"]["refine"] for i in members])):
            arm_of[i] = a.arms[i] if a.arms else name
    cells: dict[tuple, list[dict]] = {}
    sources = []
    for f, d, group, arm in zip(a.runs, results, group_of, arm_of):
        sources.append({"file": f.name, "arm": arm, "settings": d["settings"], "provenance": d.get("provenance")})
        for r in (r for r in d["rows"] if r["method"] in ("app", "scratch")):  # scratch: where an input ran it
            cells.setdefault((group, arm if r["method"] == "app" else "scratch", r["seconds"]), []).append(r)
    rows = [
        {
            "group": group,
            "arm": arm,
            "seconds": mark,
            "dice_mean": sum(r["dice"] for r in rs) / len(rs),
            "by_draw": {r["draw"]: round(r["dice"], 4) for r in rs},
            "start_by_draw": {r["draw"]: r.get("start") for r in rs},
            "seconds_by_start": {r["draw"]: {k: r.get(f"seconds_{k}") for k in ("warm", "fresh")} for r in rs},
        }
        for (group, arm, mark), rs in sorted(cells.items())
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "arms.json").write_text(
        json.dumps(
            {"rows": rows, "runs": sources, "provenance": stamp(sorted({d["settings"]["model"] for d in results}))},
            indent=1,
        )
    )
    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for arm in sorted({r["arm"] for r in rows if r["group"] == group}):
            pts = [r for r in rows if r["group"] == group and r["arm"] == arm]
            ax.plot([r["seconds"] for r in pts], [r["dice_mean"] for r in pts], "o-", label=arm)
        ax.set_xscale("log")
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("seconds of compute after the save")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean query Dice served")
    fig.tight_layout()
    fig.savefig(a.out / "arms.png", dpi=120)
    plt.close(fig)
    for r in rows:
        print(f"{r['group']:>16}  {r['arm']:>24}  {r['seconds']:>5.0f} s  {r['dice_mean']:.3f}  {r['by_draw']}")


if __name__ == "__main__":
    main()
