"""The refinement timeline on held-out structures: for each cardiac structure, the model meta-trained
without it serves the quick head and then guarded refinement, beside `finetune` and `scratch` given
the same seconds (`metaapp evaluate seg --timeline`), on the 10 held-out studies (cmr 26-35).

The folds run side by side, one torch thread each (each method's clock counts its own compute, so
sharing the cores does not favour one). A fold whose JSON is already in --out is not run again.
Then every fold's rows are combined into all.json + all.png (one panel per k, mean over structures);
all.json's `targets` lists where the served model is behind scratch at a mark >= 10 s and its mean at
150 s against scratch's + 0.03, and the table of the docs is printed.

    python benchmarks/refine_timeline_folds.py --models DIR [--shots 1,3,5] [--marks 2,10,30,60,150]
        [--queries 4] [--out benchmarks/results/refine_timeline_loso]
    python benchmarks/refine_timeline_folds.py --combine A.json B.json ... --out DIR [--title T]

DIR holds fold200.pt, fold500.pt, fold600.pt (`metaapp meta-train ... --exclude V`). With --combine,
the rows of later files replace those of earlier ones for the same structure and k.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from monailabel_metaapp.evaluate_timeline import plot_timeline
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view, require_shared_datasets

TEST_IDS = list(range(26, 36))
OUT = Path(__file__).resolve().parent / "results" / "refine_timeline_loso"
TITLE = "held-out structures: served Dice after a save (cmr 26-35)"


def run_folds(models: Path, shots: str, marks: str, queries: int, out: Path) -> list[Path]:
    """Each fold's timeline as its own process, side by side; returns the fold JSONs."""
    store = cmr_view(Path(tempfile.mkdtemp()) / "cmr_test", TEST_IDS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, files = [], []
    for name, value in CMR_STRUCTURES.items():
        target = out / f"fold{value}.json"
        files.append(target)
        if target.exists():
            continue
        cmd = [sys.executable, "-m", "monailabel_metaapp", "evaluate", "seg", "--studies", str(store)]
        cmd += ["--timeline", marks, "--shots", shots, "--repeats", "1", "--queries", str(queries)]
        cmd += ["--model", str(models / f"fold{value}.pt"), "--labels", json.dumps({name: value})]
        cmd += ["--device", "cpu", "--out", str(target)]
        procs.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() for p in procs):
        raise SystemExit("a fold's timeline failed (see its output above)")
    return files


def combine(files: list[Path], out: Path, title: str = TITLE) -> Path:
    """all.json + all.png from fold JSONs; a later file's rows replace an earlier one's for the same
    structure and k."""
    rows: dict[tuple, list[dict]] = {}
    guard: dict[tuple, dict] = {}
    sources = []
    for f in files:
        d = json.loads(Path(f).read_text())
        keys = {(r["structure"], r["shots"]) for r in d["rows"]}
        for key in keys:
            rows[key] = [r | {"source": Path(f).name} for r in d["rows"] if (r["structure"], r["shots"]) == key]
        for g in d.get("guard", []):
            guard[(g["structure"], g["shots"])] = g
        sources.append({"file": str(f), "settings": d["settings"], "provenance": d["provenance"]})
    flat = [r for key in sorted(rows) for r in rows[key]]
    result = {
        "rows": flat,
        "targets": targets(flat),
        "guard": [guard[k] for k in sorted(guard)],
        "sources": sources,
        "provenance": stamp([w for s in sources for w in s["provenance"]["weights"]]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "all.json").write_text(json.dumps(result, indent=1))
    plot_timeline(result["rows"], out / "all.png", title)
    return out / "all.json"


def targets(rows: list[dict], floor: float = 10.0, last: float = 150.0, margin: float = 0.03) -> dict:
    """What the served model (`meta`) must do against `scratch` given the same seconds: every
    (structure, k, mark >= floor) where it is behind, and the mean at `last` over structures and k
    against scratch's plus `margin`."""
    dice = {(r["structure"], r["shots"], r["method"], r["seconds"]): r["dice_mean"] for r in rows}
    behind = [
        {"structure": s, "shots": k, "seconds": t, "meta": d, "scratch": dice[(s, k, "scratch", t)]}
        for (s, k, m, t), d in sorted(dice.items())
        if m == "meta" and t >= floor and (s, k, "scratch", t) in dice and d < dice[(s, k, "scratch", t)]
    ]
    at_last = [(d, dice[(s, k, "scratch", t)]) for (s, k, m, t), d in dice.items() if m == "meta" and t == last]
    meta = statistics.fmean(a for a, _ in at_last) if at_last else None
    scratch = statistics.fmean(b for _, b in at_last) if at_last else None
    return {
        "behind_scratch": behind,
        f"mean_{last:g}s": {"meta": meta, "scratch": scratch, "margin": margin},
        "met": not behind and meta is not None and meta >= scratch + margin,
    }


def markdown(rows: list[dict]) -> str:
    """The rows as the docs' table: one line per k, structure and method, one column per mark."""
    marks = sorted({r["seconds"] for r in rows})
    order = {"meta": 0, "candidate": 1, "finetune": 2, "scratch": 3}
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["shots"], r["structure"], order.get(r["method"], 9), r["method"]), {})[r["seconds"]] = r
    head = "| k | structure | method | " + " | ".join(f"{t:g} s" for t in marks) + " |"
    lines = [head, "|" + "---|" * (3 + len(marks))]
    for (k, s, _, m), by in sorted(cells.items()):
        name = "meta (served)" if m == "meta" else m
        lines.append(f"| {k} | {s} | {name} | " + " | ".join(f"{by[t]['dice_mean']:.2f}" for t in marks) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="folder with fold200.pt, fold500.pt, fold600.pt")
    ap.add_argument("--shots", default="1,3,5")
    ap.add_argument("--marks", default="2,10,30,60,150", help="seconds after the save")
    ap.add_argument("--queries", type=int, default=4, help="query studies per fold and k (the rest are anchors)")
    ap.add_argument("--combine", type=Path, nargs="+", help="only combine these fold JSONs")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--title", default=TITLE, help="the combined plot's title")
    a = ap.parse_args()
    if a.combine:
        files = a.combine
    elif a.models:
        require_shared_datasets()
        files = run_folds(a.models, a.shots, a.marks, a.queries, a.out)
    else:
        ap.error("give --models (run the folds) or --combine (combine fold JSONs)")
    out = combine(files, a.out, a.title)
    result = json.loads(out.read_text())
    print(markdown(result["rows"]))
    print(json.dumps(result["targets"], indent=1))
    print(out)


if __name__ == "__main__":
    main()
