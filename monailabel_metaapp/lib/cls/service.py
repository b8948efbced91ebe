"""The app's classification runtime: the meta-learned classifier encoder (frozen) and its
task-specific heads, adapted in the background from the class corrections stored in the datastore.

Every classification task has its own head and classes. Each kind of example (`image`, `region`:
see `views.py`) has a default task named after it (an X-ray's classes are not a lesion's classes);
a correction or a request naming a `task` (e.g. `malignancy`, `tumour_type`) teaches or asks that
task instead, so one lesion can carry a class per task. A task classifies one kind of example, the
kind of its first correction. A correction of a structure that only a prediction outlines stores
the prediction's box, so the example does not move when the segmentation head changes later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from monailabel_metaapp.core.cls_model import DEFAULT_CLS_STEPS
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.lib.activity import GATE
from monailabel_metaapp.lib.adapt_queue import AdaptQueue
from monailabel_metaapp.lib.cls.classifier import Classifier
from monailabel_metaapp.lib.cls.corrections import CorrectionStore, label_classes, store_label_classes, task_of
from monailabel_metaapp.lib.cls.heads import NEEDS_TWO, ClsHead, ClsHeadStore
from monailabel_metaapp.lib.cls.inference import TEACH, ClsInference
from monailabel_metaapp.lib.cls.views import RegionViews
from monailabel_metaapp.lib.label_names import final_label_structures

logger = logging.getLogger(__name__)


class ClsService(ClsInference):
    """Class corrections in, adapted heads and class predictions out (the predictions: `ClsInference`).

    Args:
        datastore: the MONAI Label datastore (images, final labels, and the corrections in image info).
        store_dir: the heads go to `store_dir/cls`.
        model_path: the meta-trained classifier (default: the shipped `weights/metacls.pt`).
        device: "auto", "cpu", "cuda", ...
        steps: inner-loop steps of each adaptation.
        seg: the SegService whose labels name structures and whose predictions outline the others
            (None: the final labels' names only, and no predicted regions).
    """

    def __init__(
        self,
        datastore,
        store_dir: str | Path,
        model_path: str | Path | None = None,
        device: str = "auto",
        steps: int = DEFAULT_CLS_STEPS,
        seg=None,
    ):
        self.datastore = datastore
        self.classifier = cl = Classifier(model_path, device, steps)
        self.device, self.model_path, self.model, self.steps = cl.device, cl.model_path, cl.model, steps
        self.size, self.seg = self.model.cfg.size, seg
        self._model_lock = threading.Lock()  # the classifier and its heads change together
        self.heads = ClsHeadStore(Path(store_dir) / "cls")
        self.store = CorrectionStore(datastore)
        self.regions = RegionViews(datastore, self.size, self.model.cfg.image_crop, self.label_structures, seg)
        self._views, self._stacks = self.regions.cache, self.regions.stacks  # what a latency benchmark clears
        self.id_of = self.regions.id_of  # infer requests carry the image's path
        self.queue = AdaptQueue(self._adapt, self.heads.set_state)

    # -- the datastore --------------------------------------------------------------------------
    def image_ids(self) -> list[str]:
        """Every image of the datastore, sorted."""
        return self.store.image_ids()

    def corrections(self, image_id: str) -> dict[str, dict]:
        """key -> stored correction of one image.

        Args:
            image_id: the image.
        """
        return self.store.of_image(image_id)

    def examples(self, task: str) -> list[tuple[str, str, dict]]:
        """(image id, key, correction) of every stored correction of one task.

        Args:
            task: the task name.
        """
        return self.store.of_task(task)

    def tasks(self) -> dict[str, str]:
        """task -> kind, for every task with a head record or a stored correction."""
        found = {task: recs[0]["kind"] for task, recs in self.store.by_task().items()}
        return {t: rec["kind"] for t, rec in self.heads.snapshot().items()} | found

    def label_structures(self, image_id: str) -> dict[str, int]:
        """name -> value of the structures in an image's final label (none without one).

        Args:
            image_id: the image.
        """
        if not self.datastore.get_label_uri(image_id, "final"):
            return {}
        if self.seg is not None:
            return self.seg.label_structures(image_id)
        return final_label_structures(self.datastore, image_id, getattr(self.datastore, "default_names", {}))

    def views(self, image_id: str, rec: dict) -> torch.Tensor:
        """The classifier's input for a stored correction (see `RegionViews.views`).

        Args:
            image_id: the image.
            rec: the correction.
        """
        return self.regions.views(image_id, rec)

    # -- corrections ----------------------------------------------------------------------------
    def correct(
        self, image_id: str, cls: Any, region: str | None = None, roi: Any = None, task: str | None = None
    ) -> dict:
        """Store one class correction and queue the adaptation of its task's head; the reply comes at once.

        Args:
            image_id: the image.
            cls: the class name.
            region: a structure name (None: the whole image).
            roi: a box [x0, y0, z0, x1, y1, z1].
            task: a named task (None: the default task of the example's kind).
        """
        if not isinstance(cls, str) or not cls.strip() or len(cls) > 128:
            raise ValueError(f'"class" must be a non-empty class name (at most 128 characters), got {cls!r}')
        key, rec = self.regions.resolve(image_id, region, roi)
        task = rec["kind"] if task in (None, "") else task
        self.heads.check(task, rec["kind"])  # a valid name, of this kind
        if task != rec["kind"]:
            key = f"{task}/{key}"
        rec.update({"class": cls.strip(), "task": task, "ts": int(time.time())})
        self.views(image_id, rec)  # refuse now what could never be learned from (empty region, unreadable)
        self.heads.register(task, rec["kind"])
        self.store.put(image_id, key, rec)
        queued = self.queue.submit([task])
        logger.info("class correction: %s %s -> %s (%s, task %s)", image_id, key, rec["class"], rec["source"], task)
        return {"image": image_id, "key": key, **rec, "adapting": queued}

    def remove(self, image_id: str, key: str) -> dict:
        """Drop one stored correction and queue the re-adaptation of its task.

        Args:
            image_id: the image.
            key: the correction's key, as `correct` replied it.
        """
        self.regions.image_path(image_id)
        rec = self.store.pop(image_id, key)
        return {"image": image_id, "key": key, "removed": rec, "adapting": self.queue.submit([task_of(rec)])}

    def on_label_saved(self, image_id: str) -> dict:
        """Classes carried by a saved final label -> region corrections of its named structures:
        `label_info: [{"name", "idx", "class"}]` or `classes: {name: class}`, where a class is a name
        (the default region task) or `{task: class, ...}` (named tasks, e.g. malignancy and type).

        Args:
            image_id: the image whose final label was saved.
        """
        info = self.datastore.get_label_info(image_id, "final") or {}
        classes = label_classes(info)
        if not classes:
            return {}
        named = (info.get("metaapp") or {}).get("named") or self.label_structures(image_id)
        return store_label_classes(classes, named, lambda name, c, task: self.correct(image_id, c, name, task=task))

    # -- the live classifier ----------------------------------------------------------------------
    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Examples -> features under the live classifier (`Classifier.embed`).

        Args:
            views: one tensor of views per example.
        """
        return self.classifier.embed(views)

    def predict(self, head: ClsHead, feats: torch.Tensor) -> list[list[dict]]:
        """Features -> classes with the live classifier (`Classifier.predict`).

        Args:
            head: a task's head.
            feats: the examples' features.
        """
        return self.classifier.predict(head, feats)

    def live(self) -> tuple[Classifier, dict[str, ClsHead], dict[str, dict]]:
        """The live classifier, its heads and their records, read together: every head in it was
        adapted on that classifier's encoder."""
        with self._model_lock:
            return self.classifier, self.heads.heads(), self.heads.snapshot()

    def install_encoder(self, path: str | Path) -> dict[str, int]:
        """Make a new classifier encoder live together with heads adapted on it. Every task's head is
        adapted on the new encoder first, then encoder and heads swap in one step, so inference never
        pairs an encoder with a head adapted on another.

        Args:
            path: the new classifier's weights.

        Returns:
            task -> new head version.
        """
        new = Classifier(path, str(self.device), self.steps)
        heads = {}
        for task in sorted(self.heads.heads()):
            with GATE.busy():
                views, names = self._examples(task)
                if len(set(names)) >= 2:
                    t0 = time.perf_counter()
                    heads[task] = new.fit(views, names)
                    heads[task].seconds = time.perf_counter() - t0
        with self._model_lock:
            self.classifier, self.model, self.model_path = new, new.model, new.model_path
            versions = {task: self.heads.publish(task, head) for task, head in heads.items()}
            for task in set(self.heads.heads()) - set(heads):  # no head is served on another encoder
                self.heads.retire(task, NEEDS_TWO)
        logger.info("classifier encoder %s is live; heads re-adapted on it: %s", path, versions)
        return versions

    # -- adaptation -------------------------------------------------------------------------------
    def adapt_all(self) -> list[str]:
        """Queue the re-adaptation of every task that has stored corrections."""
        return self.queue.submit(sorted(self.store.by_task()))

    def sync(self) -> list[str]:
        """At start-up: adapt the heads whose stored corrections differ from what they learned from,
        or that another classifier model made (the app's weights changed)."""
        snap, live = self.heads.snapshot(), self.heads.heads()
        stale = []
        for task, recs in sorted(self.store.by_task().items()):
            try:
                self.heads.register(task, recs[0]["kind"])  # a registry lost or older than the corrections
            except ValueError as e:
                logger.warning("class corrections of task %r not learned from: %s", task, e)
                continue
            counts = dict(Counter(rec["class"] for rec in recs))
            foreign = task in live and not self.classifier.matches(live[task])
            if foreign or counts != snap.get(task, {}).get("examples"):
                stale.append(task)
        return self.queue.submit(stale)

    def _examples(self, task: str) -> tuple[list[torch.Tensor], list[str]]:
        """(views, class) of every usable stored correction of one task."""
        views, names = [], []
        for image_id, key, rec in self.examples(task):
            try:
                views.append(self.views(image_id, rec))
                names.append(rec["class"])
            except (LookupError, ValueError, VolumeError) as e:
                logger.warning("class correction %s %s skipped: %s", image_id, key, e)
        return views, names

    def _adapt(self, task: str) -> None:
        t0 = time.perf_counter()
        views, names = self._examples(task)
        if len(set(names)) < 2:
            counts = dict(sorted(Counter(names).items()))
            self.heads.retire(task, NEEDS_TWO, examples=counts)
            logger.info("%s classifier: examples of %s only; %s", task, sorted(counts), NEEDS_TWO)
            return
        classifier = self.classifier
        head = classifier.fit(views, names)
        fit_seconds, head.seconds = head.seconds, time.perf_counter() - t0
        with self._model_lock:
            if self.classifier is not classifier:  # a new encoder went live meanwhile: adapt on it
                self.queue.submit([task])
                return
            version = self.heads.publish(task, head)
        logger.info(
            "%s classifier adapted on %d examples of %d classes in %.3f s (embed + head %.3f s) -> version %d",
            *(task, len(names), len(head.classes), head.seconds, fit_seconds, version),
        )

    def memory(self) -> dict[str, dict]:
        """What the classifier's caches hold, with their bounds (`/info/` `metaapp.memory`)."""
        return {"views": self.regions.cache.stats(), "region_stacks": self.regions.stacks.stats()}

    def status(self) -> dict:
        """What /info/ shows of the classifier: device, model, heads, and how to teach it."""
        return {
            "device": str(self.device),
            "model": self.model_path,
            "heads": self.heads.snapshot(),
            "teach": TEACH,
        }
