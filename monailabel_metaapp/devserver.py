"""A real `metaapp serve` process on 127.0.0.1 for tests, benchmarks and the AL simulation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """Terminate a child server and wait for it; kill it if it does not stop in `timeout` s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


class Server:
    """`metaapp serve` in a subprocess: the same path the README's command takes."""

    def __init__(
        self,
        studies: Path | str,
        log: Path,
        conf: dict | None = None,
        port: int | None = None,
        env: dict | None = None,
        headers: dict | None = None,
    ):
        """headers: sent with the readiness and status requests (a bearer token when auth is on)."""
        self.studies, self.log_path, self.conf, self.env = studies, Path(log), conf or {}, env or {}
        self.headers = headers or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Server:
        args = [sys.executable, "-m", "monailabel_metaapp", "serve", "--studies", str(self.studies)]
        args += ["--port", str(self.port)]
        for k, v in self.conf.items():
            args += ["--conf", k, str(v)]
        env = dict(os.environ, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()  # never leave a server behind that did not come up
        raise TimeoutError(f"server did not answer /info/ in {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def structures(self, model: str = "fewshot_seg") -> dict:
        info = requests.get(f"{self.url}/info/", headers=self.headers, timeout=10).json()
        return info["metaapp"][model]["structures"]

    def wait_ready(self, timeout: float = 240, poll: float = 0.5, **min_versions: int) -> dict:
        """Wait until nothing is queued/adapting and the named structures (spaces as _) reached a version."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            st = self.structures()
            busy = any(s["state"] in ("queued", "adapting") for s in st.values())
            low = any(st.get(n.replace("_", " "), {}).get("version", 0) < v for n, v in min_versions.items())
            if not busy and not low:
                return st
            time.sleep(poll)
        raise TimeoutError(f"heads not ready: {self.structures()}\n{self.log_tail()}")

    def wait_scores(self, timeout: float = 300, model: str = "fewshot_seg") -> dict:
        """Wait until no head is adapting and the active-learning scores are fresh (one full pass done)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            meta = requests.get(f"{self.url}/info/", headers=self.headers, timeout=10).json()["metaapp"][model]
            busy = any(s["state"] in ("queued", "adapting") for s in meta["structures"].values())
            al = meta["activelearning"]
            if not busy and al["state"] == "idle" and not al["pending"] and al["passes"] > 0:
                return al
            time.sleep(0.3)
        raise TimeoutError(f"active-learning scores not refreshed in {timeout} s:\n{self.log_tail()}")
