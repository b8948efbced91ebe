"""Memory footprint of the server: resident size at idle and after 100 inferences, against stock
MONAI Label on the same studies, and where the memory goes.

Each server runs on its own copy of the studies (default: the sample studies, built as `make serve`
builds them). Its resident size (RSS of the process and its children) is sampled every second through
start-up, until its start-up work is done, an idle minute, 100 inferences round-robin over the studies
and 30 s more. Idle RSS is the median of the idle minute; "after" is the median of the last 30 s.
Servers: stock MONAI Label (benchmarks/stock_app, one 3D UNet), this app with its background learning
off, and this app as `make serve` starts it (site adaptation on: its training runs whenever nobody
waits, so that one is never idle). A separate process imports the libraries one by one to split the
resident size between them and the app's own state, which `/info/` reports (`metaapp.memory`).

    python benchmarks/footprint.py [--studies DIR] [--idle 60] [--inferences 100] [--servers stock,quiet,default]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402

from monailabel_metaapp.devserver import Server, free_port, stop_process  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp  # noqa: E402

STOCK_APP = Path(__file__).resolve().parent / "stock_app"
SERVERS = {
    "stock": "stock MONAI Label",
    "quiet": "app, background learning off",
    "small-cache": "app, background learning off, embedding_cache_mb 128",
    "default": "app as make serve starts it",
}
IMPORTS = """
import json, psutil
p = psutil.Process(); out = [("python", p.memory_info().rss)]
import torch; out.append(("torch", p.memory_info().rss))
import monai; out.append(("monai", p.memory_info().rss))
import monailabel.app; out.append(("monailabel server", p.memory_info().rss))
import monailabel_metaapp.main; out.append(("this app's code", p.memory_info().rss))
print(json.dumps(out))
"""


class Sampler(threading.Thread):
    """RSS of a process tree every second, with the phase it was in."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc, self.phase, self.rows, self.t0 = psutil.Process(pid), "start-up", [], time.time()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = sum(q.memory_info().rss for q in [self.proc, *self.proc.children(recursive=True)])
            except psutil.Error:
                return
            self.rows.append((round(time.time() - self.t0, 1), round(rss / 2**20, 1), self.phase))
            self._halt.wait(1.0)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def median(self, phase: str, last: float | None = None) -> float:
        rows = [r for r in self.rows if r[2] == phase]
        if last is not None:
            rows = [r for r in rows if r[0] >= rows[-1][0] - last]
        return statistics.median(r[1] for r in rows)


def start_stock(studies: Path, log: Path) -> subprocess.Popen:
    port = free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(STOCK_APP), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false")
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    proc.url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"stock server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{proc.url}/info/", timeout=2).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("stock server did not start")


def run(kind: str, studies: Path, work: Path, idle: float, inferences: int) -> dict:
    """Start one server, walk it through the phases, return its RSS timeline and summary."""
    copy = work / kind / "studies"
    shutil.copytree(studies, copy, ignore=shutil.ignore_patterns(".metaapp", "datastore_v2.json", ".lock"))
    log = work / kind / "server.log"
    if kind == "stock":
        proc, server, model = start_stock(copy, log), None, "segmentation"
        url = proc.url
    else:
        conf = {"site_adapt": "false", "refine": "false"} if kind != "default" else {}
        conf |= {"embedding_cache_mb": "128"} if kind == "small-cache" else {}
        server = Server(copy, log, conf).start()
        proc, url, model = server.proc, server.url, "fewshot_seg"
    sampler = Sampler(proc.pid)
    sampler.start()
    out: dict = {"server": kind, "label": SERVERS[kind]}
    try:
        if server is not None:
            server.wait_ready()
            server.wait_scores(timeout=900)
        sampler.phase = "idle"
        time.sleep(idle)
        if server is not None:
            out["memory_idle"] = requests.get(f"{url}/info/", timeout=30).json()["metaapp"]["memory"]
        ids = sorted(requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"])
        sampler.phase = "inferring"
        t0 = time.perf_counter()
        for i in range(inferences):
            params = {"image": ids[i % len(ids)], "output": "json"}
            r = requests.post(f"{url}/infer/{model}", params=params, timeout=600)
            r.raise_for_status()
        out["infer_seconds"] = round(time.perf_counter() - t0, 1)
        sampler.phase = "after"
        time.sleep(30)
        if server is not None:
            out["memory_after"] = requests.get(f"{url}/info/", timeout=30).json()["metaapp"]["memory"]
    finally:
        sampler.stop()
        stop_process(proc)
    out["idle_mb"] = sampler.median("idle")
    out["idle_max_mb"] = max(r[1] for r in sampler.rows if r[2] == "idle")
    out["after_inferences_mb"] = sampler.median("after")
    out["after_over_idle"] = round(out["after_inferences_mb"] / out["idle_mb"], 3)
    out["peak_mb"] = max(r[1] for r in sampler.rows)
    out["timeline"] = sampler.rows
    return out


def imports() -> list[tuple[str, float]]:
    """RSS added by each library in import order (MiB), in a fresh process."""
    res = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True)
    steps = json.loads(res.stdout.strip().splitlines()[-1])
    return [(name, round((rss - (steps[i - 1][1] if i else 0)) / 2**20, 1)) for i, (name, rss) in enumerate(steps)]


