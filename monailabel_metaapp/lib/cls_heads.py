"""Versioned, atomically written store of the classifier's task-specific layers.

One head per kind of example: `image` (whole images: an X-ray, a whole volume) and `region`
(a segmented structure or a box of a 3D study). Layout under the store folder:
  registry.json              heads: classes (row order of W), examples per class, version, state, times
  <kind>/v0003.pt            the head's parameters {"W0": (C, D0), "b0": (C,), "W1": ...} (plain,
                             weights_only-loadable; rows in the order of `classes`)
A restart reloads every head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from monailabel_metaapp.lib.heads import ADAPTING, FAILED, NEW, QUEUED, READY, VersionedStore, now_iso

KINDS = ("image", "region")
NEEDS_TWO = "needs examples of 2 classes"
__all__ = ["ADAPTING", "FAILED", "KINDS", "NEEDS_TWO", "NEW", "QUEUED", "READY", "ClsHead", "ClsHeadStore"]


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

    def _record(self, kind: str) -> dict:
        return self.registry.setdefault(
            kind, {"version": 0, "versions": [], "classes": [], "examples": {}, "state": NEW, "updated": now_iso()}
        )

    def snapshot(self) -> dict[str, dict]:
        """Per head: its classes, examples per class, version, state (what /info/ shows)."""
        keys = ("version", "classes", "examples", "n_examples", "state", "updated", "adapt_seconds", "error")
        with self._lock:
            return {
                kind: {k: rec[k] for k in keys if k in rec} | {"n_examples": sum(rec.get("examples", {}).values())}
                for kind, rec in self.registry.items()
            }

    def publish(self, kind: str, head: ClsHead) -> int:
        """Write the head as a new version, then make it live."""
        with self._lock:
            rec = self._record(kind)
            weights = {k: v.detach().cpu().contiguous() for k, v in head.params.items()}
            version = self._write_version(kind, rec, weights)
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
            self._heads[kind] = ClsHead(weights, list(head.classes), dict(head.counts), head.seconds)
            self._save_registry()
            return version

    def retire(self, kind: str, examples: dict[str, int], state: str) -> None:
        """No usable head any more (a correction removed left fewer than 2 classes): stop serving it."""
        with self._lock:
            rec = self._record(kind)
            rec.update(examples=dict(examples), state=state, updated=now_iso())
            self._heads.pop(kind, None)
            self._save_registry()

    def _path(self, kind: str, version: int) -> Path:
        return self.folder / kind / f"v{version:04d}.pt"

    def _load(self, kind: str, version: int) -> ClsHead:
        params = torch.load(self._path(kind, version), map_location="cpu", weights_only=True)
        meta = self.registry[kind].get("by_version", {}).get(str(version), {})
        return ClsHead(params, list(meta.get("classes", [])), dict(meta.get("examples", {})))
