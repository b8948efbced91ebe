"""A LocalDatastore that checks a label *before* storing it, so a bad upload never replaces a
good label: unknown image -> 404; unreadable file, geometry mismatch, empty mask, non-integer
values or no named structure -> 422 with the reason."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from monailabel_metaapp.core.checkpoint import atomic_write
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.volume import read_image, same_geometry
from monailabel_metaapp.lib.label_names import named_values, split_named

logger = logging.getLogger(__name__)
MAX_STRUCTURES_PER_LABEL = 255  # structures take label values 1-255 in the app's label maps
NAME_OK = re.compile(r"[^/\\\x00-\x1f\x7f]{1,128}")  # a structure name: no path separator, no control character
TAG_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a label tag names a folder under labels/


def image_header(path: str) -> sitk.Image:
    """Geometry of an image without reading its voxels, so checking a label stays cheap.

    Args:
        path: the image file or DICOM folder (a DICOM folder, or any image that is not 3D, is read whole).

    Returns:
        An image with the size, spacing, origin and direction of `path` (uint8 voxels, not the image's).
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return read_image(path)
    img = sitk.Image([int(s) for s in reader.GetSize()][:3] + [1] * (3 - reader.GetDimension()), sitk.sitkUInt8)
    if reader.GetDimension() == 3:
        img.SetSpacing(reader.GetSpacing())
        img.SetOrigin(reader.GetOrigin())
        img.SetDirection(reader.GetDirection())
    else:
        return read_image(path)
    return img


def requested_image(request: dict) -> str:
    """The image file of an infer request (MONAI Label has resolved the id, a session or an upload to
    it); 404 when there is none. That an `image` id names a datastore image is checked by the
    infer route (`lib/offload.py`).

    Args:
        request: the infer request.
    """
    path = request.get("image") or ""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise HTTPException(status_code=404, detail=f"image not found in the datastore: {path or '(unknown id)'}")
    return path


class LabelChecks:
    """The checks shared by the folder datastore and the PACS one (mixed into a LocalDatastore).

    `default_names` (name -> value) is used when a save request names none of the label's values.
    """

    default_names: dict[str, int] = {}

    def check_grid(self, image_id: str, label_filename: str) -> sitk.Image:
        """The uploaded label, read, when it is an image on the study's grid; 422 with the reason if not."""
        try:
            lbl = read_image(label_filename)
        except VolumeError as e:
            raise HTTPException(status_code=422, detail=f"label for {image_id}: {e}; nothing was stored") from e
        image = image_header(self.get_image_uri(image_id))
        if not same_geometry(lbl, image):
            raise HTTPException(
                status_code=422,
                detail=(
                    f"label for {image_id} does not lie on its image grid: label size {lbl.GetSize()}, spacing "
                    f"{np.round(lbl.GetSpacing(), 3).tolist()}, origin {np.round(lbl.GetOrigin(), 2).tolist()}; "
                    f"image size "
                    f"{image.GetSize()}, spacing {np.round(image.GetSpacing(), 3).tolist()}, origin "
                    f"{np.round(image.GetOrigin(), 2).tolist()}; nothing was stored"
                ),
            )
        return lbl

    def check_label(self, image_id: str, label_filename: str, label_info: dict[str, Any]) -> dict[str, Any]:
        """Check a label before it is stored, so a bad upload never replaces a good label.

        Args:
            image_id: the image the label belongs to.
            label_filename: the uploaded label file.
            label_info: the save request's params (`label_info` or `label_names` name its values;
                without them `default_names` is used).

        Returns:
            ``{"named": {name: value}, "unnamed": [values]}`` for the values present (unnamed ones are
            ignored, with a warning).

        Raises:
            HTTPException: 404 for an unknown image; 422 for an unreadable file, a label off the image
                grid, non-integer or negative values, an empty label, or no named value.
        """
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}: nothing was stored")
        lbl = self.check_grid(image_id, label_filename)
        arr = sitk.GetArrayViewFromImage(lbl)
        values = np.unique(arr)
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or np.any(values < 0):
            detail = f"label for {image_id} holds non-integer, negative or non-finite values; nothing was stored"
            raise HTTPException(status_code=422, detail=detail)
        values = [int(v) for v in values if v > 0]
        if not values:
            raise HTTPException(
                status_code=422, detail=f"label for {image_id} is empty (no voxel > 0); nothing was stored"
            )
        named, unnamed = split_named(values, named_values(label_info, self.default_names))
        if len(named) > MAX_STRUCTURES_PER_LABEL:
            detail = f"label for {image_id} names {len(named)} structures; at most {MAX_STRUCTURES_PER_LABEL} per label"
            raise HTTPException(status_code=422, detail=detail + "; nothing was stored")
        bad = [n for n in named if not NAME_OK.fullmatch(n)]
        if bad:
            detail = f"label for {image_id}: structure names {bad[:5]} hold '/', '\\', control characters or are empty"
            raise HTTPException(status_code=422, detail=detail + "; nothing was stored")
        if not named:
            raise HTTPException(
                status_code=422,
                detail=(
                    f"label for {image_id}: values {values} have no structure name; send label_info "
                    '[{"name": ..., "idx": value}] (as 3D Slicer does) or label_names {name: value}; nothing was stored'
                ),
            )
        if unnamed:
            logger.warning("label for %s: values %s have no name and are ignored", image_id, unnamed)
        return {"named": named, "unnamed": unnamed}


