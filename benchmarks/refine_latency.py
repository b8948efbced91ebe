"""With structure refinement (or site adaptation, `--background site`) running in the background, do the
requests an annotator waits for stay fast?

Targets on a 2-core CPU: a label-save reply under 200 ms; inference on another study within 1.3x of
its time with background learning paused; Next Sample under 100 ms.

Setup: real cardiac MRI (MS-CMRSeg bSSFP studies 26-35 from ../shared/datasets), two of them (26, 27)
with final labels of all three structures, as a writable datastore. The real `metaapp serve` runs
twice from this script, each on its own copy of that datastore: first with refinement off (the
baseline), then with refinement on and a budget it never spends. The baseline server is stopped
before the refinement server starts, so the refinement's background compute cannot slow the
baseline. On the refinement server, measurements start once a structure's refinement reports
`refining` in /info/. Each repeat, through the real REST API (MONAI Label's Python client):
Next Sample (POST /activelearning/uncertainty), inference of `fewshot_seg` on an unlabelled study
(33, 34, 35 in turn; each queried once beforehand, so its embeddings are cached as in use), and a
label save (the lv blood pool of study 28). After the save, the script waits for the quick head to
be live again, the active-learning scores to be fresh, and (refinement on) a structure to be
refining again, before the next repeat. On the refinement server each repeat first measures Next
Sample and the inference with background learning paused (`POST /metaapp/background/pause`, then a
wait for the step in progress to end), resumes it, and measures again while it runs: the same
server, the same live versions and cached embeddings, side by side. Medians and p95 of each request
kind, ratios refining/paused and refining/refinement-off, and whether each target holds.

With `--background site` the second server runs idle-time site adaptation of the segmentation encoder
instead (refinement off, no check during the measurement): measurements start once it reports
`training`, and each repeat compares paused with training the same way.

    nice -n 5 python benchmarks/refine_latency.py --repeats 5 [--out benchmarks/results/refine_latency.json]
    nice -n 5 python benchmarks/refine_latency.py --background site --repeats 6 \
        --out benchmarks/results/site_latency.json

Needs ../shared/datasets (real data); writes JSON + PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from monailabel.client import MONAILabelClient
from tqdm import tqdm

from monailabel_metaapp.devserver import Server
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp
from monailabel_metaapp.shared_data import one_structure_label, require_shared_datasets, writable_cmr_store

STUDIES = list(range(26, 36))
LABELLED = (26, 27)
SAVE_STUDY = 28
INFER_STUDIES = (33, 34, 35)
STRUCTURE, VALUE = "lv blood pool", 500
STRATEGY = "uncertainty"
TARGETS = {"save_reply_s": 0.2, "infer_ratio": 1.3, "next_sample_s": 0.1}
CONFS = {
    "baseline": {"refine": "false", "site_adapt": "false"},
    "refine": {"refine": "true", "refine_budget_seconds": "100000", "site_adapt": "false"},
    # site adaptation of the segmentation encoder only, with no check against the live one while measured
    "site": {"refine": "false", "site_adapt": "true", "site_adapt_cls": "false", "site_check_minutes": "100000"},
}
TRAINING = {"refine": "refining", "site": "training"}  # the state the background learner reports meanwhile
LEARNER = {"refine": "refinement", "site": "site adaptation"}
KINDS = ("save_reply_s", "infer_s", "next_sample_s")
PAUSED_KINDS = ("infer_s", "next_sample_s")  # a save restarts refinement, so it is measured running only


def build_store(out: Path) -> Path:
    return writable_cmr_store(out, STUDIES, LABELLED)


def refinement_states(server: Server) -> dict[str, dict]:
    return {n: s.get("refinement") or {} for n, s in server.structures().items()}


def refining(server: Server) -> list[str]:
    return sorted(n for n, r in refinement_states(server).items() if r.get("state") == "refining")


def site_state(server: Server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()["metaapp"]["fewshot_seg"]["site_adaptation"]


def learning(server: Server, mode: str) -> list[str]:
    """What is training in the background now: refining structures, or ["site"] once site adaptation
    takes steps (it reports `training` while it reads the datastore too)."""
    if mode == "site":
        st = site_state(server)
        return ["site"] if st["state"] == "training" and (st.get("steps") or 0) > 0 else []
    return refining(server)


def learner_steps(server: Server, mode: str) -> int:
    if mode == "site":
        return int(site_state(server).get("steps") or 0)
    return sum(s.get("steps", 0) for s in refinement_states(server).values())


def wait_refining(server: Server, timeout: float, mode: str = "refine") -> tuple[list[str], float]:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        names = learning(server, mode)
        if names:
            return names, time.perf_counter() - t0
        time.sleep(0.5)
    now = site_state(server) if mode == "site" else refinement_states(server)
    raise TimeoutError(f"nothing {TRAINING[mode]} after {timeout} s: {now}\n{server.log_tail()}")


def settle(server: Server, mode: str | None) -> dict:
    """After a save: quick head live, scores fresh, and (background learning on) the learner training."""
    t0 = time.perf_counter()
    server.wait_ready(poll=0.2)
    fresh = True
    try:
        server.wait_scores(timeout=180)
    except TimeoutError:
        fresh = False
    out = {"settle_s": time.perf_counter() - t0, "scores_fresh": fresh}
    if mode:
        out["refining"], _ = wait_refining(server, 300, mode)
    return out


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "p95": float(np.percentile(xs, 95)), "values": xs}


def measure(name: str, store: Path, label: Path, repeats: int, root: Path) -> dict:
    mode = None if name == "baseline" else name  # the background learner measured against the baseline
    server = Server(store, root / f"{name}.log", CONFS[name])
    t_start = time.perf_counter()
    try:
        server.start(timeout=300)
        server.wait_ready(timeout=600, lv_blood_pool=1)
        try:
            server.wait_scores(timeout=300)
        except TimeoutError:
            pass
        client = MONAILabelClient(server.url, tmpdir=tempfile.mkdtemp(dir=root))
        for i in INFER_STUDIES:  # warm: each query's embeddings cached, as after the first look in use
            client.infer("fewshot_seg", f"cmr_{i:02d}", {})
        waited = None
        if mode:
            _, waited = wait_refining(server, 600, mode)
        before = refinement_states(server)
        ready_s = time.perf_counter() - t_start
        rows: dict[str, list] = {k: [] for k in KINDS}
        paused: dict[str, list] = {k: [] for k in PAUSED_KINDS}
        during: list[dict] = []
        for r in tqdm(range(repeats), desc=name, unit="repeat"):
            query = f"cmr_{INFER_STUDIES[r % len(INFER_STUDIES)]:02d}"
            if mode:
                measure_paused(server, client, query, paused, mode)
            t = time.perf_counter()
            resp = requests.post(f"{server.url}/activelearning/{STRATEGY}", json={"client_id": "bench"}, timeout=60)
            rows["next_sample_s"].append(time.perf_counter() - t)
            resp.raise_for_status()
            after_ns = learning(server, mode) if mode else []

            t = time.perf_counter()
            client.infer("fewshot_seg", query, {})
            rows["infer_s"].append(time.perf_counter() - t)
            after_infer = learning(server, mode) if mode else []

            t = time.perf_counter()
            client.save_label(
                f"cmr_{SAVE_STUDY:02d}", str(label), params={"label_info": [{"name": STRUCTURE, "idx": 1}]}
            )
            rows["save_reply_s"].append(time.perf_counter() - t)
            after_save = learning(server, mode) if mode else []
            during.append(
                {
                    "query": query,
                    "refining_after_next_sample": after_ns,
                    "refining_after_infer": after_infer,
                    "refining_after_save": after_save,
                    **settle(server, mode),
                }
            )
        return {
            "conf": CONFS[name],
            "start_to_measuring_s": ready_s,
            "waited_for_refining_s": waited,
            "refinement_before": before,
            "refinement_after": refinement_states(server),
            **({"site_after": site_state(server)} if mode == "site" else {}),
            "repeats": during,
            **{k: stats(v) for k, v in rows.items()},
            **({"paused": {k: stats(v) for k, v in paused.items()}} if mode else {}),
        }
    finally:
        server.stop()


def measure_paused(server: Server, client: MONAILabelClient, query: str, out: dict[str, list], mode: str) -> None:
    """Next Sample and an inference with background learning paused, then resume it and wait until
    the learner's steps run again."""
    requests.post(f"{server.url}/metaapp/background/pause", timeout=30).raise_for_status()
    t0 = time.perf_counter()
    running = "site_step_running" if mode == "site" else "refinement_step_running"
    while requests.get(f"{server.url}/metaapp/background", timeout=30).json()[running]:
        if time.perf_counter() - t0 > 120:
            raise TimeoutError("the background step in progress did not end")
        time.sleep(0.1)
    time.sleep(0.5)
    t = time.perf_counter()
    requests.post(f"{server.url}/activelearning/{STRATEGY}", json={"client_id": "bench"}, timeout=60).raise_for_status()
    out["next_sample_s"].append(time.perf_counter() - t)
    t = time.perf_counter()
    client.infer("fewshot_seg", query, {})
    out["infer_s"].append(time.perf_counter() - t)
    requests.post(f"{server.url}/metaapp/background/resume", timeout=30).raise_for_status()
    steps = learner_steps(server, mode)
    t0 = time.perf_counter()
    while learner_steps(server, mode) <= steps:
        if time.perf_counter() - t0 > 120:
            raise TimeoutError("background learning did not go on after resume")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--background", choices=["refine", "site"], default="refine", help="the background learner")
    ap.add_argument("--out", default="benchmarks/results/refine_latency.json")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    a = ap.parse_args()
    shared = require_shared_datasets()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="refine_latency_"))
    src = shared / "cmr_bssfp" / f"label_{SAVE_STUDY}.nii.gz"
    label = one_structure_label(src, VALUE, root / f"label_{SAVE_STUDY}.nii.gz")
    t0 = time.perf_counter()
    m = a.background
    res = {name: measure(name, build_store(root / name / "cmr"), label, a.repeats, root) for name in ("baseline", m)}
    base, ref = res["baseline"], res[m]
    rows = {
        k: {
            "baseline_median_s": base[k]["median"],
            "baseline_p95_s": base[k]["p95"],
            f"{m}_median_s": ref[k]["median"],
            f"{m}_p95_s": ref[k]["p95"],
            "ratio_median": ref[k]["median"] / base[k]["median"],
            "ratio_p95": ref[k]["p95"] / base[k]["p95"],
        }
        for k in KINDS
    }
    for k in PAUSED_KINDS:
        p = ref["paused"][k]
        rows[k].update(
            paused_median_s=p["median"],
            paused_p95_s=p["p95"],
            ratio_to_paused_median=ref[k]["median"] / p["median"],
            ratio_to_paused_p95=ref[k]["p95"] / p["p95"],
        )
    targets = {
        "save_reply_under_0.2_s": {
            "median": rows["save_reply_s"][f"{m}_median_s"] < TARGETS["save_reply_s"],
            "p95": rows["save_reply_s"][f"{m}_p95_s"] < TARGETS["save_reply_s"],
        },
        f"infer_within_1.3x_of_{LEARNER[m].replace(' ', '_')}_paused": {
            "median": rows["infer_s"]["ratio_to_paused_median"] <= TARGETS["infer_ratio"],
            "p95": rows["infer_s"]["ratio_to_paused_p95"] <= TARGETS["infer_ratio"],
        },
        "next_sample_under_0.1_s": {
            "median": rows["next_sample_s"][f"{m}_median_s"] < TARGETS["next_sample_s"],
            "p95": rows["next_sample_s"][f"{m}_p95_s"] < TARGETS["next_sample_s"],
        },
    }
    result = {
        "question": f"with {LEARNER[m]} running on a 2-core CPU, do the requests an annotator waits for stay fast?",
        "settings": {
            "studies": [f"cmr_{i:02d}" for i in STUDIES],
            "labelled": [f"cmr_{i:02d}" for i in LABELLED],
            "save": {"image": f"cmr_{SAVE_STUDY:02d}", "structure": STRUCTURE, "label_value_in_source": VALUE},
            "infer_on": [f"cmr_{i:02d}" for i in INFER_STUDIES],
            "next_sample": {"strategy": STRATEGY, "call": f"POST /activelearning/{STRATEGY}"},
            "repeats": a.repeats,
            "order": f"baseline server first (measured, then stopped), then the {LEARNER[m]} server; never both "
            f"running at once; on the {LEARNER[m]} server each repeat measures paused, then {TRAINING[m]}",
            "background": m,
            "confs": {n: CONFS[n] for n in ("baseline", m)},
            "targets": TARGETS,
            "note": a.note,
            "wall_s": time.perf_counter() - t0,
        },
        "rows": rows,
        "targets_hold": targets,
        "runs": res,
        "provenance": stamp([SHIPPED_SEG]),
    }
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"rows": rows, "targets_hold": targets}, indent=2))


