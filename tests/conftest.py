"""Shared fixtures: real data from ../shared/datasets (skipped with a reason when absent) and
the project's own sample studies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from monailabel_metaapp.core.volume import read_image
from monailabel_metaapp.devserver import Server
from monailabel_metaapp.pacs import orthanc as pacs
from monailabel_metaapp.pacs.dicom_io import series_to_image
from monailabel_metaapp.shared_data import cmr_view, shared_datasets, writable_cmr_store

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared() -> Path:
    root = shared_datasets()
    if root is None:
        pytest.skip("../shared/datasets is absent (a fresh clone has no real data beside it)")
    return root


@pytest.fixture
def cmr_store(shared, tmp_path) -> Path:
    """A writable datastore of 6 real cardiac MRI studies, 2 of them labelled."""
    return writable_cmr_store(tmp_path / "cmr", [26, 27, 28, 29, 30, 31], [26, 27])


@pytest.fixture(scope="session")
def cmr_readonly(shared, tmp_path_factory) -> Path:
    return cmr_view(tmp_path_factory.mktemp("cmr_ro"), list(range(1, 9)))


@pytest.fixture(scope="session")
def samples_src(tmp_path_factory) -> Path:
    """sample_studies/ as the project's script builds it (rebuilt into a temp dir: never touched)."""
    from monailabel_metaapp.samples import build_samples

    out = tmp_path_factory.mktemp("samples") / "sample_studies"
    build_samples(out)
    return out


@pytest.fixture
def sample_store(samples_src, tmp_path) -> Path:
    dst = tmp_path / "sample_studies"
    shutil.copytree(samples_src, dst, ignore=shutil.ignore_patterns(".metaapp", "datastore_v2.json", ".lock"))
    return dst


# -- a real MONAI Label server on 127.0.0.1 ---------------------------------------------------


@pytest.fixture
def start_server(tmp_path):
    servers = []

    def _start(
        studies: Path | str, conf: dict | None = None, env: dict | None = None, headers: dict | None = None
    ) -> Server:
        # background learning (site adaptation, refinement) only where a test asks for it
        conf = {"site_adapt": "false", "refine": "false", **(conf or {})}
        s = Server(studies, tmp_path / f"server{len(servers)}.log", conf, env=env, headers=headers).start()
        servers.append(s)
        return s

    yield _start
    for s in servers:
        s.stop()


def slicer_client_module():
    """The 3D Slicer plugin's client module, as the monailabel wheel installs it."""
    path = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"
    if not path.exists():
        pytest.fail(f"the Slicer plugin client is missing at {path}: is monailabel installed in this venv?")
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- a real PACS (Orthanc) and the app against it --------------------------------------------

POLL = 2  # seconds between the app's PACS polls in these tests


@pytest.fixture
def orthanc(tmp_path):
    why = pacs.missing()
    if why:
        pytest.skip(why)
    o = pacs.Orthanc(tmp_path / "pacs").start()
    yield o
    o.stop()


@pytest.fixture
def loaded(orthanc, samples_src) -> dict[str, str]:
    """The sample studies on the PACS as DICOM series, no SEG yet: image id (mni_0N) -> series UID."""
    return pacs.load_studies(orthanc.dicomweb, samples_src, labels=False)


@pytest.fixture
def pacs_server(orthanc, loaded, start_server, tmp_path):
    env = {
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "cache"),
    }
    return start_server(orthanc.dicomweb, conf={"pacs_poll_seconds": POLL}, env=env)


def pacs_image(client: DICOMwebClient, series_uid: str, folder: Path) -> sitk.Image:
    """The image as the PACS holds it, read independently of the app."""
    meta = Dataset.from_json(client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})[0])
    folder.mkdir(parents=True, exist_ok=True)
    for ds in client.retrieve_series(str(meta.StudyInstanceUID), series_uid):
        ds.save_as(str(folder / f"{ds.SOPInstanceUID}.dcm"))
    return series_to_image(sorted(folder.glob("*.dcm")))


def on_grid(label_file: Path, grid: sitk.Image, value: int | None) -> sitk.Image:
    """A sample label's structure `value` (None: every structure), as 1, resampled onto another grid."""
    lbl = sitk.Resample(read_image(label_file), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayFromImage(lbl)
    out = sitk.GetImageFromArray(((a > 0) if value is None else (a == value)).astype(np.uint8))
    out.CopyInformation(grid)
    return out


def sample_label(samples: Path, image: str) -> Path:
    return next((samples / "labels" / "final").glob(f"{image}.*"))
