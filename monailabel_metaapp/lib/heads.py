"""Versioned, atomically written store of adapted heads, one per structure.

Layout under the store folder:
  registry.json              structures: value, current version, labels learned from, state, times
  <slug>/v0003.pt            a head's parameters (plain state_dict, weights_only-loadable)
  <slug>/v0004.encoder.pt    a refined version's own encoder weights (plain state_dict)
A version is a quick head (stage `head`, on the shared encoder) or a refined network (`refined`).
A restart reloads every head; `rollback` points a structure back at an earlier version.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import torch

from monailabel_metaapp.core.adaptation import Head
from monailabel_metaapp.core.checkpoint import atomic_write, save_json

READY, QUEUED, ADAPTING, FAILED, NEW = "ready", "queued", "adapting", "failed", "no head yet"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "structure"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class VersionedStore:
    """Heads written atomically as numbered versions, with a JSON registry beside them; reloaded on
    restart. Thread-safe: the adaptation worker writes while inference threads read. Subclasses
    say how a record starts (`_record`), where a version lives (`_path`) and how it loads (`_load`)."""

    registry_key = "structures"

    def __init__(self, folder: str | Path, names: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._heads: dict = {}
        reg = self.folder / "registry.json"
        self.registry: dict[str, dict] = json.loads(reg.read_text())[self.registry_key] if reg.exists() else {}
        for name in names:
            self._record(name)
        for name, rec in self.registry.items():
            if rec.get("version"):
                self._heads[name] = self._load(name, rec["version"])
            if rec.get("state") in (QUEUED, ADAPTING):  # interrupted by a restart
                rec["state"] = READY if rec.get("version") else NEW

    def _record(self, name: str) -> dict:
        raise NotImplementedError

    def _path(self, name: str, version: int) -> Path:
        raise NotImplementedError

    def _load(self, name: str, version: int):
        raise NotImplementedError

    def set_state(self, name: str, state: str, error: str | None = None) -> None:
        with self._lock:
            rec = self._record(name)
            rec["state"] = state
            rec["updated"] = now_iso()
            if error:
                rec["error"] = error
            else:
                rec.pop("error", None)
            self._save_registry()

    def heads(self) -> dict:
        """A consistent copy of the live heads (each swapped in whole, never half-written)."""
        with self._lock:
            return dict(self._heads)

    def _write_version(self, name: str, rec: dict, weights: dict[str, torch.Tensor]) -> int:
        """Write `weights` as the next version of `name` (atomically) and list it in its record."""
        version = max(rec["versions"], default=0) + 1
        atomic_write(self._path(name, version), lambda p: torch.save(weights, p))
        rec["versions"].append(version)
        return version

    def _save_registry(self) -> None:
        save_json(self.folder / "registry.json", {self.registry_key: self.registry})


class HeadStore(VersionedStore):
    def _record(self, name: str) -> dict:
        return self.ensure(name)

    # -- structures -------------------------------------------------------------------------
    def ensure(self, name: str, value: int | None = None) -> dict:
        """Register a structure. Its output value is `value` when free and 1..255 (results are uint8,
        as Slicer asks), else the next free one; a never-seen name gets the next free value."""
        with self._lock:
            if name not in self.registry:
                used = {r["value"] for r in self.registry.values()}
                if value is None or value in used or not 0 < value < 256:
                    value = next(v for v in range(1, 256) if v not in used)
                self.registry[name] = {
                    "value": int(value),
                    "version": 0,
                    "versions": [],
                    "n_labels": 0,
                    "state": NEW,
                    "updated": now_iso(),
                }
                self._save_registry()
            return self.registry[name]

    def labels(self) -> dict[str, int]:
        """name -> output label value, for every structure known."""
        with self._lock:
            return {n: r["value"] for n, r in sorted(self.registry.items(), key=lambda kv: kv[1]["value"])}

    def snapshot(self) -> dict[str, dict]:
        """Per structure: value, live version, its stage (`head` / `refined`) and held-out Dice, labels
        learned from, adaptation state, last change."""
        with self._lock:
            out = {}
            for n, r in self.registry.items():
                row = {k: r[k] for k in ("value", "version", "n_labels", "state", "updated") if k in r}
                live = r.get("version_info", {}).get(str(r.get("version", 0)), {})
                row["stage"] = live.get("stage", "head") if r.get("version") else None
                row["val_dice"] = live.get("val_dice")
                out[n] = row | ({"error": r["error"]} if "error" in r else {})
            return out

    # -- heads ------------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        head: Head,
        encoder: dict[str, torch.Tensor] | None = None,
        info: dict | None = None,
        live: bool = True,
    ) -> int:
        """Write the head (and a refined head's encoder weights) as a new version, then make it live
        (`live=False` keeps it for rollback only). `info` (e.g. a held-out Dice) is kept with the version."""
        with self._lock:
            rec = self.ensure(name)
            version = max(rec["versions"], default=0) + 1
            if encoder is not None:  # the encoder first: a listed version always has its weights
                atomic_write(self._encoder_path(name, version), lambda p: torch.save(encoder, p))
                head.encoder_file = str(self._encoder_path(name, version))
            self._write_version(name, rec, head.state_dict())
            meta = {"stage": head.stage, "n_labels": head.n_labels, "created": now_iso(), **(info or {})}
            rec.setdefault("version_info", {})[str(version)] = meta
            rec.setdefault("n_labels_by_version", {})[str(version)] = head.n_labels
            if live:
                # a save that arrived during this adaptation has queued the structure again: keep saying so
                rec.update(
                    version=version,
                    n_labels=head.n_labels,
                    state=QUEUED if rec.get("state") == QUEUED else READY,
                    updated=now_iso(),
                    adapt_seconds=round(head.seconds, 3),
                )
                rec.pop("error", None)
                self._heads[name] = head
            self._save_registry()
            return version

    def version_info(self, name: str, version: int | None = None) -> dict:
        """What is known of a version (default: the live one): stage, labels, held-out Dice."""
        with self._lock:
            rec = self.registry.get(name, {})
            v = rec.get("version", 0) if version is None else version
            return dict(rec.get("version_info", {}).get(str(v), {"stage": "head"} if v else {}))

    def rollback(self, name: str, version: int | None = None) -> int:
        """Make an earlier version live again (default: the one before the current)."""
        with self._lock:
            if name not in self.registry:
                raise KeyError(f"unknown structure {name!r}")
            rec = self.registry[name]
            older = [v for v in rec["versions"] if v < rec["version"]]
            target = version if version is not None else (max(older) if older else None)
            if target is None or target not in rec["versions"]:
                raise ValueError(f"{name!r} has no version {target} to roll back to (versions: {rec['versions']})")
            head = self._load(name, target)
            self._heads[name] = head
            rec.update(version=target, n_labels=head.n_labels, state=READY, updated=now_iso())
            self._save_registry()
            return target

    def _path(self, name: str, version: int) -> Path:
        return self.folder / slug(name) / f"v{version:04d}.pt"

    def _encoder_path(self, name: str, version: int) -> Path:
        return self.folder / slug(name) / f"v{version:04d}.encoder.pt"

    def _load(self, name: str, version: int) -> Head:
        params = torch.load(self._path(name, version), map_location="cpu", weights_only=True)
        rec = self.registry.get(name, {})
        n = rec.get("n_labels_by_version", {}).get(str(version), 0)
        stage = rec.get("version_info", {}).get(str(version), {}).get("stage", "head")
        enc = self._encoder_path(name, version)
        return Head(
            params=params, n_labels=int(n), seconds=0.0, stage=stage, encoder_file=str(enc) if enc.exists() else None
        )
