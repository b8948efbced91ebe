"""Versioned, atomically written store of the classifier's task-specific layers.

One head per classification task. Every task classifies one kind of example: `image` (whole
images: an X-ray, a whole volume) or `region` (a segmented structure or a box of a 3D study). The
default tasks are named after their kind (`image`, `region`); named tasks (e.g. `malignancy` and
`tumour_type` on the same lesions) each have their own classes and head. Layout under the store folder:
  registry.json              heads: kind, classes (row order of W), examples per class, version, state, times
  <task>/v0003.pt            the head's parameters {"W0": (C, D0), "b0": (C,), "W1": ...} (plain,
                             weights_only-loadable; rows in the order of `classes`)
A restart reloads every head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monailabel_metaapp.lib.versioned_store import ADAPTING, FAILED, NEW, QUEUED, READY, VersionedStore

KINDS = ("image", "region")
NEEDS_TWO = "needs examples of 2 classes"
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
__all__ = [
    "ADAPTING",
    "FAILED",
    "KINDS",
    "NEEDS_TWO",
    "NEW",
    "QUEUED",
    "READY",
    "ClsHead",
    "ClsHeadStore",
    "check_task_name",
]


def check_task_name(task: object) -> str:
    """A task name is also its head's folder: lower-case letters, digits, `_` and `-` (64 at most).

    Args:
        task: the name to check; returned as it is when valid, else ValueError.
    """
    if not isinstance(task, str) or not TASK_NAME.fullmatch(task):
        raise ValueError(
            f'"task" must be lower-case letters, digits, "_" or "-" (at most 64), such as "malignancy" '
            f'or "tumour_type"; got {task!r}'
        )
    return task


@dataclass
class ClsHead:
    """One task's adapted classifier layers.

    Args:
        params: the layers' parameters {"W0", "b0", ...}.
        classes: the class of each row of every W.
        counts: examples per class it learned from.
        seconds: how long its adaptation took.
    """

    params: dict[str, torch.Tensor]
    classes: list[str]  # row i of every W is classes[i]
    counts: dict[str, int] = field(default_factory=dict)  # examples per class learned from
    seconds: float = 0.0


class ClsHeadStore(VersionedStore[ClsHead]):
    """The classifier heads, one record per task, with the kind of example each task classifies.

    Args:
        folder: where the registry and the versions live.
    """

    registry_key = "heads"
    noun = "task"
    snapshot_keys = ("kind", "version", "classes", "examples", "state", "updated", "adapt_seconds", "error")
    seconds_digits = 4

    def __init__(self, folder: str | Path):
        super().__init__(folder, names=KINDS)

    def _new_record(self, task: str, kind: str | None = None, **init: Any) -> dict:
        return {"classes": [], "examples": {}, "kind": kind or (task if task in KINDS else "region")}

    def _upgrade(self, task: str, rec: dict) -> None:
        rec.setdefault("kind", task if task in KINDS else "region")  # older registries: only the default tasks

    def _fields(self, head: ClsHead) -> dict[str, Any]:
        return {"classes": list(head.classes), "examples": dict(head.counts)}

    def _live(self, head: ClsHead, weights: dict[str, torch.Tensor]) -> ClsHead:
        return ClsHead(weights, list(head.classes), dict(head.counts), head.seconds)

    def _from_weights(self, task: str, version: int, weights: dict[str, torch.Tensor]) -> ClsHead:
        meta = self.version_meta(task, version)
        return ClsHead(weights, list(meta.get("classes", [])), dict(meta.get("examples", {})))

    def _summary(self, rec: dict) -> dict[str, Any]:
        return {"n_examples": sum(rec.get("examples", {}).values())}

    def dirname(self, task: str) -> str:
        """A task's folder: its name, already checked to be one (`check_task_name`).

        Args:
            task: the task name.
        """
        return task  # a checked task name is already a folder name

    def check(self, task: str, kind: str) -> None:
        """Raise ValueError unless `task` is a valid name that classifies `kind` (or is new).

        Args:
            task: the task name.
            kind: `image` or `region`.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_task_name(task)
        have = self.kind(task)
        if have is not None and have != kind:
            what = {"image": "whole images (send no region or roi)", "region": "regions (send a region or a roi)"}
            raise ValueError(f"task {task!r} classifies {what[have]}")

    def register(self, task: str, kind: str) -> None:
        """Make sure `task` exists and classifies `kind`; a task keeps the kind of its first example.

        Args:
            task: the task name.
            kind: `image` or `region`.
        """
        with self._lock:
            self.check(task, kind)
            self.record(task, kind=kind)

    def kind(self, task: str) -> str | None:
        """The kind of example a task classifies (None: no such task yet).

        Args:
            task: the task name.
        """
        with self._lock:
            return self.registry[task]["kind"] if task in self.registry else None
