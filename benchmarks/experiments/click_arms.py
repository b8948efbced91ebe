"""Click corrections side by side: `metaapp evaluate clicks` results of arms that differ in their code
(each run from its own checkout, whose commit its `provenance` names), on the same studies, splits
and saved labels.

Writes `arms.json` (every input's rows and NoC with its arm, and per structure, k and method the
difference of each arm from the first at every click count) and `arms.png` (Dice after each click:
one panel per structure and k, one curve per method and arm).

    python benchmarks/experiments/click_arms.py --runs before.json after.json --arms before after --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from monailabel_metaapp.evaluate_clicks import plot_clicks
from monailabel_metaapp.provenance import stamp


def differences(rows: list[dict], arms: list[str]) -> list[dict]:
    """Per structure, k, method and later arm: its Dice minus the first arm's after each click."""
    dice = {(r["structure"], r["shots"], r["method"], r["arm"], r["clicks"]): r["dice_mean"] for r in rows}
    out = []
    for structure, shots, method in sorted({(r["structure"], r["shots"], r["method"]) for r in rows}):
        base = {c: d for (s, k, m, arm, c), d in dice.items() if (s, k, m, arm) == (structure, shots, method, arms[0])}
        for arm in arms[1:]:
            diff = {c: dice[structure, shots, method, arm, c] - d for c, d in sorted(base.items()) if c > 0}
            out.append(
                {
                    "structure": structure,
                    "shots": shots,
                    "method": method,
                    "arm": arm,
                    "against": arms[0],
                    "dice_diff": {str(c): round(v, 4) for c, v in diff.items()},
                    "mean_diff": round(statistics.fmean(diff.values()), 4),
                    "clicks_not_lower": sum(v >= 0 for v in diff.values()),
                    "clicks": len(diff),
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--arms", nargs="+", required=True, help="each input's arm name, in order")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if len(a.arms) != len(a.runs):
        ap.error(f"--arms names {len(a.arms)} arms for {len(a.runs)} inputs")
    results = [json.loads(f.read_text()) for f in a.runs]
    rows = [r | {"arm": arm} for d, arm in zip(results, a.arms) for r in d["rows"]]
    noc = [n | {"arm": arm} for d, arm in zip(results, a.arms) for n in d["noc"]]
    arms = list(dict.fromkeys(a.arms))
    out = {
        "arms": arms,
        "rows": rows,
        "noc": noc,
        "differences": differences(rows, arms),
        "sources": [
            {"file": f.name, "arm": arm, "settings": d["settings"], "provenance": d.get("provenance")}
            for f, d, arm in zip(a.runs, results, a.arms)
        ],
        "provenance": stamp([]),
    }
    # the weights every arm ran with, from the inputs' own provenance
    out["provenance"]["weights"] = {
        path: sha for d in results for path, sha in ((d.get("provenance") or {}).get("weights") or {}).items()
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "arms.json").write_text(json.dumps(out, indent=1))
    shots = sorted({r["shots"] for r in rows})
    plot_clicks(
        {"rows": [r | {"method": f"{r['method']} ({r['arm']})"} for r in rows], "settings": {"shots": shots}},
        a.out / "arms.png",
    )
    for d in out["differences"]:
        print(
            f"{d['structure']:>14} k={d['shots']} {d['method']:>8} {d['arm']} - {d['against']}: "
            f"mean {d['mean_diff']:+.3f}, not lower after {d['clicks_not_lower']}/{d['clicks']} click counts"
        )


if __name__ == "__main__":
    main()
