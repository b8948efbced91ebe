"""The app's segmentation runtime: one meta-trained encoder, one adapted head per structure.

The encoder is frozen in the app, so a study's embeddings never change: they are cached, and
adaptation after a save only re-reads the new label and runs a few head steps."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.adaptation import DEFAULT_ADAPT_STEPS, Head, SegAdapter, probabilities_to_labels
from monailabel_metaapp.core.checkpoint import load_model, pick_device
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.volume import SliceGeometry, label_slices, read_image, stack_to_original, to_slices
from monailabel_metaapp.lib.adapt_queue import AdaptQueue
from monailabel_metaapp.lib.heads import HeadStore
from monailabel_metaapp.lib.label_names import named_values, split_named

logger = logging.getLogger(__name__)


class StudyCache:
    """LRU of (slices, geometry, embeddings) per image file, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make) -> tuple:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        item = make()
        with self._lock:
            self._items[key] = item
            while (
                sum(i[2].numel() * i[2].element_size() for i in self._items.values()) > self.max_bytes
                and len(self._items) > 1
            ):
                self._items.popitem(last=False)
        return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class SegService:
    def __init__(
        self,
        datastore,
        store_dir: str | Path,
        model_path: str | None = None,
        device: str = "auto",
        steps: int = DEFAULT_ADAPT_STEPS,
        cache_mb: int = 2048,
        default_names: dict[str, int] | None = None,
    ):
        self.datastore = datastore
        self.device = pick_device(device)
        self.site_model = Path(store_dir) / "model" / "metaseg.pt"  # written by the meta-train task
        self.model_path = model_path
        self._model_stamp = self._stamp()
        self.adapter = SegAdapter(load_model(model_path), self.device, steps=steps)
        self._model_lock = threading.Lock()
        self.default_names = default_names or {}
        self.heads = HeadStore(Path(store_dir) / "heads")
        for name, value in self.default_names.items():
            self.heads.ensure(name, value)
        self.cache = StudyCache(cache_mb * 2**20)
        self.queue = AdaptQueue(self._adapt, self.heads.set_state)
        self.listeners: list[Callable[[str], None]] = []  # called with a structure name as its head changes

    @property
    def model_id(self) -> str:
        """Which encoder embeddings come from: scores and caches computed under another one are stale."""
        return f"{self.model_path}@{self._model_stamp}"

    def notify(self, name: str) -> None:
        for listener in self.listeners:
            try:
                listener(name)
            except Exception:
                logger.exception("listener failed after %s changed", name)

    def _stamp(self) -> float | None:
        return self.site_model.stat().st_mtime if self.site_model.exists() else None

    def refresh_model(self) -> bool:
        """Switch to newly meta-trained site weights: new encoder, so drop embeddings, re-adapt every head."""
        stamp = self._stamp()
        if stamp is None or stamp == self._model_stamp:
            return False
        with self._model_lock:
            if stamp == self._model_stamp:
                return False
            self.adapter = SegAdapter(load_model(self.site_model), self.device, steps=self.adapter.steps)
            self.model_path, self._model_stamp = str(self.site_model), stamp
            self.cache.clear()
        logger.info("new meta-trained weights %s: re-adapting every head", self.site_model)
        self.adapt_all()
        return True

    # -- study preparation ------------------------------------------------------------------
    def study(self, path: str) -> tuple[torch.Tensor, SliceGeometry, torch.Tensor]:
        """Slices, geometry and (half-precision, CPU) embeddings of one image, cached by file + mtime."""
        key = (os.path.realpath(path), os.path.getmtime(path))

        def make():
            stack, geom = to_slices(read_image(path), self.adapter.size)
            feats = self.adapter.embed(stack).to("cpu", torch.float16)
            return stack, geom, feats

        return self.cache.get(key, make)

    # -- labels in the datastore ------------------------------------------------------------
    def label_structures(self, image_id: str) -> dict[str, int]:
        """name -> value of the named structures in an image's final label."""
        info = self.datastore.get_label_info(image_id, "final") or {}
        checked = info.get("metaapp")
        if checked:
            return dict(checked["named"])
        names = named_values(info, self.default_names)
        path = self.datastore.get_label_uri(image_id, "final")
        values = [int(v) for v in np.unique(sitk.GetArrayFromImage(read_image(path))) if v > 0]
        return split_named(values, names)[0]

    def labelled_structures(self) -> dict[str, list[tuple[str, int]]]:
        """structure name -> [(image id, value)] over every final label in the datastore."""
        out: dict[str, list[tuple[str, int]]] = {}
        for image_id in sorted(self.datastore.get_labeled_images()):
            try:
                for name, value in self.label_structures(image_id).items():
                    out.setdefault(name, []).append((image_id, value))
            except VolumeError as e:
                logger.warning("skipping the label of %s: %s", image_id, e)
        return out

    # -- adaptation -------------------------------------------------------------------------
    def on_label_saved(self, image_id: str) -> dict:
        """Called on PUT /datastore/label: queue adaptation of each structure in it, reply at once."""
        info = self.datastore.get_label_info(image_id, "final") or {}
        checked = info.get("metaapp") or {"named": self.label_structures(image_id), "unnamed": []}
        for name in checked["named"]:
            self.heads.ensure(name, checked["named"][name] if name not in self.heads.registry else None)
        queued = self.queue.submit(sorted(checked["named"]))
        return {"adapting": queued, "ignored_values": checked.get("unnamed", [])}

    def adapt_all(self) -> list[str]:
        """Queue every structure that has labels (POST /train quick adaptation, start-up sync)."""
        names = sorted(self.labelled_structures())
        for n in names:
            self.heads.ensure(n)
        return self.queue.submit(names)

    def sync(self) -> list[str]:
        """At start-up: adapt structures whose head is missing or learned from fewer labels than exist."""
        snap = self.heads.snapshot()
        stale = [
            n
            for n, items in self.labelled_structures().items()
            if snap.get(n, {}).get("version", 0) == 0 or snap[n].get("n_labels") != len(items)
        ]
        for n in stale:
            self.heads.ensure(n)
        return self.queue.submit(stale)

    def _adapt(self, name: str) -> None:
        self.refresh_model()
        items = self.labelled_structures().get(name, [])
        if not items:
            raise VolumeError(f"no final label holds {name!r}")
        stacks, masks, feats = [], [], []
        for image_id, value in items:
            stack, geom, f = self.study(self.datastore.get_image_uri(image_id))
            lbl = label_slices(read_image(self.datastore.get_label_uri(image_id, "final")), geom, self.adapter.size)
            stacks.append(stack)
            masks.append(lbl == value)
            feats.append(f.float())
        head = self.adapter.adapt(stacks, masks, feats=feats)
        # listeners first: the scorer then waits for this adaptation to end, so a client that sees the
        # new version never sees the old scores marked fresh
        self.notify(name)
        version = self.heads.publish(name, head)
        logger.info("adapted %s from %d label(s) in %.2f s -> version %d", name, len(items), head.seconds, version)

    # -- inference --------------------------------------------------------------------------
    def infer(self, path: str, structures: list[str] | None = None) -> tuple[sitk.Image, dict]:
        """Label image on the original grid + result parameters (names, versions, timing)."""
        t0 = time.perf_counter()
        self.refresh_model()
        stack, geom, feats = self.study(path)
        live = self.heads.heads()
        labels = self.heads.labels()
        names = [n for n in (structures or labels) if n in live]
        if structures:
            unknown = [n for n in structures if n not in labels]
            if unknown:
                raise KeyError(f"unknown structure(s) {unknown}; known: {sorted(labels)}")
        params: dict = {"label_names": {n: labels[n] for n in names}, "head_versions": {}}
        if not names:
            out = np.zeros(sitk.GetArrayViewFromImage(geom.reference).shape, np.uint8)
            params["message"] = "no structure has an adapted head yet: save a label to teach one"
        else:
            heads: list[Head] = [live[n] for n in names]
            probs = self.adapter.predict(stack, heads, feats=feats.float())
            out = probabilities_to_labels(
                stack_to_original(probs, geom), [labels[n] for n in names], one_piece=[h.one_piece for h in heads]
            )
            snap = self.heads.snapshot()
            params["head_versions"] = {n: snap[n]["version"] for n in names}
        img = sitk.GetImageFromArray(out)
        img.CopyInformation(geom.reference)
        params["latencies"] = {"total": round(time.perf_counter() - t0, 3)}
        return img, params
