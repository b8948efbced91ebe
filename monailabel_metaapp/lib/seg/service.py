"""The app's segmentation runtime: one meta-trained encoder, one adapted head per structure.

The encoder is frozen in the app, so a study's embeddings never change: they are cached, and
adaptation after a save only re-reads the new label and runs a few head steps."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from monailabel_metaapp.core.adaptation import DEFAULT_ADAPT_STEPS, Head, SegAdapter
from monailabel_metaapp.core.checkpoint import load_model, pick_device
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.refine import RefineConfig
from monailabel_metaapp.core.volume import SliceGeometry, label_slices, read_image, to_slices
from monailabel_metaapp.lib.activity import GATE
from monailabel_metaapp.lib.adapt_queue import AdaptQueue
from monailabel_metaapp.lib.label_names import final_label_structures
from monailabel_metaapp.lib.lru import LRU, tensor_bytes
from monailabel_metaapp.lib.seg.clicks import ClickCorrections
from monailabel_metaapp.lib.seg.heads import HeadStore
from monailabel_metaapp.lib.seg.inference import SegInference
from monailabel_metaapp.lib.seg.refinement import RefinementWorker

logger = logging.getLogger(__name__)


class SegService(SegInference):
    """The segmentation runtime of the app: the live encoder, one versioned head per structure, the
    adaptation queue that runs after each save and the background refinement after it (inference:
    `SegInference`).

    Args:
        datastore: MONAI Label datastore holding the images and their final labels.
        store_dir: where heads, refinement checkpoints and site weights live (`<studies>/.metaapp`).
        model_path: encoder weights (default: the shipped checkpoint).
        device: `auto`, `cpu` or `cuda`.
        steps: inner-loop steps of a quick head adaptation.
        cache_mb: bound of the cache of studies' slices and embeddings.
        default_names: structure name -> label value known before any save (`labels.json`).
        refine: settings of the background refinement; None turns it off.
        unseen: structures that refine from fresh weights, new to the encoder (True: every one).
        refined_in_ram: refined encoders kept in memory at once (the others load from disk on demand).
    """

    def __init__(
        self,
        datastore,
        store_dir: str | Path,
        model_path: str | None = None,
        device: str = "auto",
        steps: int = DEFAULT_ADAPT_STEPS,
        cache_mb: int = 2048,
        default_names: dict[str, int] | None = None,
        refine: RefineConfig | None = None,
        unseen: bool | frozenset[str] = frozenset(),
        refined_in_ram: int = 4,
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
        self.cache: LRU[tuple] = LRU(max_bytes=cache_mb * 2**20, size=lambda item: tensor_bytes(item[-1]))
        self.refined: LRU[SegAdapter] = LRU(max_items=max(1, refined_in_ram))  # encoder file -> adapter
        self.queue = AdaptQueue(self._adapt, self.heads.set_state)
        self.listeners: list[Callable[[str], None]] = []  # called with a structure name as its head changes
        self.shown: LRU[torch.Tensor] = LRU(max_items=16)  # (image path, structure, version) -> mask inferred
        self.clicks = ClickCorrections(self)  # per-study copies of heads that the annotators' points adapt
        self.refinement = RefinementWorker(
            self, Path(store_dir) / "refine", refine or RefineConfig(), refine is not None, unseen
        )

    @property
    def model_id(self) -> str:
        """Which encoder embeddings come from: scores and caches computed under another one are stale."""
        return f"{self.model_path}@{self._model_stamp}"

    def structures(self) -> dict[str, dict]:
        """Per structure: the live version (stage, held-out Dice, labels) and its refinement."""
        refining = self.refinement.status()
        return {n: row | {"refinement": refining.get(n)} for n, row in self.heads.snapshot().items()}

    def memory(self) -> dict[str, dict]:
        """What the service's caches hold, with their bounds (`/info/` `metaapp.memory`)."""
        return {
            "studies": self.cache.stats(),
            "refined_encoders": self.refined.stats(),
            "shown_masks": self.shown.stats(),
            "click_copies": self.clicks.copies.stats(),
        }

    def notify(self, name: str) -> None:
        for listener in self.listeners:
            try:
                listener(name)
            except Exception:
                logger.exception("listener failed after %s changed", name)

    def _stamp(self) -> float | None:
        return self.site_model.stat().st_mtime if self.site_model.exists() else None

    def refresh_model(self) -> bool:
        """Switch to newly meta-trained site weights (written by the meta-train task)."""
        stamp = self._stamp()
        if stamp is None or stamp == self._model_stamp:
            return False
        self._model_stamp = stamp
        logger.info("new meta-trained weights %s: re-adapting every head", self.site_model)
        self.install_encoder(self.site_model)
        return True

    def live(self) -> tuple[SegAdapter, dict[str, Head]]:
        """The live encoder and heads, read together: every head in it was adapted on that encoder."""
        with self._model_lock:
            return self.adapter, self.heads.heads()

    def install_encoder(self, path: str | Path) -> dict[str, int]:
        """Make a new encoder live together with heads adapted on it. Every structure's head is adapted
        on the new encoder first, then encoder and heads swap in one step, so inference never pairs
        an encoder with a head adapted on another. Returns structure -> new head version."""
        adapter = SegAdapter(load_model(path), self.device, steps=self.adapter.steps)
        new_heads = {}
        for name, items in self.labelled_structures().items():
            with GATE.busy():
                stacks, masks = self.support(items, adapter)
                new_heads[name] = adapter.adapt(stacks, masks)
        with self._model_lock:
            self.adapter, self.model_path = adapter, str(path)
            versions = {n: self.heads.publish(n, h) for n, h in new_heads.items()}
        self.cache.clear()
        for name in new_heads:
            self.notify(name)
            self.refinement.submit(name)
        logger.info("encoder %s is live; heads re-adapted on it: %s", path, versions)
        return versions

    # -- study preparation ------------------------------------------------------------------
    def study(
        self, path: str, adapter: SegAdapter | None = None, encoder: str = ""
    ) -> tuple[torch.Tensor, SliceGeometry, torch.Tensor]:
        """Slices, geometry and (half-precision, CPU) embeddings of one image under `adapter` (default:
        the live one), cached by file, modification time and encoder (`encoder` names a refined one)."""
        adapter = adapter or self.adapter
        key = (os.path.realpath(path), os.path.getmtime(path), encoder or id(adapter.model))

        def make():
            stack, geom = to_slices(read_image(path), adapter.size)
            feats = adapter.embed(stack).to("cpu", torch.float16)
            return stack, geom, feats

        return self.cache.get(key, make)

    def support(self, items: list[tuple[str, int]], adapter: SegAdapter) -> tuple[list, list]:
        """(image stacks, binary masks) of a structure's labelled studies [(image id, value)]."""
        stacks, masks = [], []
        for image_id, value in items:
            path = self.datastore.get_image_uri(image_id)
            stack, geom = to_slices(read_image(path), adapter.size)
            lbl = label_slices(read_image(self.datastore.get_label_uri(image_id, "final")), geom, adapter.size)
            stacks.append(stack)
            masks.append(lbl == value)
        return stacks, masks

    def labelled(self, items: list[tuple[str, int]], adapter: SegAdapter) -> tuple[list, list, list]:
        """(slices, binary masks, cached embeddings) of a structure's labelled studies [(image id, value)]
        under `adapter`: what a head adapts from."""
        stacks, masks, feats = [], [], []
        for image_id, value in items:
            stack, geom, f = self.study(self.datastore.get_image_uri(image_id), adapter)
            lbl = label_slices(read_image(self.datastore.get_label_uri(image_id, "final")), geom, adapter.size)
            stacks.append(stack)
            masks.append(lbl == value)
            feats.append(f)
        return stacks, masks, feats

    # -- labels in the datastore ------------------------------------------------------------
    def label_structures(self, image_id: str) -> dict[str, int]:
        """name -> value of the named structures in an image's final label."""
        return final_label_structures(self.datastore, image_id, self.default_names)

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
        names, refused = [], {}
        for name in checked["named"]:
            try:
                self.heads.ensure(name, checked["named"][name] if name not in self.heads.registry else None)
                names.append(name)
            except ValueError as e:  # stored, but not learned from: say so
                refused[name] = str(e)
        self.clicks.forget(image_id)  # the saved label now teaches the head
        queued = self.queue.submit(sorted(names))
        reply = {"adapting": queued, "ignored_values": checked.get("unnamed", [])}
        return reply | {"refused": refused} if refused else reply

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
        with GATE.busy():
            adapter, _ = self.live()
            stacks, masks, feats = self.labelled(items, adapter)
            head = adapter.adapt(stacks, masks, feats=feats)  # half precision: adapt casts the slices it takes
            # listeners first: the scorer then waits for this adaptation to end, so a client that sees the
            # new version never sees the old scores marked fresh
            self.notify(name)
            with self._model_lock:
                if adapter is not self.adapter:  # the encoder changed meanwhile: adapt again on the new one
                    self.queue.submit([name])
                    return
                version = self.heads.publish(name, head)
        logger.info("adapted %s from %d label(s) in %.2f s -> version %d", name, len(items), head.seconds, version)
        self.refinement.submit(name)
