"""Versioned, atomically written store of adapted heads, one per structure.

Layout under the store folder:
  registry.json              structures: value, current version, labels learned from, state, times
  <slug>/v0003.pt            a head's parameters (plain state_dict, weights_only-loadable)
  <slug>/v0004.encoder.pt    a refined version's own encoder weights (plain state_dict)
A version is a quick head (stage `head`, on the shared encoder) or a refined network (`refined`).
A restart reloads every head; `rollback` points a structure back at an earlier version.
"""

from __future__ import annotations

from pathlib import Path

import torch

from monailabel_metaapp.core.adaptation import Head
from monailabel_metaapp.core.checkpoint import save_torch
from monailabel_metaapp.lib.versioned_store import VersionedStore, now_iso


class HeadStore(VersionedStore[Head]):
    """One adapted head per structure, each version a quick head or a refined network.

    Args:
        folder: where the registry and the versions live (`<store>/heads`).
    """

    registry_key, noun = "structures", "structure"
    snapshot_keys = ("value", "version", "n_labels", "state", "updated", "error")

    # -- structures -------------------------------------------------------------------------
    def _new_record(self, name: str, value: int | None = None) -> dict:
        used = {r["value"] for r in self.registry.values()}
        if value is None or value in used or not 0 < value < 256:
            value = next((v for v in range(1, 256) if v not in used), None)
            if value is None:
                raise ValueError(f"no label value left for {name!r}: 255 structures already have one")
        return {"value": int(value), "n_labels": 0}

    def ensure(self, name: str, value: int | None = None) -> dict:
        """Register a structure. Its output value is `value` when free and 1..255 (results are uint8,
        as Slicer asks), else the next free one; a never-seen name gets the next free value.

        Args:
            name: the structure.
            value: the label value it is saved with, if any.
        """
        return self.record(name, value=value)

    def labels(self) -> dict[str, int]:
        """name -> output label value, for every structure known."""
        with self._lock:
            return {n: r["value"] for n, r in sorted(self.registry.items(), key=lambda kv: kv[1]["value"])}

    def _upgrade(self, name: str, rec: dict) -> None:
        """Registries written before per-version metadata kept only each version's label count."""
        for v, n in rec.pop("n_labels_by_version", {}).items():
            rec.setdefault("by_version", {}).setdefault(v, {"stage": "head", "n_labels": n})

    def _summary(self, rec: dict) -> dict:
        """The live version's stage (`head` / `refined`), held-out Dice and, for a refined one, where its
        network started (`warm`: the meta-learned weights, `fresh`: fresh ones)."""
        live = rec.get("by_version", {}).get(str(rec.get("version", 0)), {})
        stage = live.get("stage", "head") if rec.get("version") else None
        return {"stage": stage, "val_dice": live.get("val_dice"), "start": live.get("start")}

    def version_info(self, name: str, version: int | None = None) -> dict:
        """What is known of a version (default: the live one): stage, labels, held-out Dice.

        Args:
            name: the structure.
            version: one of its versions.
        """
        with self._lock:
            v = self.registry.get(name, {}).get("version", 0) if version is None else version
            return self.version_meta(name, v)

    # -- heads ------------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        head: Head,
        encoder: dict[str, torch.Tensor] | None = None,
        info: dict | None = None,
        live: bool = True,
    ) -> int:
        """Write the head (and a refined head's encoder weights, first) as a new version.

        Args:
            name: the structure.
            head: the adapted head.
            encoder: a refined network's encoder weights (None for a quick head).
            info: kept with the version (e.g. its held-out Dice).
            live: False keeps the version for a rollback without serving it.
        """
        with self._lock:
            if encoder is not None:  # first: a listed version always has its encoder
                path = self._encoder_path(name, self.next_version(name))
                save_torch(path, encoder)
                head.encoder_file = str(path)
            return super().publish(name, head, info=info, live=live)

    def _weights(self, head: Head) -> dict[str, torch.Tensor]:
        return head.state_dict()

    def _fields(self, head: Head) -> dict:
        return {"n_labels": head.n_labels}

    def _remember_version(self, rec: dict, version: int, head: Head) -> None:
        meta = {"stage": head.stage, "n_labels": head.n_labels, "created": now_iso()}
        rec.setdefault("by_version", {})[str(version)] = meta

    def _encoder_path(self, name: str, version: int) -> Path:
        return self.folder / self.dirname(name) / f"v{version:04d}.encoder.pt"

    def _from_weights(self, name: str, version: int, weights: dict[str, torch.Tensor]) -> Head:
        meta = self.version_meta(name, version)
        enc = self._encoder_path(name, version)
        return Head(
            params=weights,
            n_labels=int(meta.get("n_labels", 0)),
            seconds=0.0,
            stage=meta.get("stage", "head"),
            encoder_file=str(enc) if enc.exists() else None,
        )