class SafeDatastoreFile:
    """Atomic writes of MONAI Label's datastore file (mixed into a LocalDatastore, the PACS cache's too).

    MONAI Label rewrites datastore_v2.json in place, so a crash mid-write leaves half a file, and a damaged
    file stops the server at start-up. Here every write is atomic and a copy of the last good file is kept
    beside it; a damaged file is moved aside and the copy (or the folder itself) used. `problems` says
    what start-up found and did (for /info/).
    """

    def __init__(self, *args, **kwargs):
        self.problems: list[str] = []
        super().__init__(*args, **kwargs)

    def _update_datastore_file(self, lock=True):
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(self._datastore_config_path, lambda p: Path(p).write_text(text))
            atomic_write(self._datastore_config_path + ".bak", lambda p: Path(p).write_text(text))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _init_from_datastore_file(self, throw_exception=False):
        try:
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError as e:
            if not throw_exception:  # a reload while serving: keep what is in memory
                logger.error("datastore file unreadable, kept the one in memory: %s", e)
                return
            path = Path(self._datastore_config_path)
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            backup = path.with_name(path.name + ".bak")
            what = "rebuilt from the studies folder (class corrections and label info are lost)"
            if backup.exists():
                shutil.copy(backup, path)
                try:
                    super()._init_from_datastore_file(throw_exception=True)
                    what = f"restored from {backup.name}"
                except ValueError:
                    path.unlink()
            self.problems.append(f"{path.name} could not be read; moved to {aside.name}; {what}")
            logger.error("%s", self.problems[-1])


class ValidatingDatastore(LabelChecks, SafeDatastoreFile, LocalDatastore):
    """A folder datastore that checks every final label before storing it (see `LabelChecks`).

    Args:
        args: passed to `LocalDatastore`.
        default_names: name -> value used when a save request names no value (the folder's `labels.json`);
            default None (none).
        kwargs: passed to `LocalDatastore`.
    """

    def __init__(self, *args, default_names: dict[str, int] | None = None, **kwargs):
        self.saving = threading.local()  # the tag of the save this thread is handling
        super().__init__(*args, **kwargs)
        self.default_names = default_names or {}

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a label: a final one only once it passes `check_label` (the result is kept in its info
        under `metaapp`); any other tag only needs a known image.

        Args:
            image_id: the image the label belongs to.
            label_filename: the uploaded label file.
            label_tag: the label's tag ("final" is checked).
            label_info: the save request's params.

        Returns:
            The stored label's id.

        Raises:
            HTTPException: as `check_label`; 404 for an unknown image with any tag.
        """
        label_info = dict(label_info or {})
        if not TAG_OK.fullmatch(label_tag or "") or ".." in label_tag:
            raise HTTPException(status_code=422, detail=f"label tag {label_tag!r}: letters, digits, '_', '.', '-' only")
        self.saving.tag = label_tag  # the app reacts to final labels only (`MetaApp.on_save_label`)
        if label_tag == "final":
            label_info["metaapp"] = self.check_label(image_id, label_filename, label_info)
        elif image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}: nothing was stored")
        else:  # any other tag (a model's original output, a draft): still an image on the study's grid
            self.check_grid(image_id, label_filename)
        try:
            return self._store_label(image_id, label_filename, label_tag, label_info)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            detail = f"no space left where the datastore is ({self._datastore_path}): nothing was stored"
            raise HTTPException(status_code=507, detail=detail) from e

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """MONAI Label's `save_label`, all or nothing: the label file is replaced atomically, and when the
        datastore file cannot be written after it, the previous label (kept as a hard link, which costs
        no space) comes back."""
        obj = self._datastore.objects[image_id]
        _, ext = self._to_id(os.path.basename(label_filename))
        dest = Path(self._datastore.label_path(label_tag)) / self._filename(image_id, ext)
        previous = dest.with_name(f".{dest.name}.previous")
        with FileLock(self._lock_file):
            dest.parent.mkdir(parents=True, exist_ok=True)
            before = obj.labels.get(label_tag)
            if dest.exists():
                previous.unlink(missing_ok=True)
                os.link(dest, previous)
            try:
                atomic_write(dest, lambda p: shutil.copyfile(label_filename, p))
                info = label_info | {"ts": int(time.time()), "name": dest.name}
                obj.labels[label_tag] = DataModel(info=info, ext=ext)
                self._update_datastore_file(lock=False)
            except BaseException:
                if previous.exists() and dest.exists() and os.path.samefile(previous, dest):
                    previous.unlink()  # the label was never replaced (rename of a file onto itself does nothing)
                elif previous.exists():
                    os.replace(previous, dest)
                elif dest.exists() and before is None:
                    dest.unlink()
                if before is None:
                    obj.labels.pop(label_tag, None)
                else:
                    obj.labels[label_tag] = before
                raise
            previous.unlink(missing_ok=True)
        logger.info("label %s of %s stored: %s", label_tag, image_id, dest.name)
        return image_id
