"""One store of adapted heads, for segmentation and classification alike.

Each named record (a structure, a classification task) keeps numbered versions of its head:
  registry.json          {registry_key: {name: {"version", "versions", "state", "updated", ...}}}
  <dirname>/v0003.pt     a version's parameters (plain state_dict, weights_only-loadable)
Writes are atomic (a crash never leaves half a file or half a registry). A restart reloads every
live head and repairs the states an interrupted adaptation left behind; a damaged head file or
registry is skipped (an earlier version serves, or the head re-adapts from its labels) and listed in
`problems`, and version numbers never go back. `publish` makes a new
version live, `rollback` an earlier one, `retire` stops serving a record without deleting anything.

Thread-safe: the adaptation worker publishes while inference threads read `heads()`; each head is
swapped in whole. A subclass says what a head is through the hooks marked below.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from monailabel_metaapp.core.checkpoint import save_json, save_torch

READY, QUEUED, ADAPTING, FAILED, NEW = "ready", "queued", "adapting", "failed", "no head yet"
logger = logging.getLogger(__name__)

H = TypeVar("H")


def slug(name: str) -> str:
    """A folder name for a record name: lower-case letters, digits and `_`.

    Args:
        name: any record name, such as "LV blood pool".
    """
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "structure"


def now_iso() -> str:
    """The local time as the registry writes it (ISO 8601 with offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class VersionedStore(Generic[H]):
    """Heads written atomically as numbered versions, with a JSON registry beside them.

    Args:
        folder: where the registry and the version files live (created when absent).
        names: records to create up front (e.g. a classifier's default tasks).

    Class attributes a subclass may set: `registry_key` (the registry's top-level key), `noun`
    (what a record is called in errors), `snapshot_keys` (the record fields `snapshot` shows) and
    `seconds_digits` (how `adapt_seconds` is rounded).
    """

    registry_key = "records"
    noun = "record"
    snapshot_keys: tuple[str, ...] = ("version", "state", "updated", "adapt_seconds", "error")
    seconds_digits = 3

    def __init__(self, folder: str | Path, names: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._heads: dict[str, H] = {}
        self.problems: list[str] = []  # what start-up found damaged and what it did about it (for /info/)
        self.registry: dict[str, dict] = self._read_registry(self.folder / "registry.json")
        for rec_name, rec in self.registry.items():
            self._upgrade(rec_name, rec)
        for name in names:
            self.record(name)
        for rec_name, rec in self.registry.items():
            if rec.get("version"):
                self._load_live(rec_name, rec)
            if rec.get("state") in (QUEUED, ADAPTING):  # interrupted by a restart
                rec["state"] = READY if rec.get("version") else NEW
        if self.problems:
            self._save_registry()

    def _note(self, problem: str) -> None:
        logger.error("%s: %s", self.folder, problem)
        self.problems.append(problem)

    def _read_registry(self, reg: Path) -> dict[str, dict]:
        """The registry's records; a damaged registry is moved aside and the store starts without it
        (heads re-adapt from their labels, and version numbers go on from the files on disk)."""
        if not reg.exists():
            return {}
        try:
            records = json.loads(reg.read_text())[self.registry_key]
            if not isinstance(records, dict):
                raise TypeError(f"{self.registry_key!r} is not an object")
            return records
        except (ValueError, KeyError, TypeError) as e:
            aside = reg.with_name(f"{reg.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(reg, aside)
            self._note(f"registry.json could not be read ({e}); moved to {aside.name}; records start again")
            return {}

    def _load_live(self, name: str, rec: dict) -> None:
        """Serve the live version of `name`, or the newest earlier one that loads when its file is
        damaged; with none, the record has no head (and re-adapts from its labels)."""
        for version in sorted((v for v in rec.get("versions", []) if v <= rec["version"]), reverse=True):
            try:
                head = self.load(name, version)
            except Exception as e:  # a truncated or foreign file: skip it, never fail the start-up
                self._note(f"{self.noun} {name!r} version {version} could not be read ({type(e).__name__}); skipped")
                continue
            self._heads[name] = head
            if version != rec["version"]:
                rec.update(version=version, state=READY, updated=now_iso(), **self._fields(head))
            return
        rec.update(version=0, state=NEW, updated=now_iso())

    # -- hooks --------------------------------------------------------------------------------
    def _new_record(self, name: str, **init: Any) -> dict:
        """The fields a new record starts with besides version, versions, state and updated."""
        return dict(init)

    def _upgrade(self, name: str, rec: dict) -> None:
        """Fill in what a record read from an older registry lacks (default: nothing)."""

    def _weights(self, head: H) -> dict[str, torch.Tensor]:
        """The parameters of a head to write (default: its `params`, detached, on the CPU)."""
        return {k: v.detach().cpu().contiguous() for k, v in head.params.items()}  # type: ignore[attr-defined]

    def _fields(self, head: H) -> dict[str, Any]:
        """Record fields that describe the live head (e.g. labels learned from); also kept per version."""
        return {}

    def _from_weights(self, name: str, version: int, weights: dict[str, torch.Tensor]) -> H:
        """A head from a version's parameters and its per-version metadata (`version_meta`)."""
        raise NotImplementedError

    def _live(self, head: H, weights: dict[str, torch.Tensor]) -> H:
        """What `heads()` serves once `head` is published as `weights` (default: the head itself)."""
        return head

    def _remember_version(self, rec: dict, version: int, head: H) -> None:
        """Keep per-version metadata in the record, so a rollback or a restart restores it."""
        rec.setdefault("by_version", {})[str(version)] = self._fields(head)

    def dirname(self, name: str) -> str:
        """The folder of a record's versions (default: `slug(name)`).

        Args:
            name: the record.
        """
        return slug(name)

    # -- records ------------------------------------------------------------------------------
    def record(self, name: str, **init: Any) -> dict:
        """The registry record of `name`, created (and saved) when new.

        Args:
            name: the record.
            init: passed to `_new_record` when the record is new (e.g. a requested label value).
        """
        with self._lock:
            if name not in self.registry:
                rec = {"version": 0, "versions": [], "state": NEW, "updated": now_iso()}
                self.registry[name] = self._new_record(name, **init) | rec
                self._save_registry()
            return self.registry[name]

    def set_state(self, name: str, state: str, error: str | None = None) -> None:
        """Record an adaptation state (queued, adapting, failed, ...) and its error, if any.

        Args:
            name: the record.
            state: one of READY, QUEUED, ADAPTING, FAILED, NEW or a subclass's own.
            error: why it failed; None clears a previous error.
        """
        with self._lock:
            rec = self.record(name)
            rec["state"] = state
            rec["updated"] = now_iso()
            if error:
                rec["error"] = error
            else:
                rec.pop("error", None)
            try:
                self._save_registry()
            except OSError as e:  # a state is bookkeeping: served from memory, written with the next version
                logger.warning("%s: state of %r not written (%s)", self.folder, name, e)

    def snapshot(self) -> dict[str, dict]:
        """Per record, the fields named by `snapshot_keys` plus `_summary` (what /info/ shows)."""
        with self._lock:
            return {
                n: {k: r[k] for k in self.snapshot_keys if k in r} | self._summary(r) for n, r in self.registry.items()
            }

    def _summary(self, rec: dict) -> dict[str, Any]:
        """Derived fields `snapshot` adds to a record (default: none)."""
        return {}

    def version_meta(self, name: str, version: int) -> dict[str, Any]:
        """The per-version metadata kept when `version` of `name` was published ({} when none).

        Args:
            name: the record.
            version: one of its versions.
        """
        with self._lock:
            return dict(self.registry.get(name, {}).get("by_version", {}).get(str(version), {}))

    # -- heads --------------------------------------------------------------------------------
    def heads(self) -> dict[str, H]:
        """A consistent copy of the live heads (each swapped in whole, never half-written)."""
        with self._lock:
            return dict(self._heads)

    def path(self, name: str, version: int) -> Path:
        """The file of one version of a record.

        Args:
            name: the record.
            version: the version number (1, 2, ...).
        """
        return self.folder / self.dirname(name) / f"v{version:04d}.pt"

    def load(self, name: str, version: int) -> H:
        """Read one version of a record's head from its file.

        Args:
            name: the record.
            version: the version number.
        """
        weights = torch.load(self.path(name, version), map_location="cpu", weights_only=True)
        return self._from_weights(name, version, weights)

    def publish(self, name: str, head: H, info: dict[str, Any] | None = None, live: bool = True) -> int:
        """Write `head` as the next version of `name` (atomically), then make it live.

        A save that arrived during the adaptation has queued the record again: it stays queued.

        Args:
            name: the record (created when new).
            head: the adapted head; its `seconds` (adaptation time) is recorded when it has one.
            info: more per-version metadata to keep (e.g. a held-out score).
            live: False keeps the version for a rollback without serving it.

        Returns:
            The new version number.
        """
        with self._lock:
            rec = self.record(name)
            weights = self._weights(head)
            version = self.next_version(name)
            save_torch(self.path(name, version), weights)
            rec["versions"].append(version)
            self._remember_version(rec, version, head)
            if info:
                rec.setdefault("by_version", {}).setdefault(str(version), {}).update(info)
            if live:
                rec.update(
                    version=version,
                    state=QUEUED if rec.get("state") == QUEUED else READY,
                    updated=now_iso(),
                    adapt_seconds=round(float(getattr(head, "seconds", 0.0)), self.seconds_digits),
                    **self._fields(head),
                )
                rec.pop("error", None)
                self._heads[name] = self._live(head, weights)
            self._save_registry()
            return version

    def next_version(self, name: str) -> int:
        """The number the next published version of `name` gets.

        Args:
            name: the record.
        """
        with self._lock:
            known = self.registry.get(name, {}).get("versions", [])
            files = (self.folder / self.dirname(name)).glob("v*.pt")
            on_disk = [int(m[1]) for f in files if (m := re.fullmatch(r"v(\d+)\.pt", f.name))]
            return max(known + on_disk, default=0) + 1  # never back, even after a registry was lost

    def rollback(self, name: str, version: int | None = None) -> int:
        """Make an earlier version live again.

        Args:
            name: the record.
            version: the version to serve; None: the one before the current.

        Returns:
            The version now live. Raises KeyError for an unknown record, ValueError for a missing version.
        """
        with self._lock:
            if name not in self.registry:
                raise KeyError(f"unknown {self.noun} {name!r}")
            rec = self.registry[name]
            older = [v for v in rec["versions"] if v < rec["version"]]
            target = version if version is not None else (max(older) if older else None)
            if target is None or target not in rec["versions"]:
                raise ValueError(f"{name!r} has no version {target} to roll back to (versions: {rec['versions']})")
            try:
                head = self.load(name, target)
            except Exception as e:
                raise ValueError(f"version {target} of {name!r} cannot be read ({type(e).__name__}: {e})") from e
            self._heads[name] = head
            rec.update(version=target, state=READY, updated=now_iso(), **self._fields(head))
            self._save_registry()
            return target

    def retire(self, name: str, state: str, **fields: Any) -> None:
        """Stop serving `name` (no usable head any more); its versions stay on disk for a rollback.

        Args:
            name: the record.
            state: the state that says why (e.g. "needs examples of 2 classes").
            fields: record fields to update with it (e.g. the examples left).
        """
        with self._lock:
            rec = self.record(name)
            rec.update(fields, state=state, updated=now_iso())
            self._heads.pop(name, None)
            self._save_registry()

    def _save_registry(self) -> None:
        save_json(self.folder / "registry.json", {self.registry_key: self.registry})
