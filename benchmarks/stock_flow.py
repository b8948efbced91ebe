"""Stock MONAI Label baseline for the latency benchmark.

Times what an unmodified MONAI Label server (benchmarks/stock_app) costs on Slicer's "Auto-Update Model" path:
PUT /datastore/label, then POST /train/segmentation with the trainer's advertised config (what Slicer sends), until
the training subprocess has published new weights, then one inference. Everything goes through the real
``MONAILabelClient`` against a real ``monailabel start_server`` subprocess, so start-up, the per-request training
subprocess and model reload are all in the numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent / "stock_app"
MODEL_FILE = APP_DIR / "model" / "segmentation.pt"
MODEL = "segmentation"
CMR_VALUES = {1: 200, 2: 500, 3: 600}  # stock app channel -> cmr_bssfp label value

# Server-log lines (the server relays the training subprocess's output) that mark the training phases.
MARKERS = {
    "train_subprocess_launch_s": re.compile(r"COMMAND::.*-m train"),
    "train_app_init_s": re.compile(r"Initializing App from"),
    "train_subprocess_start_s": re.compile(r"Engine run (starting|resuming)"),
    "train_first_iter_done_s": re.compile(r"Epoch: 1/\d+, Iter: 1/"),
    "train_published_log_s": re.compile(r"New Model published"),
    "train_subprocess_exit_s": re.compile(r"Return code:"),
}
DEVICE_RE = re.compile(r"Using Device: (\S+?);")


class _ServerLog:
    """Pumps the server's output into ``log`` and timestamps marker lines (the pipe must be drained anyway)."""

    def __init__(self, proc: subprocess.Popen, log: Path, t_launch: float):
        self.proc, self.t_launch = proc, t_launch
        self.armed_at: float | None = None
        self.events: dict[str, float] = {}
        self.device: str | None = None
        self.tail: list[str] = []
        self._file = open(log, "w", encoding="utf-8")  # closed in join()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            self._file.write(f"[{now - self.t_launch:9.3f}] {line}")
            self._file.flush()
            self.tail = (self.tail + [line.rstrip()])[-40:]
            if self.device is None and (m := DEVICE_RE.search(line)):
                self.device = m.group(1)
            if self.armed_at is None:
                continue
            for name, pattern in MARKERS.items():
                if name not in self.events and pattern.search(line):
                    self.events[name] = now

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        self._file.close()


def _bounded(call: Callable[[], Any], timeout: float, proc: subprocess.Popen, what: str) -> Any:
    """Run a blocking client call; the client has no socket timeout, so a watchdog kills the server instead."""
    fired = threading.Event()

    def _kill() -> None:
        fired.set()
        proc.kill()

    timer = threading.Timer(timeout, _kill)
    timer.start()
    try:
        return call()
    except Exception:
        if fired.is_set():
            raise TimeoutError(f"{what} took more than {timeout:.0f} s; server killed") from None
        raise
    finally:
        timer.cancel()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _image_ids(studies: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in studies.glob("*.nii.gz"))


def _dice(pred_file: str, truth: Path) -> dict[str, float]:
    """Per-structure Dice of the stock prediction: says whether the one-epoch fine-tune learned anything."""
    import numpy as np
    import SimpleITK as sitk

    pred = sitk.GetArrayFromImage(sitk.ReadImage(pred_file))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(truth)))
    out = {}
    for ch, value in CMR_VALUES.items():
        p, g = pred == ch, gt == value
        denom = int(p.sum()) + int(g.sum())
        out[str(value)] = float(2 * np.logical_and(p, g).sum() / denom) if denom else float("nan")
    return out


def _wait_for_info(port: int, proc: subprocess.Popen, slog: _ServerLog, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("stock server exited during start-up:\n" + "\n".join(slog.tail))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"stock server did not answer /info/ within {timeout:.0f} s")


def _stop_server(proc: subprocess.Popen, client: Any, timeout: float) -> None:
    """Stop any running training, then the server, then anything left in its process group (its children)."""
    if proc.poll() is None and client is not None:
        try:
            if _bounded(lambda: client.train_status(check_if_running=True), 30, proc, "train status"):
                _bounded(client.train_stop, 30, proc, "train stop")
        except Exception:  # best effort: the server is being torn down anyway
            pass
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group started with the server: only its own leftovers
    except (ProcessLookupError, PermissionError):
        pass


