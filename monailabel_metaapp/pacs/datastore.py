"""The datastore for a PACS (any DICOMweb server): images come from the PACS, labels go back to it as
DICOM SEG, and SEGs that others store there (OHIF's "Export DICOM SEG", another workstation) come
back as final labels.

Differences from MONAI Label's DICOMWebDatastore, each for a reason:
* nothing is downloaded at start-up: SEGs are written with pydicom-seg, not dcmqi's
  `itkimage2segimage` (which MONAI Label fetches from GitHub);
* a label is checked, then kept in the local cache *before* the upload, so a PACS that is down
  loses nothing: the upload is retried until it is back (`/info/` lists what is pending); a SEG's
  UIDs derive from the image and the label's content, so an upload retried after a crash stores
  the same SEG again rather than a second one;
* a poller asks the PACS (QIDO-RS) for SEG series every `poll_seconds`, takes the newest SEG per
  image series, resamples it onto the image grid (SEGs often hold only the labelled frames), stores
  it as the final label and tells the app, which adapts the heads;
* the image list is cached for seconds, not hours, and a PACS that is down answers 503 with the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_download_series
from pydicom.dataset import Dataset

from monailabel_metaapp.core.volume import read_image
from monailabel_metaapp.lib.datastore import LabelChecks, SafeDatastoreFile
from monailabel_metaapp.pacs.dicom_io import label_to_seg, read_dataset, seg_referenced_series, seg_to_label

logger = logging.getLogger(__name__)

PACS_ERRORS = (requests.RequestException, ConnectionError, TimeoutError)


def _dicom_time(ds: Dataset) -> float | None:
    """Seconds since the epoch from a SEG's content (or series) date and time, when it has them."""
    for d, t in (
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
    ):
        date, tm = str(ds.get(d, "") or ""), str(ds.get(t, "") or "")
        if len(date) == 8:
            tm = (tm.split(".")[0] + "000000")[:6]
            frac = float("0." + str(ds.get(t)).split(".")[1]) if "." in str(ds.get(t, "")) else 0.0
            try:
                return dt.datetime.strptime(date + tm, "%Y%m%d%H%M%S").timestamp() + frac
            except ValueError:
                continue
    return None


class PacsUnavailable(HTTPException):
    """503: the PACS did not answer; the detail says which and why.

    Args:
        url: the PACS's DICOMweb address.
        err: what the request raised.
    """

    def __init__(self, url: str, err: Exception):
        super().__init__(status_code=503, detail=f"the PACS at {url} is unreachable ({type(err).__name__}: {err})")


