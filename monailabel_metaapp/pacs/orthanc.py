"""A local PACS for development, tests and demos: Debian's Orthanc with its DICOMweb plugin, started by
hand (no systemd needed), listening on 127.0.0.1 only in effect (remote access off, DICOM port off)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import requests
from tqdm import tqdm

from monailabel_metaapp.devserver import free_port, stop_process

DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable on PATH (`Orthanc` or `orthanc`), or None when it is not installed."""
    return shutil.which("Orthanc") or (shutil.which("orthanc") if shutil.which("orthanc") else None)


def dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin in Debian's plugin folders, or None when it is not installed."""
    for d in DICOMWEB_PLUGIN_DIRS:
        p = Path(d) / "libOrthancDicomWeb.so"
        if p.exists():
            return str(p)
    return None


def missing() -> str | None:
    """Why Orthanc cannot run on this machine, so callers can skip or explain instead of failing.

    Returns:
        The reason with the package to install, or None when Orthanc and its DICOMweb plugin are there.
    """
    if orthanc_binary() is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


class Orthanc:
    """Orthanc in a subprocess with its storage in `folder`; `dicomweb` is the URL MONAI Label uses.

    Use it as a context manager (`with Orthanc(folder) as pacs:`) to stop it on exit.

    Args:
        folder: where the configuration, the log and the database (`db/`) are kept; created on start.
        port: the HTTP port; default None (a free port).
    """

    def __init__(self, folder: str | Path, port: int | None = None):
        self.folder = Path(folder)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        """Orthanc's configuration: HTTP on `port` for this host only, no DICOM port, no authentication,
        DICOMweb at `/dicom-web/`, and a re-stored instance overwrites the old one."""
        return {
            "Name": "metaapp-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # Orthanc 1.10 cannot bind to 127.0.0.1: refuse other hosts
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Host": "127.0.0.1"},
            "StableAge": 2,
            "HttpTimeout": 30,
            "OverwriteInstances": True,
        }

    def start(self, timeout: float = 60) -> Orthanc:
        """Write the configuration, start Orthanc (log in `folder/orthanc.log`) and wait until it answers.

        Args:
            timeout: seconds to wait for Orthanc to answer; default 60.

        Returns:
            This instance, running.

        Raises:
            RuntimeError: when Orthanc or its DICOMweb plugin is not installed, or Orthanc exits.
            TimeoutError: when Orthanc does not answer within `timeout`.
        """
        why = missing()
        if why:
            raise RuntimeError(why)
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([orthanc_binary(), str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'orthanc.log'}")
            if self.alive():
                return self
            time.sleep(0.3)
        raise TimeoutError(f"Orthanc did not answer on {self.url} in {timeout} s")

    def alive(self) -> bool:
        """True when Orthanc answers its REST API (`GET /system`) within 2 s."""
        try:
            return requests.get(f"{self.url}/system", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop Orthanc (terminate, then kill after 20 s); nothing happens when it is not running."""
        stop_process(self.proc)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_studies(dicomweb: str, folder: str | Path, modality: str = "MR", labels: bool = True) -> dict[str, str]:
    """Store a datastore folder's studies on a PACS, so the app can be tried against DICOMweb.

    Every image at the top of `folder` is stored as a DICOM series (STOW-RS). Loading twice stores
    the same image UIDs again (no duplicate images).

    Args:
        dicomweb: the PACS's DICOMweb URL.
        folder: a datastore folder (images at the top, final labels in `labels/final/`).
        modality: the DICOM Modality of the series; default "MR".
        labels: also store each final label as a SEG referencing its series (names from the folder's
            `labels.json`; without names no SEG is stored); default True.

    Returns:
        Image id -> SeriesInstanceUID of its series.
    """
    from dicomweb_client import DICOMwebClient

    from monailabel_metaapp.core.episodes import image_files, label_names
    from monailabel_metaapp.core.volume import read_image
    from monailabel_metaapp.pacs.dicom_io import label_to_seg, volume_to_series

    client = DICOMwebClient(url=dicomweb)
    names = {n: v for v, n in label_names(folder).items()}
    out = {}
    for path in tqdm(image_files(folder), desc="loading studies into the PACS", unit="study"):
        image_id = path.name.split(".")[0]
        image = read_image(path)
        series = volume_to_series(image, patient_id=image_id, study_name=image_id, modality=modality)
        client.store_instances(series)
        out[image_id] = str(series[0].SeriesInstanceUID)
        label = next((p for p in (Path(folder) / "labels" / "final").glob(f"{image_id}.*")), None)
        if labels and label is not None and names:
            client.store_instances([label_to_seg(read_image(label), names, series, f"{image_id} label")])
    return out


def serve_with_pacs(
    studies: str | Path,
    pacs_dir: str | Path = ".pacs",
    orthanc_port: int = 8042,
    port: int = 8000,
    modality: str = "MR",
    conf: dict | None = None,
) -> None:
    """`metaapp pacs`: the app served against a local PACS, to try the DICOMweb path with one command.

    Orthanc runs on 127.0.0.1:`orthanc_port` holding `studies` as DICOM (with SEGs of their labels)
    and the app is served on 127.0.0.1:`port` against it, listing series of `modality` only. Ctrl-C
    or SIGTERM stops both.

    Args:
        studies: a datastore folder; loaded only when `pacs_dir` holds no database yet.
        pacs_dir: Orthanc's folder (database in `db/`, the app's DICOM cache in `cache/`); default ".pacs".
        orthanc_port: Orthanc's HTTP port; default 8042.
        port: the app's port; default 8000.
        modality: the DICOM Modality the studies are stored with and the app lists; default "MR".
        conf: app settings passed as `--conf key value`; default None (none).

    Raises:
        RuntimeError: when Orthanc cannot start (see `Orthanc.start`).
        TimeoutError: when Orthanc does not answer in time.
    """
    import os
    import signal
    import sys

    pacs_dir = Path(pacs_dir).resolve()
    app: subprocess.Popen | None = None
    fresh = not (pacs_dir / "db").exists()
    orthanc = Orthanc(pacs_dir, port=orthanc_port).start()
    try:
        print(f"Orthanc (DICOMweb {orthanc.dicomweb}), storage {pacs_dir / 'db'}")
        if fresh:
            load_studies(orthanc.dicomweb, studies, modality=modality)
        env = dict(
            os.environ,
            MONAI_LABEL_DICOMWEB_SEARCH_FILTER=json.dumps({"Modality": modality}),
            MONAI_LABEL_DATASTORE_CACHE_PATH=str(pacs_dir / "cache"),
        )
        args = [sys.executable, "-m", "monailabel_metaapp", "serve", "--studies", orthanc.dicomweb]
        args += ["--port", str(port)]
        for k, v in (conf or {}).items():
            args += ["--conf", k, str(v)]
        print(f"the app on http://127.0.0.1:{port} (OHIF: http://127.0.0.1:{port}/ohif/)")
        app = subprocess.Popen(args, env=env)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a plain kill stops both servers too
        app.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(app, 30)
        orthanc.stop()
