"""Class corrections, kept in the datastore's image info (`datastore_v2.json`).

  metaapp_classes: {KEY: {"class", "kind", "task", "source": image|label|prediction|roi, "region"?, "roi"?, "ts"}}
KEY is "image", a structure name or "roi:x0,y0,z0,x1,y1,z1" for a default task, and "TASK/" + that
for a named task (corrections stored before named tasks have no "task": their kind's default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from monailabel_metaapp.core.errors import VolumeError

INFO_KEY = "metaapp_classes"


def roi_key(roi: list[int]) -> str:
    """The key of a box correction.

    Args:
        roi: [x0, y0, z0, x1, y1, z1] voxel indices.
    """
    return "roi:" + ",".join(str(int(v)) for v in roi)


def task_of(rec: dict) -> str:
    """The task a stored correction teaches (one stored before named tasks: its kind's default).

    Args:
        rec: a stored correction.
    """
    return rec.get("task") or rec["kind"]


def label_classes(info: dict[str, Any]) -> dict[str, Any]:
    """The classes a saved final label carries: structure name -> class, or -> {task: class}.

    Args:
        info: the label's datastore info; read from `label_info: [{"name", "idx", "class"}]` and
            `classes: {name: class}` (the latter wins).
    """
    classes = {}
    for it in info.get("label_info") or []:
        if isinstance(it, dict) and it.get("name") is not None and it.get("class"):
            classes[str(it["name"]).strip()] = it["class"]
    if isinstance(info.get("classes"), dict):
        classes.update({str(k).strip(): v for k, v in info["classes"].items()})
    return classes


def store_label_classes(
    classes: dict[str, Any], named: dict[str, int], correct: Callable[[str, str, str | None], dict]
) -> dict[str, Any]:
    """Store the classes a saved label carries as region corrections; say what was stored and refused.

    Args:
        classes: structure name -> class, or -> {task: class} (`label_classes`).
        named: the structures of the saved label.
        correct: stores one correction (structure, class, task or None), as `ClsService.correct`.
    """
    stored: dict[str, Any] = {}
    refused: dict[str, str] = {}
    adapting: set[str] = set()
    for name, cls in classes.items():
        if name not in named:
            refused[name] = "not a structure of this label"
            continue
        for task, c in cls.items() if isinstance(cls, dict) else [(None, cls)]:
            try:
                done = correct(name, c, task)
            except (LookupError, ValueError, VolumeError) as e:
                why = str(e.args[0] if isinstance(e, KeyError) else e)
                refused[name if task is None else f"{name} ({task})"] = why
                continue
            adapting.add(done["task"])
            if task is None:
                stored[name] = done["class"]
            else:
                stored.setdefault(name, {})[task] = done["class"]
    return {"classes": stored, "refused": refused, "adapting": sorted(adapting)}


class CorrectionStore:
    """Reads and writes the class corrections of a datastore's images.

    Args:
        datastore: the MONAI Label datastore whose image info holds them.
    """

    def __init__(self, datastore):
        self.datastore = datastore
        self._lock = threading.Lock()  # read-modify-write of an image's corrections

    def image_ids(self) -> list[str]:
        """Every image of the datastore, sorted."""
        return sorted(self.datastore.list_images())

    def of_image(self, image_id: str) -> dict[str, dict]:
        """key -> correction of one image.

        Args:
            image_id: the image.
        """
        return dict((self.datastore.get_image_info(image_id) or {}).get(INFO_KEY) or {})

    def put(self, image_id: str, key: str, rec: dict) -> None:
        """Store (or replace) one correction.

        Args:
            image_id: the image.
            key: its key (see the module's docstring).
            rec: the correction.
        """
        with self._lock:
            cur = self.of_image(image_id)
            cur[key] = rec
            self.datastore.update_image_info(image_id, {INFO_KEY: cur})

    def pop(self, image_id: str, key: str) -> dict:
        """Remove one correction and return it; KeyError when the image has none under `key`.

        Args:
            image_id: the image.
            key: the correction's key.
        """
        with self._lock:
            cur = self.of_image(image_id)
            if key not in cur:
                raise KeyError(f"{image_id!r} has no class correction {key!r} (it has {sorted(cur)})")
            rec = cur.pop(key)
            self.datastore.update_image_info(image_id, {INFO_KEY: cur})
        return rec

    def all(self) -> list[tuple[str, str, dict]]:
        """(image id, key, correction) of every stored class correction."""
        for attempt in range(3):
            try:
                with self._lock:
                    return [
                        (image_id, key, rec)
                        for image_id in self.image_ids()
                        for key, rec in sorted(self.of_image(image_id).items())
                        if rec.get("kind") and rec.get("class")
                    ]
            except RuntimeError:  # another writer (active-learning scores) changed an image's info meanwhile
                if attempt == 2:
                    raise
                time.sleep(0.05)
        return []

    def of_task(self, task: str) -> list[tuple[str, str, dict]]:
        """(image id, key, correction) of every stored correction of one task.

        Args:
            task: the task name.
        """
        return [e for e in self.all() if task_of(e[2]) == task]

    def by_task(self) -> dict[str, list[dict]]:
        """The stored corrections grouped by the task they teach."""
        out: dict[str, list[dict]] = {}
        for _, _, rec in self.all():
            out.setdefault(task_of(rec), []).append(rec)
        return out