class PacsDatastore(LabelChecks, SafeDatastoreFile, DICOMWebDatastore):
    """A MONAI Label datastore over a PACS, with a local cache that keeps labels until they are uploaded.

    Args:
        client: the DICOMweb client of the PACS.
        search_filter: the QIDO-RS filter of the image series to serve (e.g. {"Modality": "MR"}).
        cache_path: the local cache folder (default: MONAI Label's, named after the PACS).
        default_names: name -> label value for SEGs and labels that name no structure.
        poll_seconds: how often the PACS is asked for new SEGs (at least 1).
        list_ttl: how long the image list is cached, in seconds.
    """

    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: dict[str, Any],
        cache_path: str | None = None,
        default_names: dict[str, int] | None = None,
        poll_seconds: float = 5.0,
        list_ttl: float = 10.0,
    ):
        super().__init__(client, search_filter, cache_path=cache_path, fetch_by_frame=False, convert_to_nifti=True)
        self.default_names = default_names or {}
        self.poll_seconds = max(1.0, float(poll_seconds))
        self.list_ttl = list_ttl
        self.on_label_imported: Callable[[str], None] | None = None  # set by the app: adapt after an import
        self._lock = threading.RLock()
        self._images: list[str] = []
        self._images_at = 0.0
        self._segs: dict[str, dict] = {}  # SEG series uid -> {"image", "time", "study"}
        self._stop = threading.Event()
        self._wake = threading.Event()  # a save to upload: poll now
        self._thread: threading.Thread | None = None
        self.state: dict[str, Any] = {
            "url": client.base_url,
            "reachable": None,
            "last_poll": None,
            "last_error": None,
            "imported": 0,
            "uploaded": 0,
        }

    @property
    def local_root(self) -> str:
        """The local cache (images as NIfTI, labels, the app's heads): the PACS stays the source."""
        return self._datastore_path

    # -- reading ------------------------------------------------------------------------------
    def _reach(self, fn: Callable, *args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except PACS_ERRORS as e:
            self.state.update(reachable=False, last_error=f"{type(e).__name__}: {e}")
            raise PacsUnavailable(self.state["url"], e) from e
        self.state.update(reachable=True)
        return out

    def remote_images(self, fresh: bool = False) -> list[str]:
        """The image series on the PACS (cached for `list_ttl` s unless `fresh`); raises PacsUnavailable.

        Args:
            fresh: ask the PACS even when the cached list is recent.
        """
        if not fresh and time.time() - self._images_at < self.list_ttl and self._images:
            return list(self._images)
        found = self._reach(self._client.search_for_series, search_filters=self._search_filter)
        self._images = sorted({str(Dataset.from_json(d)["SeriesInstanceUID"].value) for d in found})
        self._images_at = time.time()
        return list(self._images)

    def list_images(self) -> list[str]:
        """What the PACS holds; while it is down, what was last seen (or cached): the app keeps working
        on those, and new studies appear when it is back."""
        try:
            return self.remote_images()
        except PacsUnavailable:
            return list(self._images) or LocalDatastore.list_images(self)

    def get_image_uri(self, image_id: str) -> str:
        """The local NIfTI of an image series, fetched from the PACS the first time.

        Args:
            image_id: the series instance UID; 404 when the PACS does not hold it.
        """
        cached = os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")
        if os.path.exists(cached) and image_id in self._datastore.objects:
            return os.path.realpath(cached)
        if image_id not in self.remote_images(fresh=True):  # 503 while the PACS is down: it is not cached
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}: not on the PACS")
        with self._lock:
            return self._reach(super().get_image_uri, image_id)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """The images with a label in the local cache (where every label is kept first).

        Args:
            label_tag: only labels of this tag (None: any).
            labels: as MONAI Label's datastore takes it.
        """
        return LocalDatastore.get_labeled_images(self, label_tag, labels)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """The PACS's images without such a label.

        Args:
            label_tag: only labels of this tag count (None: any).
            labels: as MONAI Label's datastore takes it.
        """
        labelled = set(self.get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labelled]

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The local file of a label ("" when there is none).

        Args:
            label_id: the label (the image id for final labels).
            label_tag: "final" or another tag.
            image_id: unused (MONAI Label's signature).
        """
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """The labelled images of the local cache, as MONAI Label's training lists them.

        Args:
            full_path: absolute paths rather than names.
        """
        return LocalDatastore.datalist(self, full_path)

    def _image_files(self, image_id: str) -> list[str]:
        folder = Path(self._datastore.image_path()) / image_id
        files = sorted(str(p) for p in folder.glob("*.dcm"))
        if not files:  # cache cleaned: fetch the series again
            self._reach(dicom_web_download_series, None, image_id, str(folder), self._client, False)
            files = sorted(str(p) for p in folder.glob("*.dcm"))
        return files

    # -- writing ------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check and keep locally; the poller then stores it on the PACS as a SEG (retried while it is down).

        Args:
            image_id: the image.
            label_filename: the uploaded label file.
            label_tag: "final" (checked, uploaded) or another tag (kept locally).
            label_info: the save request's params (structure names, classes, ...).
        """
        image_uri = self.get_image_uri(image_id)  # 404 / 503 before anything is kept
        label_info = dict(label_info or {})
        if label_filename.endswith(".bin"):  # raw voxels on the image grid, as OHIF's MONAI Label panels send
            label_filename = binary_to_image(image_uri, label_filename)
        if label_tag != "final":
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        label_info["metaapp"] = self.check_label(image_id, label_filename, label_info)
        label_info["pacs"] = {"state": "pending", "source": "client"}
        with self._lock:
            label_id = LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        self._wake.set()  # the poller uploads it now: the save's reply does not wait for the PACS
        return label_id

    def _upload(self, image_id: str) -> bool:
        """Store the local final label of `image_id` on the PACS; False (kept pending) when it is down."""
        info = self.get_label_info(image_id, "final") or {}
        path = self.get_label_uri(image_id, "final")
        try:
            source = [read_dataset(f) for f in self._image_files(image_id)]
            label = read_image(path)
            identity = f"{image_id}/{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"
            seg = label_to_seg(label, info["metaapp"]["named"], source, identity=identity)
            self._reach(self._client.store_instances, [seg])
        except PacsUnavailable as e:
            logger.warning("label of %s kept locally, upload pending: %s", image_id, e.detail)
            return False
        seg_uid = str(seg.SeriesInstanceUID)
        self._segs[seg_uid] = {"image": image_id, "time": _dicom_time(seg) or time.time()}
        info["pacs"] = {"state": "stored", "seg": seg_uid, "time": self._segs[seg_uid]["time"], "source": "client"}
        self.update_label_info(image_id, "final", info)
        self.state["uploaded"] += 1
        logger.info("label of %s stored on the PACS as SEG %s", image_id, seg_uid)
        return True

    def pending(self) -> list[str]:
        """The images whose final label waits to be stored on the PACS."""
        return sorted(
            i
            for i in LocalDatastore.get_labeled_images(self)
            if ((self.get_label_info(i, "final") or {}).get("pacs") or {}).get("state") == "pending"
        )

    # -- the poller ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the poller (uploads pending labels, imports new SEGs); a second call does nothing."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pacs-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask the poller to stop (it ends within one poll)."""
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        down = False
        while not self._stop.is_set():
            try:
                self.poll()
                if down:
                    logger.info("the PACS at %s is back", self.state["url"])
                down = False
            except PacsUnavailable as e:
                if not down:
                    logger.warning("%s; retrying every %.0f s", e.detail, self.poll_seconds)
                down = True
            except Exception as e:  # keep polling: one bad SEG must not stop the others
                logger.exception("PACS poll failed")
                self.state["last_error"] = f"{type(e).__name__}: {e}"
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def poll(self) -> list[str]:
        """One pass: upload pending labels, then import newer SEGs. Returns the image ids imported."""
        for image_id in self.pending():
            with self._lock:
                self._upload(image_id)
        found = self._reach(self._client.search_for_series, search_filters={"Modality": "SEG"})
        now = time.time()
        for d in found:
            ds = Dataset.from_json(d)
            uid = str(ds.SeriesInstanceUID)
            if uid in self._segs:
                continue
            meta = self._reach(self._client.retrieve_series_metadata, str(ds.StudyInstanceUID), uid)
            first = Dataset.from_json(meta[0]) if meta else Dataset()
            self._segs[uid] = {
                "image": seg_referenced_series(first),
                "time": _dicom_time(first) or now,
                "study": str(ds.StudyInstanceUID),
            }
        newest: dict[str, tuple[float, str]] = {}
        for uid, s in self._segs.items():
            if s["image"] and (s["image"] not in newest or s["time"] > newest[s["image"]][0]):
                newest[s["image"]] = (s["time"], uid)
        imported = []
        images = set(self.list_images())
        for image_id, (when, uid) in sorted(newest.items()):
            if image_id not in images or when < 0:
                continue
            have = (self.get_label_info(image_id, "final") or {}).get("pacs") or {}
            if have.get("seg") == uid or (have and when <= have.get("time", 0)):
                continue
            if have.get("state") == "pending":
                continue  # a local save waits to be uploaded: it is the newer one
            with self._lock:
                if self._import(image_id, uid, when):
                    imported.append(image_id)
        self.state.update(last_poll=time.strftime("%Y-%m-%d %H:%M:%S"), segs_seen=len(self._segs))
        for image_id in imported:
            if self.on_label_imported:
                self.on_label_imported(image_id)
        return imported

    def _import(self, image_id: str, seg_uid: str, when: float) -> bool:
        """The SEG as the final label of `image_id`; False (and never retried) when it is not a usable label."""
        s = self._segs[seg_uid]
        study = s.get("study") or str(
            Dataset.from_json(
                self._client.search_for_series(search_filters={"SeriesInstanceUID": seg_uid})[0]
            ).StudyInstanceUID
        )
        seg = self._reach(self._client.retrieve_series, study, seg_uid)[0]
        reference = read_image(self.get_image_uri(image_id))
        label, names = seg_to_label(seg, reference)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{image_id}.nii.gz")
            sitk.WriteImage(label, path, useCompression=True)
            info: dict[str, Any] = {"label_info": [{"name": n, "idx": v} for n, v in names.items()]}
            try:
                info["metaapp"] = self.check_label(image_id, path, info)
            except HTTPException as e:
                logger.warning("SEG %s for %s ignored: %s", seg_uid, image_id, e.detail)
                info = None
            if info is None:
                self._segs[seg_uid]["time"] = -1.0  # never retried
                return False
            info["pacs"] = {"state": "stored", "seg": seg_uid, "time": when, "source": "pacs"}
            LocalDatastore.save_label(self, image_id, path, "final", info)
        self.state["imported"] += 1
        logger.info("SEG %s from the PACS is now the final label of %s: %s", seg_uid, image_id, sorted(names))
        return True

    def pacs_status(self) -> dict[str, Any]:
        """What /info/ shows under metaapp.pacs (MONAI Label's status() stays the datastore stats)."""
        return {**self.state, "poll_seconds": self.poll_seconds, "pending_uploads": self.pending()}
