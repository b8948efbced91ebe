"""Several annotators at once: does the server keep answering, lose no save and hold its memory?

Drives the real `metaapp serve` (on 127.0.0.1) with N simulated annotators at once. Each annotator is
a thread with its own HTTP session and client id that loops, back to back with no time to think (far
more requests per annotator than a person sends):

1. Next Sample: `POST /activelearning/uncertainty` `{"client_id": ID}` (when it offers nothing, every
   study being labelled or held by another annotator, the annotator reviews a random study instead);
2. open the study: `GET /datastore/image?image=ID` (the whole file);
3. inference: `POST /infer/fewshot_seg?image=ID` (label map + JSON, as Slicer's client receives it);
4. save a label: `PUT /datastore/label?image=ID&tag=final`, the study's reference label (MS-CMRSeg:
   200 lv myocardium, 500 lv blood pool, 600 rv blood pool) with `label_info` naming the three
   structures as 3D Slicer sends it, plus a `load_save_id` that identifies the save;
5. correct the image's class: `PUT /metaapp/classes/{ID}` `{"class": "a" | "b"}` at random.

Each N (1, 4, 16 by default) runs `--seconds` on a fresh writable datastore of 20 real cardiac MRI
studies (MS-CMRSeg bSSFP 1-20 from ../shared/datasets), 2 of them labelled, once the heads of the 2
labels are live and the active-learning scores are fresh. Background learning (site adaptation,
refinement) is off unless `--background`, so latency reflects the requests. Per request: kind, start,
latency, HTTP status. Per N: throughput, p50/p95/p99 per kind, 5xx and other non-2xx, lost saves and
class corrections, and the RSS of the server (its process and children, summed) every second.

A save is lost when it got a 2xx and, after the run, the study's final label (through
`GET /datastore/?output=all`, the file under labels/final, and once the server has stopped the
datastore's JSON on disk) is missing, differs voxel by voxel from what was sent, or carries the
`load_save_id` of a save that another 2xx save on the same study started after it replied (a later
save overwritten by an earlier one). Class corrections are checked the same way (stored class).

`--soak-minutes M` runs one N (from `--annotators`) for M minutes and reports the RSS growth after a
warm-up (the first 20 % of the run): (RSS at end - RSS after warm-up) / RSS after warm-up.

    python benchmarks/load.py --annotators 1,4,16 --seconds 120
    python benchmarks/load.py --soak-minutes 30 --annotators 4

Needs ../shared/datasets (real data); writes benchmarks/results/load/load.json + load.png (soak:
soak.json + soak.png) and the requests as CSV beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import requests
import SimpleITK as sitk

from monailabel_metaapp.devserver import Server
from monailabel_metaapp.provenance import SHIPPED_CLS, SHIPPED_SEG, stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_ids, require_shared_datasets, writable_cmr_store

N_STUDIES, N_LABELLED = 20, 2
STRATEGY = "uncertainty"
KINDS = ("next_sample", "open_image", "infer", "save_label", "set_class")
CLASSES = ("a", "b")
LABEL_INFO = [{"name": n, "idx": v} for n, v in CMR_STRUCTURES.items()]
TARGETS = {
    "at_16_annotators": {"server_errors_5xx": 0, "lost_saves": 0, "save_label_p95_s_below": 0.5},
    "soak_30_min_at_4_annotators": {"rss_growth_after_warmup_below": 0.10},
}
CONF_QUIET = {"site_adapt": "false", "refine": "false"}
CONF_BACKGROUND = {"site_adapt": "true", "refine": "true"}
TIMEOUT_S = 300


class Recorder:
    """Requests of every annotator, in one list (appends are atomic under the GIL; a lock keeps it plain)."""

    def __init__(self, t0: float):
        self.t0, self.rows, self.lock = t0, [], threading.Lock()

    def add(self, **row) -> dict:
        with self.lock:
            self.rows.append(row)
        return row


def timed(
    rec: Recorder,
    session: requests.Session,
    kind: str,
    annotator: int,
    image: str | None,
    method: str,
    url: str,
    extra: dict | None = None,
    **kw,
) -> tuple[requests.Response | None, dict]:
    """One request, recorded with its start (s from the load's start), latency, status (None: no reply)."""
    t = time.perf_counter()
    resp, err = None, None
    try:
        resp = session.request(method, url, timeout=TIMEOUT_S, **kw)
        _ = resp.content  # the whole body, as a client waits for it
    except requests.RequestException as e:
        err = f"{type(e).__name__}: {e}"[:300]
    end = time.perf_counter()
    row = {
        "kind": kind,
        "annotator": annotator,
        "image": image,
        "start_s": round(t - rec.t0, 4),
        "latency_s": round(end - t, 5),
        "status": None if resp is None else resp.status_code,
        "end_s": round(end - rec.t0, 4),
    }
    if err or (resp is not None and resp.status_code >= 300):
        row["error"] = err or resp.text[:300]
    row.update(extra or {})
    return resp, rec.add(**row)


def annotator(
    k: int,
    url: str,
    ids: list[str],
    labels: dict[str, bytes],
    rec: Recorder,
    deadline: float,
    seed: int,
    think_s: float,
) -> None:
    rng = random.Random(seed * 1000 + k)
    client_id = f"load-annotator-{k:02d}"
    s = requests.Session()
    while time.perf_counter() < deadline:
        r, row = timed(
            rec, s, "next_sample", k, None, "POST", f"{url}/activelearning/{STRATEGY}", json={"client_id": client_id}
        )
        image = None
        if r is not None and r.ok:
            try:
                image = r.json().get("id")
            except ValueError:
                image = None
        row["offered"] = image  # which study Next Sample offered (None: nothing)
        image = image or rng.choice(ids)  # nothing offered: review a random study
        if time.perf_counter() >= deadline:
            break
        timed(rec, s, "open_image", k, image, "GET", f"{url}/datastore/image", params={"image": image})
        if time.perf_counter() >= deadline:
            break
        timed(
            rec,
            s,
            "infer",
            k,
            image,
            "POST",
            f"{url}/infer/fewshot_seg",
            params={"image": image},
            files={"params": (None, json.dumps({}))},
        )
        if time.perf_counter() >= deadline:
            break
        save_id = uuid.uuid4().hex
        params = {"label_info": LABEL_INFO, "client_id": client_id, "load_save_id": save_id}
        timed(
            rec,
            s,
            "save_label",
            k,
            image,
            "PUT",
            f"{url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={"label": (f"{image}.nii.gz", labels[image], "application/gzip")},
            data={"params": json.dumps(params)},
            extra={"save_id": save_id},
        )
        if time.perf_counter() >= deadline:
            break
        cls = rng.choice(CLASSES)
        timed(
            rec,
            s,
            "set_class",
            k,
            image,
            "PUT",
            f"{url}/metaapp/classes/{image}",
            json={"class": cls},
            extra={"class": cls},
        )
        if think_s:
            time.sleep(think_s)


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS in bytes of a process and its children (summed; shared pages count once per process), and
    how many processes that is."""
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total, len(procs)


class RssSampler(threading.Thread):
    def __init__(self, pid: int, t0: float, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.t0, self.every, self.samples, self.stop_ = pid, t0, every, [], threading.Event()

    def run(self) -> None:
        while not self.stop_.is_set():
            t = time.perf_counter()
            try:
                rss, n = tree_rss(self.pid)
                self.samples.append((round(t - self.t0, 2), round(rss / 2**20, 1), n))
            except psutil.Error:
                pass
            self.stop_.wait(max(0.0, self.every - (time.perf_counter() - t)))


def pct(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs)
    return {
        "n": len(xs),
        "p50_s": float(np.percentile(a, 50)),
        "p95_s": float(np.percentile(a, 95)),
        "p99_s": float(np.percentile(a, 99)),
        "max_s": float(a.max()),
        "mean_s": float(a.mean()),
    }


def latest_candidates(ok: list[dict], key: str) -> set:
    """Values of `key` of the 2xx requests on one study that no other 2xx request started after their reply:
    the ones whose content may rightly be what is stored at the end."""
    return {r[key] for r in ok if not any(o["start_s"] > r["end_s"] for o in ok)}


def label_array(data: bytes | Path) -> np.ndarray:
    if isinstance(data, Path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(data)))
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
        f.write(data)
        f.flush()
        return sitk.GetArrayFromImage(sitk.ReadImage(f.name))


def check_saves(rows: list[dict], store: Path, listing: dict, sent: dict[str, np.ndarray], where: str) -> dict:
    """Every 2xx save present, equal to what was sent, and not overwritten by an earlier save."""
    ok = [r for r in rows if r["kind"] == "save_label" and r["status"] is not None and 200 <= r["status"] < 300]
    lost = []
    for image in sorted({r["image"] for r in ok}):
        mine = [r for r in ok if r["image"] == image]
        obj = (listing.get("objects") or {}).get(image) or {}
        final = (obj.get("labels") or {}).get("final")
        why = None
        if not final:
            why = f"no final label listed ({where})"
        else:
            stored_id = (final.get("info") or {}).get("load_save_id")
            files = sorted((store / "labels" / "final").glob(f"{image}.*"))
            if not files:
                why = "no file under labels/final"
            elif not np.array_equal(label_array(files[0]), sent[image]):
                why = f"stored voxels differ from those sent ({files[0].name})"
            elif stored_id not in latest_candidates(mine, "save_id"):
                why = f"stored label is from save {stored_id}, not the latest 2xx save"
        if why:
            lost.append({"image": image, "saves_2xx": len(mine), "why": why})
    return {"saves_2xx": len(ok), "studies_saved": len({r["image"] for r in ok}), "lost": lost}


def check_classes(rows: list[dict], corrections: dict) -> dict:
    ok = [r for r in rows if r["kind"] == "set_class" and r["status"] is not None and 200 <= r["status"] < 300]
    lost = []
    for image in sorted({r["image"] for r in ok}):
        mine = [r for r in ok if r["image"] == image]
        stored = ((corrections.get(image) or {}).get("image") or {}).get("class")
        if stored not in latest_candidates(mine, "class"):
            lost.append({"image": image, "corrections_2xx": len(mine), "stored": stored})
    return {"corrections_2xx": len(ok), "lost": lost}


def log_summary(path: Path) -> dict:
    text = path.read_text(errors="replace").splitlines()
    errors = [ln for ln in text if re.search(r"\[(ERROR|CRITICAL)\]|Traceback", ln)]
    warnings = [ln for ln in text if "[WARNING]" in ln]
    http5 = [ln for ln in text if re.search(r'" 5\d\d\b', ln)]
    return {
        "lines": len(text),
        "errors": len(errors),
        "warnings": len(warnings),
        "http_5xx_lines": len(http5),
        "first_errors": errors[:10],
        "first_warnings": sorted({re.sub(r"^\[[^]]*\] \[\d+\] ", "", w)[:240] for w in warnings})[:15],
    }


def summarise(rows: list[dict], wall_s: float) -> dict:
    out = {"requests": len(rows), "wall_s": wall_s, "throughput_rps": len(rows) / wall_s, "per_kind": {}}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        st = [r["status"] for r in mine]
        out["per_kind"][kind] = {
            "throughput_rps": len(mine) / wall_s,
            **pct([r["latency_s"] for r in mine]),
            "ok_2xx": sum(1 for s in st if s is not None and 200 <= s < 300),
            "server_errors_5xx": sum(1 for s in st if s is not None and s >= 500),
            "other_non_2xx": sum(1 for s in st if s is not None and not 200 <= s < 300 and s < 500),
            "no_reply": sum(1 for s in st if s is None),
            "latency_ok_s": pct([r["latency_s"] for r in mine if r["status"] is not None and r["status"] < 300]),
        }
    out["next_sample_offered_nothing"] = sum(1 for r in rows if r["kind"] == "next_sample" and not r.get("offered"))
    for k in ("server_errors_5xx", "other_non_2xx", "no_reply"):
        out[k] = sum(v[k] for v in out["per_kind"].values())
    out["failed_requests"] = [r for r in rows if r["status"] is None or r["status"] >= 300][:50]
    return out


def rss_summary(samples: list[tuple], warmup_s: float | None = None) -> dict:
    if not samples:
        return {}
    t = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples])
    load = t >= 0
    out = {
        "before_load_mb": float(mb[~load][-1]) if (~load).any() else None,
        "start_mb": float(mb[load][0]),
        "peak_mb": float(mb.max()),
        "end_mb": float(mb[load][-1]),
        "processes": int(max(s[2] for s in samples)),
        "t_s": t.tolist(),
        "rss_mb": mb.tolist(),
    }
    if warmup_s is not None:
        i = int(np.searchsorted(t, warmup_s))
        i = min(i, len(t) - 1)
        w = float(mb[i])
        after = t >= warmup_s
        slope = float(np.polyfit(t[after], mb[after], 1)[0]) * 60 if after.sum() > 2 else None
        # RSS swings by ~1.5 GiB within seconds (each inference allocates and frees), so one sample is
        # noisy: the medians of the minute after warm-up and of the last minute say the same thing robustly
        w60 = float(np.median(mb[(t >= warmup_s) & (t < warmup_s + 60)]))
        e60 = float(np.median(mb[(t >= t.max() - 60) & load]))
        out.update(
            {
                "warmup_s": warmup_s,
                "after_warmup_mb": w,
                "growth_after_warmup": (out["end_mb"] - w) / w,
                "after_warmup_median_60s_mb": w60,
                "end_median_60s_mb": e60,
                "growth_after_warmup_median_60s": (e60 - w60) / w60,
                "slope_after_warmup_mb_per_min": slope,
            }
        )
    return out


def run_one(
    n: int,
    seconds: float,
    root: Path,
    ids: list[int],
    conf: dict,
    shared: Path,
    seed: int,
    think_s: float,
    warmup_frac: float | None = None,
) -> tuple[dict, list[dict]]:
    work = root / f"n{n}"
    store = writable_cmr_store(work / "cmr", ids, ids[:N_LABELLED])
    names = [f"cmr_{i:02d}" for i in ids]
    labels = {f"cmr_{i:02d}": (shared / "cmr_bssfp" / f"label_{i}.nii.gz").read_bytes() for i in ids}
    sent = {k: label_array(v) for k, v in labels.items()}
    log = work / "server.log"
    server = Server(store, log, conf)
    t_setup = time.perf_counter()
    server.start(timeout=300)
    try:
        server.wait_ready(timeout=600, lv_blood_pool=1)
        fresh = True
        try:
            server.wait_scores(timeout=600)
        except TimeoutError:
            fresh = False
        setup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter() + 3.0  # 3 s of RSS before the load (negative times)
        sampler = RssSampler(server.proc.pid, t0)
        sampler.start()
        time.sleep(max(0.0, t0 - time.perf_counter()))
        rec = Recorder(t0)
        deadline = t0 + seconds
        threads = [
            threading.Thread(target=annotator, args=(k, server.url, names, labels, rec, deadline, seed, think_s))
            for k in range(n)
        ]
        print(f"N={n}: {seconds:.0f} s of load on {server.url} (log {log})", flush=True)
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall_s = time.perf_counter() - t0
        time.sleep(2)
        sampler.stop_.set()
        sampler.join()
        rows = sorted(rec.rows, key=lambda r: r["start_s"])
        listing = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()
        corrections = requests.get(f"{server.url}/metaapp/classes", timeout=60).json().get("corrections", {})
        saves_live = check_saves(rows, store, listing, sent, "GET /datastore/?output=all")
        classes = check_classes(rows, corrections)
        structures = server.structures()
        alive = server.proc.poll() is None
    finally:
        server.stop()
    on_disk = json.loads((store / "datastore_v2.json").read_text())
    saves_disk = check_saves(rows, store, on_disk, sent, "datastore_v2.json after the server stopped")
    summary = summarise(rows, wall_s)
    warmup = seconds * warmup_frac if warmup_frac is not None else None
    result = {
        "annotators": n,
        "seconds": seconds,
        "setup_s": setup_s,
        "scores_fresh_at_start": fresh,
        **summary,
        "lost_saves": len({x["image"] for x in saves_live["lost"] + saves_disk["lost"]}),
        "saves_check": {"live": saves_live, "on_disk_after_stop": saves_disk},
        "lost_class_corrections": len(classes["lost"]),
        "classes_check": classes,
        "structures_at_end": {
            k: {f: v.get(f) for f in ("version", "n_labels", "state")} for k, v in structures.items()
        },
        "server_alive_at_end": alive,
        "rss": rss_summary(sampler.samples, warmup),
        "server_log": {"path": str(log), **log_summary(log)},
    }
    return result, rows


def write_rows(rows_by_n: dict[int, list[dict]], path: Path) -> None:
    cols = ["annotators", "kind", "annotator", "image", "start_s", "latency_s", "status", "offered"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for n, rows in rows_by_n.items():
            for r in rows:
                w.writerow([n, *(r.get(c) for c in cols[1:])])


def short(run: dict) -> dict:
    k = run["per_kind"]
    return {
        "annotators": run["annotators"],
        "throughput_rps": round(run["throughput_rps"], 2),
        "p95_s": {kind: round(k[kind].get("p95_s", float("nan")), 3) for kind in KINDS},
        "5xx": run["server_errors_5xx"],
        "other_non_2xx": run["other_non_2xx"],
        "no_reply": run["no_reply"],
        "lost_saves": run["lost_saves"],
        "lost_class_corrections": run["lost_class_corrections"],
        "rss_mb_start_peak_end": [run["rss"].get(x) for x in ("start_mb", "peak_mb", "end_mb")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", default="1,4,16", help="comma-separated N (one value with --soak-minutes)")
    ap.add_argument("--seconds", type=float, default=120, help="load per N")
    ap.add_argument("--soak-minutes", type=float, default=None)
    ap.add_argument("--background", action="store_true", help="site adaptation and refinement on")
    ap.add_argument("--think-seconds", type=float, default=0.0, help="pause after each annotator's loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="an app conf key, repeatable")
    ap.add_argument("--out-dir", default="benchmarks/results/load")
    a = ap.parse_args()
    shared = require_shared_datasets()
    provenance = stamp([SHIPPED_SEG, SHIPPED_CLS])  # before the server starts: the code it runs
    ns = [int(x) for x in a.annotators.split(",") if x.strip()]
    soak = a.soak_minutes is not None
    if soak and len(ns) != 1:
        ap.error("--soak-minutes takes one --annotators value")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "soak" if soak else "load"
    ids = cmr_ids(shared)[:N_STUDIES]
    conf = {**(CONF_BACKGROUND if a.background else CONF_QUIET), **dict(kv.split("=", 1) for kv in a.conf)}
    root = Path(tempfile.mkdtemp(prefix=f"load_{stem}_"))
    runs, rows_by_n = {}, {}
    for n in ns:
        seconds = a.soak_minutes * 60 if soak else a.seconds
        runs[str(n)], rows_by_n[n] = run_one(
            n, seconds, root, ids, conf, shared, a.seed, a.think_seconds, 0.2 if soak else None
        )
        print(json.dumps(short(runs[str(n)])), flush=True)
    settings = {
        "studies": [f"cmr_{i:02d}" for i in ids],
        "labelled_at_start": [f"cmr_{i:02d}" for i in ids[:N_LABELLED]],
        "annotators": ns,
        "seconds_per_n": a.soak_minutes * 60 if soak else a.seconds,
        "conf": conf,
        "background_learning": a.background,
        "why_background_off": None
        if a.background
        else "site adaptation and refinement off, so latency reflects "
        "the requests, not background training sharing the cores",
        "think_seconds": a.think_seconds,
        "loop": [
            "POST /activelearning/uncertainty",
            "GET /datastore/image",
            "POST /infer/fewshot_seg",
            "PUT /datastore/label (tag final, reference label, label_info of 3 structures)",
            'PUT /metaapp/classes/{id} {"class": "a"|"b"}',
        ],
        "next_sample_empty": "the annotator reviews a random study of the 20",
        "fresh_server_and_datastore_per_n": True,
        "request_timeout_s": TIMEOUT_S,
        "rss": "psutil RSS of the server process and its children, summed, sampled every second",
        "throughput": "requests completed / wall time from the first request to the last reply",
        "seed": a.seed,
    }
    result = {
        "question": "with N annotators at once on a 2-core CPU, does the server answer fast, without 5xx, "
        "without losing a save, and with bounded memory?",
        "settings": settings,
        "targets": TARGETS,
        "summary": [short(r) for r in runs.values()],
        "runs": runs,
        "requests_csv": f"{stem}_requests.csv",
    }
    if soak:
        r = next(iter(runs.values()))
        g = r["rss"]["growth_after_warmup"]
        result["soak"] = {
            "minutes": a.soak_minutes,
            "annotators": ns[0],
            "warmup_fraction": 0.2,
            "rss_after_warmup_mb": r["rss"]["after_warmup_mb"],
            "rss_end_mb": r["rss"]["end_mb"],
            "rss_growth_after_warmup": g,
            "rss_growth_after_warmup_median_60s": r["rss"]["growth_after_warmup_median_60s"],
            "rss_slope_after_warmup_mb_per_min": r["rss"]["slope_after_warmup_mb_per_min"],
        }
        result["targets_met"] = {
            "rss_growth_after_warmup_below_10pct": g < 0.10,
            "rss_growth_after_warmup_median_60s_below_10pct": r["rss"]["growth_after_warmup_median_60s"] < 0.10,
            "applies": a.soak_minutes >= 30 and ns[0] == 4,
        }
    elif "16" in runs:
        r = runs["16"]
        result["targets_met"] = {
            "no_5xx_at_16": r["server_errors_5xx"] == 0,
            "no_lost_save_at_16": r["lost_saves"] == 0,
            "save_label_p95_below_0.5_s_at_16": r["per_kind"]["save_label"]["p95_s"] < 0.5,
        }
    result["provenance"] = provenance
    at_end = stamp([SHIPPED_SEG, SHIPPED_CLS])
    if (at_end["commit"], at_end["dirty"]) != (provenance["commit"], provenance["dirty"]):
        result["provenance_at_end"] = at_end  # the checkout changed while the server ran
    out = out_dir / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1))
    write_rows(rows_by_n, out_dir / f"{stem}_requests.csv")
    plot(result, out.with_suffix(".png"))
    print(
        json.dumps(
            {"summary": result["summary"], "targets_met": result.get("targets_met"), "soak": result.get("soak")},
            indent=2,
        )
    )


def plot(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = r["runs"]
    ns = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    width = 0.8 / len(ns)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, n in enumerate(ns):
        pk = runs[n]["per_kind"]
        x = np.arange(len(KINDS)) + (j - (len(ns) - 1) / 2) * width
        p50 = [pk[k].get("p50_s", np.nan) for k in KINDS]
        p95 = [pk[k].get("p95_s", np.nan) for k in KINDS]
        p99 = [pk[k].get("p99_s", np.nan) for k in KINDS]
        ax.bar(x, p50, width, color=colors[j % len(colors)], label=f"N={n} (bar p50)")
        ax.scatter(x, p95, marker="_", s=120, color="black", zorder=3, label="p95" if j == 0 else None)
        ax.scatter(x, p99, marker=".", s=30, color="black", zorder=3, label="p99" if j == 0 else None)
    ax.axhline(0.5, ls="--", color="tab:red", lw=1, label="save p95 target 0.5 s")
    ax.set_yscale("log")
    ax.set_xticks(range(len(KINDS)), [k.replace("_", " ") for k in KINDS], fontsize=8)
    ax.set_ylabel("latency, s (log)")
    ax.set_title("latency per request kind", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)

    ax = axes[1]
    bottom = np.zeros(len(ns))
    for i, k in enumerate(KINDS):
        v = np.array([runs[n]["per_kind"][k]["throughput_rps"] for n in ns])
        ax.bar(range(len(ns)), v, 0.6, bottom=bottom, label=k.replace("_", " "), color=colors[i % len(colors)])
        bottom += v
    ax.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
    ax.set_ylabel("requests / s")
    ax.set_title("throughput", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)

    ax = axes[2]
    for j, n in enumerate(ns):
        rss = runs[n]["rss"]
        t = np.array(rss["t_s"])
        ax.plot(t / (60 if "soak" in r else 1), rss["rss_mb"], color=colors[j % len(colors)], label=f"N={n}")
        if "warmup_s" in rss:
            ax.axvline(rss["warmup_s"] / 60, ls="--", color="gray", lw=1, label="end of warm-up")
    ax.set_xlabel("minutes of load" if "soak" in r else "seconds of load")
    ax.set_ylabel("server RSS, MiB (process + children)")
    title = "server memory"
    if "soak" in r:
        sk = r["soak"]
        title += (
            f": growth after warm-up {sk['rss_growth_after_warmup'] * 100:+.1f} % (one sample each), "
            f"{sk.get('rss_growth_after_warmup_median_60s', float('nan')) * 100:+.1f} % (medians of a minute)"
        )
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    what = "soak" if "soak" in r else "load"
    fig.suptitle(
        f"{what}: N annotators back to back against one server (2-core CPU, background learning "
        f"{'on' if r['settings']['background_learning'] else 'off'})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
