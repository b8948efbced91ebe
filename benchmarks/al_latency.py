"""Next Sample response time of every registered strategy on a 35-study real datastore, through the
real REST API (3D Slicer's client), once the background scores are fresh.

    python benchmarks/al_latency.py [--calls 20] [--out benchmarks/results/al_latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from monailabel_metaapp.devserver import Server
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/al_latency.json")
    a = ap.parse_args()
    require_shared_datasets()
    root = Path(tempfile.mkdtemp())
    store = cmr_view(root / "store")
    for p in sorted((store / "labels" / "final").iterdir())[2:]:  # 2 labelled studies, 33 to choose from
        p.unlink()
    server = Server(store, root / "server.log").start()
    try:
        server.wait_ready(lv_blood_pool=1)
        t0 = time.perf_counter()
        al = server.wait_scores(timeout=900)
        first_pass = time.perf_counter() - t0
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        result = {"studies": 35, "labelled": 2, "first_scoring_pass_s": first_pass, "scores": al, "strategies": {}}
        for strategy in sorted(info["strategies"]):
            times = []
            for _ in range(a.calls):
                t = time.perf_counter()
                r = requests.post(f"{server.url}/activelearning/{strategy}", json={"client_id": "bench"}, timeout=30)
                times.append(time.perf_counter() - t)
                r.raise_for_status()
            result["strategies"][strategy] = {"median_s": statistics.median(times), "max_s": max(times)}
            print(strategy, json.dumps(result["strategies"][strategy]))
        result["command"] = "python " + " ".join(sys.argv)
        result["provenance"] = stamp([SHIPPED_SEG])
        Path(a.out).write_text(json.dumps(result, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