def plot(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"save_reply_s": "label-save reply", "infer_s": "inference, another study", "next_sample_s": "Next Sample"}
    m = r["settings"].get("background", "refine")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, k in zip(axes, KINDS):
        row = r["rows"][k]
        names = [f"{LEARNER[m]}\noff", "paused", TRAINING[m]]
        med = [row["baseline_median_s"], row.get("paused_median_s", float("nan")), row[f"{m}_median_s"]]
        p95 = [row["baseline_p95_s"], row.get("paused_p95_s", float("nan")), row[f"{m}_p95_s"]]
        ax.bar(range(3), med, 0.6, color=["tab:gray", "tab:olive", "tab:blue"])
        ax.scatter(range(3), p95, marker="_", s=300, color="black", zorder=3, label="p95")
        if k == "infer_s":
            ax.axhline(row["paused_median_s"] * TARGETS["infer_ratio"], ls="--", color="tab:red", label="1.3x paused")
            ax.text(2, max(med[2], p95[2]) * 1.03, f"{row['ratio_to_paused_median']:.2f}x", ha="center")
        else:
            ax.axhline(TARGETS[k], ls="--", color="tab:red", label="target")
        ax.set_xticks(range(3), names)
        top = [x for x in p95 if x == x] + [TARGETS[k] if k != "infer_s" else row["paused_median_s"] * 1.3]
        ax.set_ylim(0, max(top) * 1.2)
        ax.set_title(titles[k], fontsize=10)
        ax.set_ylabel("seconds (bar: median)")
        ax.legend(fontsize=7, loc="upper left")
    n = r["settings"]["repeats"]
    fig.suptitle(f"Foreground requests while {LEARNER[m]} runs (median of {n}, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