def measure_stock_flow(
    studies: Path,
    image_id: str,
    label_file: Path,
    port: int,
    log: Path,
    epochs: int = 1,
    *,
    infer_image_id: str | None = None,
    infer_truth: Path | None = None,
    timeout_s: float = 600.0,
    fresh: bool = True,
    mlflow: bool = False,
) -> dict:
    """Time save -> stock fine-tune -> published weights -> infer on a fresh stock MONAI Label server.

    ``fresh`` removes earlier weights of the stock app so every run fine-tunes from the same random init.
    ``mlflow``: stock MONAI Label advertises MLflow tracking first (so Slicer sends it), but its default file-store
    URI is rejected by the installed MLflow and training dies; off by default, or on with a SQLite store.
    All times are seconds; the ``train_*`` phase times are counted from just before the save.
    """
    from monailabel.client import MONAILabelClient

    studies, label_file, log = Path(studies).resolve(), Path(label_file).resolve(), Path(log)
    if infer_image_id is None:
        labelled = {p.name[: -len(".nii.gz")] for p in (studies / "labels" / "final").glob("*.nii.gz")}
        infer_image_id = next((i for i in _image_ids(studies) if i != image_id and i not in labelled), None)
        if infer_image_id is None:
            raise ValueError(f"no unlabelled image other than {image_id} in {studies} to run inference on")
    if fresh:
        shutil.rmtree(MODEL_FILE.parent, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "PYTHONUNBUFFERED": "1"}
    env["MONAI_LABEL_TRACKING_ENABLED"] = "true" if mlflow else "false"
    if mlflow:
        env["MONAI_LABEL_TRACKING_URI"] = f"sqlite:///{log.resolve().parent / 'mlruns.db'}"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    t_launch = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    slog = _ServerLog(proc, log, t_launch)
    client = None
    result: dict[str, Any] = {"epochs": epochs, "image_id": image_id, "infer_image_id": infer_image_id}
    result["mlflow"] = mlflow
    tmp = Path(tempfile.mkdtemp(prefix="stock_client_"))
    try:
        _wait_for_info(port, proc, slog, timeout_s)
        result["server_start_s"] = time.perf_counter() - t_launch
        client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(tmp))

        # Slicer's Auto-Update sends the trainer's advertised config, lists collapsed to their first entry.
        info = _bounded(client.info, timeout_s, proc, "GET /info/")
        config = info["trainers"][MODEL].get("config", {})
        params = {k: v[0] if isinstance(v, list) else v for k, v in config.items()}
        params["max_epochs"] = epochs
        result["train_params"] = params

        before = _mtime(MODEL_FILE)
        slog.armed_at = t0 = time.perf_counter()
        _bounded(lambda: client.save_label(image_id, str(label_file), params={}), timeout_s, proc, "save_label")
        result["save_reply_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        _bounded(lambda: client.train_start(MODEL, params), timeout_s, proc, "train_start")
        result["train_request_reply_s"] = time.perf_counter() - t1

        new_weights = None
        status: dict[str, Any] = {}
        next_status = 0.0
        deadline = time.perf_counter() + timeout_s
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"training did not finish within {timeout_s:.0f} s")
            if new_weights is None and _mtime(MODEL_FILE) not in (None, before):
                new_weights = now
            if now >= next_status:
                status = _bounded(client.train_status, 60, proc, "GET /train/")
                if status.get("status") in ("DONE", "ERROR", "STOPPED"):
                    break
                next_status = now + 0.5
            time.sleep(0.05)
        done = time.perf_counter()
        if new_weights is None and _mtime(MODEL_FILE) not in (None, before):
            new_weights = done
        result["save_to_new_weights_s"] = new_weights - t0 if new_weights else None
        result["save_to_train_done_s"] = done - t0
        result["train_status"] = {k: v for k, v in status.items() if k != "details"}
        if status.get("status") != "DONE":
            result["train_log_tail"] = list(status.get("details", []))[-10:]

        t2 = time.perf_counter()
        pred_file, _ = _bounded(lambda: client.infer(MODEL, infer_image_id, {}), timeout_s, proc, "infer")
        result["infer_s"] = time.perf_counter() - t2
        if infer_truth is not None and pred_file:
            result["infer_dice"] = _dice(pred_file, Path(infer_truth))

        stats = _bounded(client.info, timeout_s, proc, "GET /info/").get("train_stats", {}).get(MODEL, {})
        result["train_stats"] = stats
        result.update({k: v - t0 for k, v in slog.events.items()})
        result["model_file"] = str(MODEL_FILE) if MODEL_FILE.exists() else None
    finally:
        _stop_server(proc, client, 30)
        slog.join()
        shutil.rmtree(tmp, ignore_errors=True)
    result["device"] = slog.device or _local_device()
    return result


def _local_device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Build a throw-away datastore from cmr_bssfp (one study labelled, one label to save) and print the result."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets/cmr_bssfp"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--mlflow", action="store_true", help="keep stock MLflow tracking (SQLite store)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stock_flow_"))
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    ids = [1, 2, 3, 4, 5]
    for i in ids:
        shutil.copy(args.data / f"image_{i}.nii.gz", studies / f"image_{i}.nii.gz")
    shutil.copy(args.data / "label_1.nii.gz", studies / "labels" / "final" / "image_1.nii.gz")  # training data
    try:
        res = measure_stock_flow(
            studies,
            "image_2",
            args.data / "label_2.nii.gz",
            args.port or _free_port(),
            work / "server.log",
            args.epochs,
            infer_image_id="image_3",
            infer_truth=args.data / "label_3.nii.gz",
            timeout_s=args.timeout,
            mlflow=args.mlflow,
        )
    finally:
        shutil.rmtree(studies, ignore_errors=True)  # keep only the server log
    res["server_log"] = str(work / "server.log")
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
