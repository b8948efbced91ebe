"""Background learning gives way to the annotator: its threads run at the lowest CPU priority, and an
administrator can pause and resume it through the REST API while inference keeps answering."""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient
from test_refinement import _only, _refinement, _wait

from monailabel_metaapp.lib.activity import FOREGROUND, REFINE, SITE, ActivityGate, lower_thread_priority

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


def test_a_paused_gate_holds_background_levels_and_never_foreground_work():
    gate = ActivityGate(grace=0.05)
    gate.pause()
    assert not gate.wait_turn(REFINE, timeout=0.5) and not gate.wait_turn(SITE, timeout=0.2)
    assert gate.wait_turn(FOREGROUND, timeout=0.2)  # requests an annotator waits for are never paused
    passed = threading.Event()
    t = threading.Thread(target=lambda: gate.wait_turn(REFINE) and passed.set())
    t.start()
    time.sleep(0.3)
    assert not passed.is_set()
    gate.resume()
    t.join(5)
    assert passed.is_set(), "resume did not release the waiting background step"


@linux_only
def test_lower_thread_priority_lowers_the_calling_thread_only():
    seen = {}

    def worker():
        seen["ok"] = lower_thread_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"ok": True, "nice": 19}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def _nices(pid: int) -> list[int]:
    """Niceness of every thread of the server process and its children."""
    out = []
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for t in p.threads():
            try:
                out.append(os.getpriority(os.PRIO_PROCESS, t.id))
            except OSError:  # the thread ended meanwhile
                pass
    return out


@linux_only
def test_pause_and_resume_background_learning_through_the_api(cmr_store, start_server, tmp_path):
    _only(cmr_store, 500)
    conf = {"refine": "true", "refine_budget_seconds": 100000, "refine_unseen": "rv blood pool"}
    server = start_server(cmr_store, conf=conf)
    name = "lv blood pool"
    server.wait_ready(lv_blood_pool=1)
    _wait(server, lambda st: (st[name].get("refinement") or {}).get("state") == "refining", 300, "refining")
    ref = _refinement(server, name)  # two labels, not listed in refine_unseen: two starts, not the fresh run alone
    assert "starts" in ref and "start" not in ref, ref
    assert 19 in _nices(server.proc.pid), "no thread of the server runs at the lowest priority"

    r = requests.post(f"{server.url}/metaapp/background/pause", timeout=30)
    assert r.status_code == 200 and r.json()["paused"] is True
    t0 = time.time()
    while requests.get(f"{server.url}/metaapp/background", timeout=30).json()["refinement_step_running"]:
        assert time.time() - t0 < 60, "the refinement step in progress never ended"
        time.sleep(0.2)
    time.sleep(1.0)  # the worker records the finished step's count just after it leaves the gate
    steps = _refinement(server, name).get("steps")
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    _, params = client.infer("fewshot_seg", "cmr_30", {})  # requests are served while paused
    assert params["label_names"] == {name: 1}
    time.sleep(3)
    assert _refinement(server, name).get("steps") == steps, "refinement went on while paused"
    assert requests.get(f"{server.url}/info/", timeout=30).json()["metaapp"]["background"]["paused"] is True

    r = requests.post(f"{server.url}/metaapp/background/resume", timeout=30)
    assert r.status_code == 200 and r.json()["paused"] is False
    _wait(server, lambda st: (st[name].get("refinement") or {}).get("steps", 0) > steps, 120, "steps after resume")
