"""Leave-one-structure-out few-shot segmentation on real cardiac MRI (MS-CMRSeg bSSFP).

For each cardiac structure, the model meta-trained WITHOUT it (and without the test studies) is
evaluated on the 10 held-out studies (cmr 26-35): whole-volume protocol with the baselines
(scratch / finetune / proto) in the same run, the SSL-ALPNet oracle protocol, and the ablations
(no KL term, fixed inner-loop rates) on the LV blood-pool fold.

    python benchmarks/fewshot_seg.py --models DIR [--repeats 2] [--queries 5] [--shots 1,3,5]
        [--baselines scratch,finetune,proto] [--folds 200,500,600]

DIR holds fold200.pt, fold500.pt, fold600.pt, fold500_nokl.pt, fold500_fixedlr.pt (made by
benchmarks/gpu_run.sh). Writes benchmarks/results/fewshot_seg.json + .png."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from monailabel_metaapp.evaluate import evaluate_seg, plot_rows
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view, require_shared_datasets

TEST_IDS = list(range(26, 36))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", required=True)
    ap.add_argument("--shots", default="1,3,5")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--scratch-seconds", type=float, default=150.0)
    ap.add_argument("--baselines", default="scratch,finetune,proto", help="whole-volume baselines, comma-separated")
    ap.add_argument("--folds", default="200,500,600", help="held-out label values whose fold models are scored")
    ap.add_argument("--out", default="benchmarks/results/fewshot_seg.json")
    a = ap.parse_args()
    require_shared_datasets()
    models = Path(a.models)
    shots = [int(s) for s in a.shots.split(",")]
    store = cmr_view(Path(tempfile.mkdtemp()) / "cmr_test", TEST_IDS)
    rows, runs = [], []
    t0 = time.time()

    def run(tag: str, model: Path, name: str, value: int, **kw) -> None:
        res = evaluate_seg(store, shots, {name: value}, str(model), a.repeats, a.queries, seed=0, **kw)
        for r in res["rows"]:
            r.update(fold=tag, protocol=kw.get("protocol", "volume"))
            if tag.endswith(("_nokl", "_fixedlr")):
                r["method"] = f"meta{tag[len('fold500') :]}"
        rows.extend(res["rows"])
        runs.append({"fold": tag, "structure": name, **res["settings"]})

    folds = {int(v) for v in a.folds.split(",")}
    for name, value in CMR_STRUCTURES.items():
        if value not in folds:
            continue
        fold = models / f"fold{value}.pt"
        run(
            f"fold{value}",
            fold,
            name,
            value,
            baselines=[b for b in a.baselines.split(",") if b],
            scratch_seconds=a.scratch_seconds,
        )
        run(f"fold{value}", fold, name, value, baselines=["proto"], protocol="oracle")
    scored = [models / f"fold{v}.pt" for v in sorted(folds)]
    for tag in ("fold500_nokl", "fold500_fixedlr"):
        if 500 in folds and (models / f"{tag}.pt").exists():
            scored.append(models / f"{tag}.pt")
            run(tag, models / f"{tag}.pt", "lv blood pool", 500, baselines=[])
            run(tag, models / f"{tag}.pt", "lv blood pool", 500, baselines=[], protocol="oracle")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/fewshot_seg.py "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
                "test_studies": TEST_IDS,
                "minutes": round((time.time() - t0) / 60, 1),
                "runs": runs,
                "rows": rows,
                "provenance": stamp(scored),
            },
            indent=2,
        )
    )
    vol = [r for r in rows if r["protocol"] == "volume"]
    plot_rows(vol, out.with_suffix(".png"), "held-out structure, whole-volume Dice (cmr 26-35)")
    plot_rows(
        [r for r in rows if r["protocol"] == "oracle"],
        out.with_name(out.stem + "_oracle.png"),
        "held-out structure, SSL-ALPNet oracle protocol",
    )
    for r in sorted(rows, key=lambda r: (r["structure"], r["protocol"], r["shots"], r["method"])):
        print(
            f"{r['structure']:>14} {r['protocol']:>6} k={r['shots']} {r['method']:>13}: "
            f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f} (n={r['n']}, {r['adapt_seconds']} s)"
        )


if __name__ == "__main__":
    main()
