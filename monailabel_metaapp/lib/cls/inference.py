"""Classification on the live classifier: the classes of one example (`classify`) and of every
structure of a segmentation result (`classify_regions`). `ClsService` mixes it in; it reads the
service's live classifier and heads (`live`, `heads`) and its examples' views (`regions`, `views`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import SimpleITK as sitk

from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.lib.cls.classifier import Classifier
from monailabel_metaapp.lib.cls.heads import ClsHead

logger = logging.getLogger(__name__)

TEACH = (
    "teach it with PUT /metaapp/classes/{image_id} "
    '{"class": NAME[, "region": STRUCTURE | "roi": [x0,y0,z0,x1,y1,z1]][, "task": TASK]}, '
    'or MONAILabelClient.train_start("fewshot_cls", {"image": ID, "class": NAME, ...}), '
    'or a saved label whose label_info entries carry "class"'
)


class NoHead(LookupError):
    """The classifier cannot answer yet (no head for this task)."""


class ClsInference:
    """Class predictions of the live classifier's heads, mixed into `ClsService`."""

    def _head(self, task: str) -> tuple[Classifier, ClsHead, int]:
        """The live classifier, a task's head and its version (NoHead while the task has none)."""
        classifier, heads, snap = self.live()
        head, rec = heads.get(task), snap.get(task, {})
        if head is None:
            examples = rec.get("examples") or {}
            have = f"examples so far: {examples}" if examples else "no class examples yet"
            raise NoHead(f"the {task} classifier has no head yet ({have}; it needs 2 classes): {TEACH}")
        return classifier, head, int(rec.get("version", 0))

    def classify(self, image_id: str, region: str | None = None, roi: Any = None, task: str | None = None) -> dict:
        """{"prediction": [{"idx", "label", "score"}] (best first), "kind", "task", "head_version", ...}.

        Args:
            image_id: the image.
            region: a structure name (None: the whole image).
            roi: a box [x0, y0, z0, x1, y1, z1].
            task: a named task (None: the default task of the example's kind).
        """
        t0 = time.perf_counter()
        self.regions.image_path(image_id)
        kind = "image" if roi is None and region in (None, "", "image") else "region"
        task = kind if task in (None, "") else task
        self.heads.check(task, kind)
        classifier, head, version = self._head(task)
        rec = self.regions.describe(image_id, region, roi)
        out: dict[str, Any] = {"kind": kind, "task": task}
        if "roi" in rec:
            out["roi"] = rec["roi"]
        elif kind == "region":
            out |= {"region": rec["region"], "source": rec["source"]}
        out["prediction"] = classifier.predict(head, classifier.embed([self.views(image_id, rec)]))[0]
        out["head_version"] = version
        out["latency"] = round(time.perf_counter() - t0, 4)
        return out

    def classify_regions(self, path: str, label: sitk.Image, names: dict[str, int]) -> dict[str, dict]:
        """The classes of each segmented structure of a result label map, as segmentation result params:
        `classes` {name: {"label", "score", "idx"}} from the default region task and `task_classes`
        {task: {name: ...}} from the named ones; a task without a head adds nothing.

        Args:
            path: the image file.
            label: the segmentation result on the image's grid.
            names: name -> value of the structures in `label`.
        """
        classifier, live, _ = self.live()
        heads = {t: h for t, h in live.items() if self.heads.kind(t) == "region"}
        if not heads or not names:
            return {}
        arr = sitk.GetArrayViewFromImage(label)
        present = {n: v for n, v in names.items() if (arr == v).any()}
        views, order = [], []
        for name, value in present.items():
            try:
                views.append(self.regions.mask_views(path, label == value))
                order.append(name)
            except (ValueError, VolumeError) as e:
                logger.warning("no class for %s: %s", name, e)
        if not views:
            return {}
        feats = classifier.embed(views)
        by_task = {
            task: {name: dict(pred[0]) for name, pred in zip(order, classifier.predict(head, feats))}
            for task, head in sorted(heads.items())
        }
        out: dict[str, dict] = {"classes": by_task.pop("region")} if "region" in by_task else {}
        return out | ({"task_classes": by_task} if by_task else {})
