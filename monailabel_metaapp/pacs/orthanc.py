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
    return shutil.which("Orthanc") or (shutil.which("orthanc") if shutil.which("orthanc") else None)


def dicomweb_plugin() -> str | None:
    for d in DICOMWEB_PLUGIN_DIRS:
        p = Path(d) / "libOrthancDicomWeb.so"
        if p.exists():
            return str(p)
    return None


def missing() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


class Orthanc:
    """Orthanc in a subprocess with its storage in `folder`; `dicomweb` is the URL MONAI Label uses."""

    def __init__(self, folder: str | Path, port: int | None = None):
        self.folder = Path(folder)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
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
        try:
            return requests.get(f"{self.url}/system", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_studies(dicomweb: str, folder: str | Path, modality: str = "MR", labels: bool = True) -> dict[str, str]:
    """Every image of a datastore folder (top level) as a DICOM series on the PACS (STOW-RS), and with
    `labels` each final label as a SEG referencing it (names from `labels.json`); returns image id ->
    SeriesInstanceUID. Loading twice stores the same image UIDs again (no duplicate images)."""
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
    """`metaapp pacs`: Orthanc on 127.0.0.1:orthanc_port holding `studies` as DICOM (+ SEGs of their
    labels, loaded once), and the app served on 127.0.0.1:port against it. Ctrl-C stops both."""
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