def plot(runs: list[dict], split: list[tuple[str, float]], path: Path) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    for r in runs:
        t = [row[0] for row in r["timeline"]]
        ax.plot(t, [row[1] / 1024 for row in r["timeline"]], label=f"{r['label']} (idle {r['idle_mb'] / 1024:.2f} GiB)")
    ax.axhline(1.5 * 1000**3 / 2**30, color="grey", ls="--", lw=1, label="target: 1.5 GB idle")
    ax.set(xlabel="seconds since start", ylabel="resident size (GiB)", title="RSS: start-up, idle, 100 inferences")
    ax.legend(fontsize=8)
    app = next((r for r in runs if r["server"] == "quiet"), None)
    parts = [(n, mb) for n, mb in split]
    if app is not None:
        caches = sum(c.get("mb", 0) for c in app["memory_idle"]["caches"].values())
        rest = app["idle_mb"] - sum(mb for _, mb in split) - caches
        parts += [("embeddings and views cached", caches), ("models, heads, heap", rest)]
    bottom = 0.0
    for name, mb in parts:
        bx.bar(0, mb / 1024, bottom=bottom / 1024, label=f"{name}: {mb:.0f} MiB")
        bottom += mb
    bx.set(xticks=[], ylabel="GiB", title="where the idle RSS goes (background off)")
    bx.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", help="studies folder (default: the sample studies, built into a temp folder)")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle before the inferences")
    ap.add_argument("--inferences", type=int, default=100)
    ap.add_argument("--servers", default="stock,quiet,small-cache,default", help=f"which servers: {SERVERS}")
    ap.add_argument("--out", default="benchmarks/results/footprint.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="footprint_"))
    studies = Path(a.studies) if a.studies else work / "sample_studies"
    if not a.studies:
        from monailabel_metaapp.samples import build_samples

        build_samples(studies)
    split = imports()
    runs = []
    for kind in a.servers.split(","):
        print(f"{SERVERS[kind]} ...", flush=True)
        runs.append(run(kind, studies, work, a.idle, a.inferences))
        r = runs[-1]
        print(
            f"  idle {r['idle_mb']:.0f} MiB (max {r['idle_max_mb']:.0f}), after {a.inferences} inferences "
            f"{r['after_inferences_mb']:.0f} MiB ({r['after_over_idle']:.2f}x), peak {r['peak_mb']:.0f}",
            flush=True,
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "question": "resident memory of the server at idle and after 100 inferences, against stock MONAI Label",
        "studies": a.studies or "sample studies (metaapp samples)",
        "inferences": a.inferences,
        "idle_seconds": a.idle,
        "imports_mb": split,
        "runs": runs,
        "targets": {"idle_mb": 1.5 * 1000**3 / 2**20, "after_over_idle": 1.2},
        "provenance": stamp([SHIPPED_SEG], sys.argv),
    }
    out.write_text(json.dumps(result, indent=1))
    plot(runs, split, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
