"""Classifier site adaptation on a modality meta-training never saw: does continued meta-training on a
site's unlabelled images (UMTRA tasks, the KL prior on the starting weights) lift few-shot AUC, and
does the guard take only better encoders?

1. Meta-train the classifier **without PneumoniaMNIST** (the leave-one-dataset-out recipe of
   `benchmarks/fewshot_cls.py`: regions and self-supervised tasks of the cardiac MRI, the
   TotalSegmentator CT/MR and the brain sample studies), unless `--model` names one.
2. For each seed, site-adapt it (`core.cls_site_adaptation`, what `metaapp adapt-site --task cls`
   and the server's idle loop run) on PneumoniaMNIST's train **images** (`unlabelled:FILE`: its
   labels are never read) for `--site-minutes` of training; the guard compares the candidate with the
   starting weights on the self-supervised loss of held-out images (no class corrections).
3. Optionally (`--server-images N`), the same through a real `metaapp serve` on a datastore of N of
   those train images as PNG files: the idle loop trains, checks and swaps or keeps.
4. Few-shot AUC on PneumoniaMNIST's test split (k examples per class from the train split, the 624
   test images classified, the same supports before and after) for the starting weights and every
   candidate, whatever the guard decided, so the guard's decisions can be judged.

    python benchmarks/cls_site_adaptation.py [--seeds 0,1,2,3] [--site-minutes 2] [--model W]
        [--metatrain-steps 1200] [--server-images 300] [--repeats 20]

Needs ../shared/datasets; writes benchmarks/results/cls_site_adaptation.json + .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch

from monailabel_metaapp.core.checkpoint import save_json, save_model, sidecar
from monailabel_metaapp.core.cls_metatrain import UNLABELLED_PREFIX, meta_train_cls
from monailabel_metaapp.core.cls_model import ClsModelConfig
from monailabel_metaapp.core.cls_site_adaptation import ClsSiteAdaptation, ClsSiteConfig
from monailabel_metaapp.core.metatrain import MetaTrainConfig
from monailabel_metaapp.core.site_adaptation import adapt_site
from monailabel_metaapp.evaluate_cls import evaluate_cls
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.samples import build_samples
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets, totalseg_view


def metatrain_strict(work: Path, steps: int, minutes: float) -> tuple[Path, dict]:
    """The leave-one-dataset-out classifier (no PneumoniaMNIST at all), as `fewshot_cls.py` makes it.

    Args:
        work: scratch folder.
        steps: outer steps.
        minutes: time budget (the steps usually end it first).
    """
    src = work / "sources"
    sources = [cmr_view(src / "cmr"), totalseg_view(src / "totalseg")]
    build_samples(src / "brain", seed=0)
    sources.append(src / "brain")
    cfg = MetaTrainConfig(minutes=minutes, max_steps=steps, tasks_per_step=8, ssl_fraction=0.5, seed=0)
    out = work / "strict.pt"
    summary = meta_train_cls(sources, out, cfg, ClsModelConfig(), n_way=2, k_shot=5, device="cpu", fresh=True)
    shutil.rmtree(src, ignore_errors=True)
    return out, summary


def auc_rows(npz: Path, model: Path, shots: list[int], repeats: int) -> dict[int, dict]:
    """k -> the product's test AUC row (mean and spread over the supports).

    Args:
        npz: PneumoniaMNIST.
        model: the classifier.
        shots: the k values.
        repeats: supports per k (the same for every model: seeded by the repeat).
    """
    res = evaluate_cls(npz, model, shots, repeats, baselines=[], device="cpu", progress=False)
    return {r["shots"]: r for r in res["rows"] if r["method"] == "meta"}


def server_run(npz: Path, base: Path, work: Path, n_images: int, minutes: float) -> tuple[Path, dict]:
    """The idle loop of a real `metaapp serve` on n_images PneumoniaMNIST train images as PNG files (no
    class corrections): train `minutes`, one check at the end. Returns (candidate weights, the loop's
    record). The candidate is read from the loop's training state whatever the guard decided.

    Args:
        npz: PneumoniaMNIST.
        base: the starting classifier (conf `cls_model`).
        work: scratch folder.
        n_images: how many train images the datastore holds.
        minutes: conf `site_adapt_minutes` and `site_check_minutes`.
    """
    import SimpleITK as sitk

    from monailabel_metaapp.devserver import Server

    store = work / "xray_store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    with np.load(npz) as z:
        images = z["train_images"]  # labels are not read
    for i in np.random.default_rng(0).choice(len(images), n_images, replace=False):
        sitk.WriteImage(sitk.GetImageFromArray(images[i]), str(store / f"train_{i:04d}.png"))
    conf = {
        "cls_model": str(base),
        "device": "cpu",
        "site_adapt": "true",
        "site_adapt_seg": "false",
        "site_adapt_minutes": str(minutes),
        "site_check_minutes": str(minutes),
        "refine": "false",
    }
    server = Server(store, work / "server.log", conf).start()
    t0 = time.time()
    try:
        while True:
            st = requests.get(f"{server.url}/info/", timeout=30).json()["metaapp"]["fewshot_cls"]["site_adaptation"]
            if st["last_check"] is not None and st["state"] == "idle" or st.get("error"):
                break
            if time.time() - t0 > minutes * 60 * 4 + 600:
                raise TimeoutError(f"the idle loop did not finish: {st}")
            time.sleep(2)
    finally:
        server.stop()
    site = store / ".metaapp" / "site"
    record = json.loads((site / "cls.json").read_text())
    state = torch.load(site / "cls_state.pt", map_location="cpu", weights_only=True)
    model = ClsSiteAdaptation.load(base)
    model.load_state_dict(state["model"])
    out = work / "server_candidate.pt"
    save_model(model, out, {"site_adaptation": {"server": True, "steps": state["steps"]}})
    record["wall_minutes"] = round((time.time() - t0) / 60, 1)
    return out, record


def labelled_guard(npz: Path, base: Path, candidate: Path, work: Path, per_class: int, draws: int) -> list[dict]:
    """The guard a site with class corrections gets: `per_class` train images per class as corrections
    (their PneumoniaMNIST labels, drawn anew per draw), the leave-one-out AUC of heads adapted on the
    candidate against the starting weights. Returns each draw's check record.

    Args:
        npz: PneumoniaMNIST.
        base: the starting classifier.
        candidate: the site-adapted one.
        work: scratch folder.
        per_class: corrections per class.
        draws: how many sets of corrections.
    """
    from monailabel_metaapp.core.cls_data import load_medmnist
    from monailabel_metaapp.core.cls_site_adaptation import ClsExample, ClsSiteData
    from monailabel_metaapp.evaluate_cls import support_indices

    live, cand = ClsSiteAdaptation.load(base), ClsSiteAdaptation.load(candidate)
    train = load_medmnist(npz, "train", live.cfg.size, live.cfg.image_crop)
    out = []
    for draw in range(draws):
        idx = support_indices(train.labels, per_class, np.random.default_rng(10_000 + draw))
        examples = [ClsExample("image", f"x{i}", train.images[i], str(int(train.labels[i]))) for i in idx]
        data = ClsSiteData({e.image: e.views for e in examples}, examples)
        site = ClsSiteAdaptation(data, base, work / "guard_state.pt", ClsSiteConfig(), "cpu", fresh=True)
        out.append(site.check(cand, live))
    return out


def plot(result: dict, path: Path) -> None:
    """Per run, the 5-shot test AUC before and after, with the guard's decision.

    Args:
        result: the results.
        path: the PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    k = result["settings"]["report_shots"]
    before = result["before"][str(k)]["auc_mean"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["name"] for r in runs]
    after = [r["auc"][str(k)]["auc_mean"] for r in runs]
    err = [r["auc"][str(k)]["auc_std"] for r in runs]
    colours = ["tab:green" if r["verdict_better"] else "tab:grey" for r in runs]
    ax.bar(range(len(runs)), after, yerr=err, color=colours, capsize=3)
    ax.axhline(before, color="tab:red", ls="--", label=f"before site adaptation ({before:.3f})")
    ax.set_xticks(range(len(runs)), names, rotation=20)
    lo = min([before, *after]) - 0.03
    ax.set_ylim(lo, min(1.0, max([before, *after]) + 0.03))
    ax.set_ylabel(f"{k}-shot test ROC AUC")
    ax.set_title("Classifier site adaptation on unlabelled chest X-rays\n(green: the guard judged it better)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=".cache/cls_site_bench", help="scratch folder (models, logs)")
    ap.add_argument(
        "--model", help="skip meta-training: site-adapt these weights (meta-trained without PneumoniaMNIST)"
    )
    ap.add_argument("--metatrain-steps", type=int, default=1200)
    ap.add_argument("--metatrain-minutes", type=float, default=20.0)
    ap.add_argument("--seeds", default="0,1,2,3", help="site adaptation seeds (episodes and held-out images)")
    ap.add_argument("--site-minutes", type=float, default=2.0, help="training minutes of each site adaptation")
    ap.add_argument("--server-images", type=int, default=0, help="also run the server's idle loop on N images")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corrections", type=int, default=10, help="per class, for the labelled guard's check")
    ap.add_argument("--draws", type=int, default=5, help="sets of corrections the labelled guard is checked with")
    ap.add_argument("--out", default="benchmarks/results/cls_site_adaptation.json")
    a = ap.parse_args()
    root = require_shared_datasets()
    torch.set_num_threads(a.threads)
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shots = [int(s) for s in a.shots.split(",")]
    report = 5 if 5 in shots else shots[0]
    t0 = time.time()

    if a.model:
        base, train_summary = (
            Path(a.model),
            json.loads(sidecar(a.model).read_text()) if sidecar(a.model).exists() else None,
        )
    else:
        base, train_summary = metatrain_strict(work, a.metatrain_steps, a.metatrain_minutes)
        save_json(work / "strict_summary.json", train_summary)
    before = auc_rows(npz, base, shots, a.repeats)
    print(f"before: {report}-shot AUC {before[report]['auc_mean']:.4f}", flush=True)

    runs = []
    for seed in [int(s) for s in a.seeds.split(",") if s]:
        site_out = work / f"site_seed{seed}.pt"
        cfg = ClsSiteConfig(seed=seed, swap_unlabelled=True)  # the loss's verdict is what is measured
        res = adapt_site(
            [f"{UNLABELLED_PREFIX}{npz}"],
            site_out,
            base,
            a.site_minutes,
            cfg,
            "cpu",
            progress=False,
            fresh=True,
            trainer=ClsSiteAdaptation,
        )
        candidate = site_out if res["accepted"] else Path(res["candidate"])
        runs.append(
            {
                "name": f"adapt-site seed {seed}",
                "seed": seed,
                "guard": res["check"],
                "steps": res["steps"],
                "minutes": res["minutes"],
                "auc": auc_rows(npz, candidate, shots, a.repeats),
                "path": candidate,
            }
        )
        print(json.dumps({k: runs[-1][k] for k in ("name", "guard")}), runs[-1]["auc"][report]["auc_mean"], flush=True)
    server_error = None
    if a.server_images:
        try:
            candidate, record = server_run(npz, base, work, a.server_images, a.site_minutes)
        except Exception as e:  # the offline runs are still reported
            server_error = f"{type(e).__name__}: {e}"
            print(server_error, flush=True)
    if a.server_images and server_error is None:
        check = (record.get("checks") or [{}])[-1]
        runs.append(
            {
                "name": f"server idle loop ({a.server_images} images)",
                "seed": 0,
                "guard": check,
                "steps": json.loads(sidecar(candidate).read_text())["site_adaptation"]["steps"],
                "minutes": record.get("minutes"),
                "server_record": record,
                "auc": auc_rows(npz, candidate, shots, a.repeats),
                "path": candidate,
            }
        )
        print(json.dumps({k: runs[-1][k] for k in ("name", "guard")}), runs[-1]["auc"][report]["auc_mean"], flush=True)

    for r in runs:  # the labelled guard, as a site with class corrections would check the same candidate
        checks = labelled_guard(npz, base, r.pop("path"), work, a.corrections, a.draws)
        r["labelled_guard"] = {
            "accepted": sum(c["accepted"] for c in checks),
            "draws": len(checks),
            "loo_auc_candidate_minus_live": [round(c["candidate"] - c["live"], 4) for c in checks],
        }
    for r in runs:  # the guard's verdict: better (it swaps, or holds a better candidate without labels)
        r["gain"] = {k: round(r["auc"][k]["auc_mean"] - before[k]["auc_mean"], 4) for k in shots}
        r["verdict_better"] = bool(r["guard"].get("better", r["guard"].get("accepted")))
        r["guard_right"] = r["verdict_better"] == (r["gain"][report] > 0)
    offline = [r["gain"][report] for r in runs if r["name"].startswith("adapt-site")]
    summary = {
        f"gain_{report}shot_mean": round(statistics.fmean(offline), 4) if offline else None,
        f"gain_{report}shot_std_over_seeds": round(statistics.stdev(offline), 4) if len(offline) > 1 else None,
        f"gain_{report}shot_min_max": [min(offline), max(offline)] if offline else None,
        "judged_better": sum(r["verdict_better"] for r in runs),
        "judged_better_and_worse": sum(r["verdict_better"] and r["gain"][report] <= 0 for r in runs),
        "judged_worse_and_better": sum(not r["verdict_better"] and r["gain"][report] > 0 for r in runs),
        "swapped": sum(bool(r["guard"].get("accepted")) for r in runs),
        "labelled_guard_accepted": sum(r["labelled_guard"]["accepted"] for r in runs),
        "labelled_guard_checks": sum(r["labelled_guard"]["draws"] for r in runs),
        "runs": len(runs),
    }
    result = {
        "question": "Does site adaptation of the classifier on a site's unlabelled images lift few-shot AUC on a "
        "modality meta-training never saw, and does the guard take only better encoders?",
        "settings": {
            "target": "PneumoniaMNIST (chest X-ray, normal vs pneumonia): never in meta-training",
            "site_images": "PneumoniaMNIST train images, unlabelled (unlabelled:FILE; labels never read)",
            "site_minutes": a.site_minutes,
            "site_config": ClsSiteConfig().__dict__,
            "shots": shots,
            "report_shots": report,
            "repeats": a.repeats,
            "evaluation": "k examples per class from the train split, the 624 test images classified; the same "
            "supports for every model",
            "guard": "self-supervised loss of fixed UMTRA tasks on the held-out 1/8 of the site's images, "
            "candidate against the starting weights, margin 0",
            "labelled_guard": f"{a.corrections} train images per class as class corrections, {a.draws} draws: "
            "leave-one-out AUC of the head on the candidate against the starting weights, margin 0",
            "threads": a.threads,
        },
        "base_model": {"path": str(base), "meta_train": train_summary},
        "before": {str(k): v for k, v in before.items()},
        "runs": [
            {**r, "auc": {str(k): v for k, v in r["auc"].items()}, "gain": {str(k): v for k, v in r["gain"].items()}}
            for r in runs
        ],
        "summary": summary,
        **({"server_error": server_error} if server_error else {}),
        "minutes": round((time.time() - t0) / 60, 1),
        "command": "python " + " ".join(sys.argv),
        "provenance": stamp([base]),
    }
    out.write_text(json.dumps(result, indent=2, default=str))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
