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

import torch

from monailabel_metaapp.lib.heads import ADAPTING, FAILED, NEW, QUEUED, READY, VersionedStore, now_iso

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
    """A task name is also its head's folder: lower-case letters, digits, `_` and `-` (64 at most)."""
    if not isinstance(task, str) or not TASK_NAME.fullmatch(task):
        raise ValueError(
            f'"task" must be lower-case letters, digits, "_" or "-" (at most 64), such as "malignancy" '
            f'or "tumour_type"; got {task!r}'
        )
    return task


@dataclass
class ClsHead:
    params: dict[str, torch.Tensor]
    classes: list[str]  # row i of every W is classes[i]
    counts: dict[str, int] = field(default_factory=dict)  # examples per class learned from
    seconds: float = 0.0


class ClsHeadStore(VersionedStore):
    registry_key = "heads"

    def __init__(self, folder: str | Path):
        super().__init__(folder, names=KINDS)

    def _record(self, task: str) -> dict:
        rec = self.registry.setdefault(
            task, {"version": 0, "versions": [], "classes": [], "examples": {}, "state": NEW, "updated": now_iso()}
        )
        rec.setdefault("kind", task if task in KINDS else "region")  # older registries: only the default tasks
        return rec

    def check(self, task: str, kind: str) -> None:
        """Raise ValueError unless `task` is a valid name that classifies `kind` (or is new)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_task_name(task)
        have = self.kind(task)
        if have is not None and have != kind:
            what = {"image": "whole images (send no region or roi)", "region": "regions (send a region or a roi)"}
            raise ValueError(f"task {task!r} classifies {what[have]}")

    def register(self, task: str, kind: str) -> None:
        """Make sure `task` exists and classifies `kind`; a task keeps the kind of its first example."""
        with self._lock:
            self.check(task, kind)
            if task not in self.registry:
                self._record(task)["kind"] = kind
                self._save_registry()

    def kind(self, task: str) -> str | None:
        """The kind of example a task classifies (None: no such task yet)."""
        with self._lock:
            return self.registry[task]["kind"] if task in self.registry else None

    def snapshot(self) -> dict[str, dict]:
        """Per task: its kind, classes, examples per class, version, state (what /info/ shows)."""
        keys = ("kind", "version", "classes", "examples", "state", "updated", "adapt_seconds", "error")
        with self._lock:
            return {
                task: {k: rec[k] for k in keys if k in rec} | {"n_examples": sum(rec.get("examples", {}).values())}
                for task, rec in self.registry.items()
            }

    def publish(self, task: str, head: ClsHead) -> int:
        """Write the head as a new version, then make it live."""
        with self._lock:
            rec = self._record(task)
            weights = {k: v.detach().cpu().contiguous() for k, v in head.params.items()}
            version = self._write_version(task, rec, weights)
            rec.update(
                version=version,
                classes=list(head.classes),
                examples=dict(head.counts),
                state=QUEUED if rec.get("state") == QUEUED else READY,
                updated=now_iso(),
                adapt_seconds=round(head.seconds, 4),
            )
            rec.setdefault("by_version", {})[str(version)] = {"classes": list(head.classes), "examples": head.counts}
            rec.pop("error", None)
            self._heads[task] = ClsHead(weights, list(head.classes), dict(head.counts), head.seconds)
            self._save_registry()
            return version

    def retire(self, task: str, examples: dict[str, int], state: str) -> None:
        """No usable head any more (a correction removed left fewer than 2 classes): stop serving it."""
        with self._lock:
            rec = self._record(task)
            rec.update(examples=dict(examples), state=state, updated=now_iso())
            self._heads.pop(task, None)
            self._save_registry()

    def _path(self, task: str, version: int) -> Path:
        return self.folder / task / f"v{version:04d}.pt"

    def _load(self, task: str, version: int) -> ClsHead:
        params = torch.load(self._path(task, version), map_location="cpu", weights_only=True)
        meta = self.registry[task].get("by_version", {}).get(str(version), {})
        return ClsHead(params, list(meta.get("classes", [])), dict(meta.get("examples", {})))
