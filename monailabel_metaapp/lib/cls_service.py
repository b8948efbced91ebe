"""The app's classification runtime: the meta-learned classifier encoder (frozen) and its
task-specific heads, adapted in the background from the class corrections stored in the datastore.

What is classified:
* `image`: a whole image (a 2D X-ray: one view; a 3D volume: its three central orthogonal slices;
  each view the central part of its slice that the model was meta-trained on, its config's
  `image_crop`: 80% for the shipped classifier);
* `region`: a region of a study: a structure NAME (its mask in the image's final label, else the
  few-shot segmentation's prediction of it) or a box `roi = [x0, y0, z0, x1, y1, z1]` (voxel
  indices of the image, ends exclusive). A region is seen as crops of a few of its slices, the
  crops `region_set` meta-trains on.
Every classification task has its own head and classes. Each kind has a default task named after
it (`image`, `region`: an X-ray's classes are not a lesion's classes); a correction or a request
naming a `task` (e.g. `malignancy`, `tumour_type`) teaches or asks that task instead, so one lesion
can carry a class per task. A task classifies one kind of example, the kind of its first correction.

Class corrections live in the datastore's image info (`datastore_v2.json`):
  metaapp_classes: {KEY: {"class", "kind", "task", "source": image|label|prediction|roi, "region"?, "roi"?, "ts"}}
KEY is "image", a structure name or "roi:x0,y0,z0,x1,y1,z1" for a default task, and "TASK/" + that
for a named task (corrections stored before named tasks have no "task": their kind's default).
A correction of a structure that only a prediction outlines stores the prediction's box, so the
example does not move when the segmentation head changes later.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.checkpoint import load_cls_model, pick_device
from monailabel_metaapp.core.cls_data import region_views, to_views
from monailabel_metaapp.core.cls_model import adapt
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.volume import CANONICAL, label_slices, normalise_intensity, read_image, to_slices
from monailabel_metaapp.lib.adapt_queue import AdaptQueue
from monailabel_metaapp.lib.cls_heads import NEEDS_TWO, ClsHead, ClsHeadStore
from monailabel_metaapp.lib.label_names import named_values, split_named

logger = logging.getLogger(__name__)

DEFAULT_CLS_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "metacls.pt"
DEFAULT_CLS_STEPS = 20
INFO_KEY = "metaapp_classes"
REGION_GRID = 160  # regions are cut from slices resized to this (as the segmentation banks meta-trained on)
TEACH = (
    "teach it with PUT /metaapp/classes/{image_id} "
    '{"class": NAME[, "region": STRUCTURE | "roi": [x0,y0,z0,x1,y1,z1]][, "task": TASK]}, '
    'or MONAILabelClient.train_start("fewshot_cls", {"image": ID, "class": NAME, ...}), '
    'or a saved label whose label_info entries carry "class"'
)


class NoHead(LookupError):
    """The classifier cannot answer yet (no head for this task)."""


def roi_key(roi: list[int]) -> str:
    return "roi:" + ",".join(str(int(v)) for v in roi)


def task_of(rec: dict) -> str:
    """The task a stored correction teaches (one stored before named tasks: its kind's default)."""
    return rec.get("task") or rec["kind"]


def check_roi(roi: Any, size_xyz: tuple[int, ...]) -> list[int]:
    """[x0, y0, z0, x1, y1, z1] inside the image, each end after its start (a 2D image: z0 0, z1 1)."""
    if not isinstance(roi, (list, tuple)) or len(roi) != 6 or not all(isinstance(v, (int, float)) for v in roi):
        raise ValueError(f"roi must be [x0, y0, z0, x1, y1, z1] (voxel indices, ends exclusive), got {roi!r}")
    r = [int(v) for v in roi]
    for a, n in enumerate(size_xyz):
        if not 0 <= r[a] < r[a + 3] <= n:
            raise ValueError(f"roi {r} is empty or outside the image (size x, y, z = {list(size_xyz)})")
    return r


class ClsService:
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
        self.device = pick_device(device)
        self.model_path = str(model_path or DEFAULT_CLS_WEIGHTS)
        self.model = load_cls_model(self.model_path, self.device)
        self.size = self.model.cfg.size
        self.steps = steps
        self.seg = seg  # optional SegService: labelled structures, and predicted masks of the others
        self.heads = ClsHeadStore(Path(store_dir) / "cls")
        self._views: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._stacks: OrderedDict[tuple, tuple] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._info_lock = threading.Lock()  # read-modify-write of an image's corrections
        self._ids: dict[str, str] = {}  # image path -> datastore id
        self.queue = AdaptQueue(self._adapt, self.heads.set_state)

    # -- corrections in the datastore -------------------------------------------------------
    def image_ids(self) -> list[str]:
        return sorted(self.datastore.list_images())

    def corrections(self, image_id: str) -> dict[str, dict]:
        return dict((self.datastore.get_image_info(image_id) or {}).get(INFO_KEY) or {})

    def all_examples(self) -> list[tuple[str, str, dict]]:
        """(image id, key, correction) of every stored class correction."""
        for attempt in range(3):
            try:
                with self._info_lock:
                    return [
                        (image_id, key, rec)
                        for image_id in self.image_ids()
                        for key, rec in sorted(self.corrections(image_id).items())
                        if rec.get("kind") and rec.get("class")
                    ]
            except RuntimeError:  # another writer (active-learning scores) changed an image's info meanwhile
                if attempt == 2:
                    raise
                time.sleep(0.05)
        return []

    def examples(self, task: str) -> list[tuple[str, str, dict]]:
        """(image id, key, correction) of every stored correction of one task."""
        return [e for e in self.all_examples() if task_of(e[2]) == task]

    def by_task(self) -> dict[str, list[dict]]:
        """The stored corrections grouped by the task they teach."""
        out: dict[str, list[dict]] = {}
        for _, _, rec in self.all_examples():
            out.setdefault(task_of(rec), []).append(rec)
        return out

    def tasks(self) -> dict[str, str]:
        """task -> kind, for every task with a head record or a stored correction."""
        found = {task: recs[0]["kind"] for task, recs in self.by_task().items()}
        return {t: rec["kind"] for t, rec in self.heads.snapshot().items()} | found

    def _image_path(self, image_id: str) -> str:
        if image_id not in set(self.datastore.list_images()):
            raise KeyError(f"unknown image id {image_id!r}")
        return self.datastore.get_image_uri(image_id)

    def id_of(self, path: str) -> str | None:
        """The datastore id of an image file (infer requests carry the path)."""
        real = os.path.realpath(path)
        known = self._ids.get(real)
        if known is not None and os.path.realpath(self.datastore.get_image_uri(known) or "") == real:
            return known
        for image_id in self.datastore.list_images():
            uri = self.datastore.get_image_uri(image_id)
            if uri:
                self._ids[os.path.realpath(uri)] = image_id
        return self._ids.get(real)

    def label_structures(self, image_id: str) -> dict[str, int]:
        """name -> value of the structures in an image's final label (none without one)."""
        if not self.datastore.get_label_uri(image_id, "final"):
            return {}
        if self.seg is not None:
            return self.seg.label_structures(image_id)
        info = self.datastore.get_label_info(image_id, "final") or {}
        if (info.get("metaapp") or {}).get("named"):
            return dict(info["metaapp"]["named"])
        names = named_values(info, getattr(self.datastore, "default_names", {}))
        arr = sitk.GetArrayFromImage(read_image(self.datastore.get_label_uri(image_id, "final")))
        return split_named([int(v) for v in np.unique(arr) if v > 0], names)[0]

    def resolve(self, image_id: str, region: str | None = None, roi: Any = None) -> tuple[str, dict]:
        """(key, correction without its class) for what a request names; raises KeyError/LookupError/ValueError."""
        path = self._image_path(image_id)
        if roi is not None:
            r = check_roi(roi, self._size_xyz(path))
            return roi_key(r), {"kind": "region", "roi": r, "source": "roi"}
        if region in (None, "", "image"):
            return "image", {"kind": "image", "source": "image"}
        region = str(region).strip()
        if region in self.label_structures(image_id):
            return region, {"kind": "region", "region": region, "source": "label"}
        mask = self._predicted_mask(path, region)
        zyx = np.nonzero(mask)
        box = [int(zyx[2].min()), int(zyx[1].min()), int(zyx[0].min())]
        box += [int(zyx[2].max()) + 1, int(zyx[1].max()) + 1, int(zyx[0].max()) + 1]
        return region, {"kind": "region", "region": region, "roi": box, "source": "prediction"}

    def correct(
        self, image_id: str, cls: Any, region: str | None = None, roi: Any = None, task: str | None = None
    ) -> dict:
        """Store one class correction and queue the adaptation of its task's head; the reply comes at once."""
        if not isinstance(cls, str) or not cls.strip() or len(cls) > 128:
            raise ValueError(f'"class" must be a non-empty class name (at most 128 characters), got {cls!r}')
        key, rec = self.resolve(image_id, region, roi)
        task = rec["kind"] if task in (None, "") else task
        self.heads.check(task, rec["kind"])  # a valid name, of this kind
        if task != rec["kind"]:
            key = f"{task}/{key}"
        rec.update({"class": cls.strip(), "task": task, "ts": int(time.time())})
        self.views(image_id, rec)  # refuse now what could never be learned from (empty region, unreadable)
        self.heads.register(task, rec["kind"])
        with self._info_lock:
            cur = self.corrections(image_id)
            cur[key] = rec
            self.datastore.update_image_info(image_id, {INFO_KEY: cur})
        queued = self.queue.submit([task])
        logger.info("class correction: %s %s -> %s (%s, task %s)", image_id, key, rec["class"], rec["source"], task)
        return {"image": image_id, "key": key, **rec, "adapting": queued}

    def remove(self, image_id: str, key: str) -> dict:
        self._image_path(image_id)
        with self._info_lock:
            cur = self.corrections(image_id)
            if key not in cur:
                raise KeyError(f"{image_id!r} has no class correction {key!r} (it has {sorted(cur)})")
            rec = cur.pop(key)
            self.datastore.update_image_info(image_id, {INFO_KEY: cur})
        return {"image": image_id, "key": key, "removed": rec, "adapting": self.queue.submit([task_of(rec)])}

    def on_label_saved(self, image_id: str) -> dict:
        """Classes carried by a saved final label -> region corrections of its named structures:
        `label_info: [{"name", "idx", "class"}]` or `classes: {name: class}`, where a class is a name
        (the default region task) or `{task: class, ...}` (named tasks, e.g. malignancy and type)."""
        info = self.datastore.get_label_info(image_id, "final") or {}
        classes = {}
        for it in info.get("label_info") or []:
            if isinstance(it, dict) and it.get("name") is not None and it.get("class"):
                classes[str(it["name"]).strip()] = it["class"]
        if isinstance(info.get("classes"), dict):
            classes.update({str(k).strip(): v for k, v in info["classes"].items()})
        if not classes:
            return {}
        named = (info.get("metaapp") or {}).get("named") or self.label_structures(image_id)
        stored: dict[str, Any] = {}
        refused: dict[str, str] = {}
        adapting: set[str] = set()
        for name, cls in classes.items():
            if name not in named:
                refused[name] = "not a structure of this label"
                continue
            for task, c in cls.items() if isinstance(cls, dict) else [(None, cls)]:
                try:
                    done = self.correct(image_id, c, region=name, task=task)
                except (LookupError, ValueError, VolumeError) as e:
                    why = str(e.args[0] if isinstance(e, KeyError) else e)
                    refused[name if task is None else f"{name} ({task})"] = why
                    continue
                adapting.add(done["task"])
                if task is None:
                    stored[name] = done["class"]
                else:
                    stored.setdefault(name, {})[task] = done["class"]
        return {"classes": stored, "refused": refused, "adapting": sorted(adapting)}

    # -- what the classifier sees ------------------------------------------------------------
    def _size_xyz(self, path: str) -> tuple[int, ...]:
        size = tuple(int(s) for s in self._stack(path)[1].reference.GetSize())
        return size + (1,) * (3 - len(size))

    def _stack(self, path: str) -> tuple[torch.Tensor, Any]:
        """(slices in [0, 1] on the region grid, geometry) of a study; a few are kept."""
        key = (os.path.realpath(path), os.path.getmtime(path))
        with self._cache_lock:
            if key in self._stacks:
                self._stacks.move_to_end(key)
                return self._stacks[key]
        item = to_slices(read_image(path), REGION_GRID)
        with self._cache_lock:
            self._stacks[key] = item
            while len(self._stacks) > 8:
                self._stacks.popitem(last=False)
        return item

    def image_views(self, path: str) -> torch.Tensor:
        """A whole image -> (V, size, size): 2D one view (uint8 as /255, as MedMNIST), 3D three."""
        img = read_image(path)
        if img.GetSize()[2] > 1:
            img = sitk.DICOMOrient(img, CANONICAL)
        arr = sitk.GetArrayFromImage(img)
        if arr.dtype != np.uint8:
            arr = normalise_intensity(arr)
        return to_views(arr[:1] if arr.shape[0] == 1 else arr[None], self.size, self.model.cfg.image_crop)[0]

    def mask_views(self, path: str, mask_img: sitk.Image) -> torch.Tensor:
        """A region given as a binary mask on the image's grid -> (V, size, size)."""
        stack, geom = self._stack(path)
        mask = label_slices(mask_img, geom, REGION_GRID) > 0
        if not bool(mask.any()):
            raise ValueError("the region is empty (no voxel of it on the model grid)")
        return region_views(stack, mask, self.size)

    def _box_image(self, path: str, roi: list[int]) -> sitk.Image:
        ref = self._stack(path)[1].reference
        arr = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8)
        x0, y0, z0, x1, y1, z1 = roi
        arr[z0:z1, y0:y1, x0:x1] = 1
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref)
        return img

    def _label_mask(self, image_id: str, name: str) -> sitk.Image:
        value = self.label_structures(image_id).get(name)
        if value is None:
            raise LookupError(f"the final label of {image_id!r} no longer holds {name!r}")
        return read_image(self.datastore.get_label_uri(image_id, "final")) == value

    def _predicted_mask(self, path: str, name: str) -> np.ndarray:
        """The few-shot segmentation's mask of a structure (z, y, x) on the image's grid."""
        if self.seg is None or name not in self.seg.heads.heads():
            raise LookupError(
                f"no final label of this image holds {name!r} and no adapted segmentation head predicts it: "
                "save a label of it, or send a roi"
            )
        img, params = self.seg.infer(path, [name])
        mask = sitk.GetArrayFromImage(img) == params["label_names"][name]
        if not mask.any():
            raise ValueError(f"the segmentation of {name!r} is empty on this image: send a roi instead")
        return mask

    def views(self, image_id: str, rec: dict) -> torch.Tensor:
        """The classifier's input for a stored correction, cached by file times."""
        path = self._image_path(image_id)
        lbl = self.datastore.get_label_uri(image_id, "final") if rec.get("source") == "label" else ""
        key = (
            os.path.realpath(path),
            os.path.getmtime(path),
            rec.get("region"),
            tuple(rec.get("roi") or ()),
            os.path.getmtime(lbl) if lbl else None,
        )
        with self._cache_lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        if rec["kind"] == "image":
            v = self.image_views(path)
        elif rec.get("roi"):
            v = self.mask_views(path, self._box_image(path, rec["roi"]))
        else:
            v = self.mask_views(path, self._label_mask(image_id, rec["region"]))
        with self._cache_lock:
            self._views[key] = v
            while len(self._views) > 4096:
                self._views.popitem(last=False)
        return v

    @torch.no_grad()
    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Examples (each (V, size, size), V may differ) -> (N, D) features; batched by view count."""
        out: list[torch.Tensor | None] = [None] * len(views)
        for nv in sorted({v.shape[0] for v in views}):
            idx = [i for i, v in enumerate(views) if v.shape[0] == nv]
            f = self.model.embed(torch.stack([views[i] for i in idx]).to(self.device)).cpu()
            for j, i in enumerate(idx):
                out[i] = f[j]
        return torch.stack(out)  # type: ignore[arg-type]

    # -- adaptation ---------------------------------------------------------------------------
    def adapt_all(self) -> list[str]:
        return self.queue.submit(sorted(self.by_task()))

    def sync(self) -> list[str]:
        """At start-up: adapt the heads whose stored corrections differ from what they learned from,
        or that another classifier model made (the app's weights changed)."""
        snap, live = self.heads.snapshot(), self.heads.heads()
        stale = []
        for task, recs in sorted(self.by_task().items()):
            try:
                self.heads.register(task, recs[0]["kind"])  # a registry lost or older than the corrections
            except ValueError as e:
                logger.warning("class corrections of task %r not learned from: %s", task, e)
                continue
            counts = dict(Counter(rec["class"] for rec in recs))
            foreign = task in live and not self.model.head.matches(live[task].params)
            if foreign or counts != snap.get(task, {}).get("examples"):
                stale.append(task)
        return self.queue.submit(stale)

    def _adapt(self, task: str) -> None:
        t0 = time.perf_counter()
        views, names = [], []
        for image_id, key, rec in self.examples(task):
            try:
                views.append(self.views(image_id, rec))
                names.append(rec["class"])
            except (LookupError, ValueError, VolumeError) as e:
                logger.warning("class correction %s %s skipped: %s", image_id, key, e)
        counts = dict(sorted(Counter(names).items()))
        classes = sorted(counts)
        if len(classes) < 2:
            self.heads.retire(task, counts, NEEDS_TWO)
            logger.info("%s classifier: examples of %s only; %s", task, classes, NEEDS_TWO)
            return
        t1 = time.perf_counter()
        feats = self.embed(views).to(self.device)
        labels = torch.tensor([classes.index(n) for n in names], device=self.device)
        params = adapt(self.model, feats, labels, len(classes), self.steps)
        t2 = time.perf_counter()
        head = ClsHead({k: v.detach() for k, v in params.items()}, classes, counts, seconds=t2 - t0)
        version = self.heads.publish(task, head)
        logger.info(
            "%s classifier adapted on %d examples of %d classes in %.3f s (embed + head %.3f s) -> version %d",
            task,
            len(names),
            len(classes),
            t2 - t0,
            t2 - t1,
            version,
        )

    # -- inference ----------------------------------------------------------------------------
    def _head(self, task: str) -> tuple[ClsHead, int]:
        head = self.heads.heads().get(task)
        rec = self.heads.snapshot().get(task, {})
        if head is None:
            examples = rec.get("examples") or {}
            have = f"examples so far: {examples}" if examples else "no class examples yet"
            raise NoHead(f"the {task} classifier has no head yet ({have}; it needs 2 classes): {TEACH}")
        return head, int(rec.get("version", 0))

    def predict(self, head: ClsHead, feats: torch.Tensor) -> list[list[dict]]:
        """Features (N, D) (`embed`) -> per example, every class with its probability, best first."""
        w = head.params["W0"]
        probs = torch.softmax(self.model.head.logits(feats.to(w.device, w.dtype), head.params), 1)
        return [
            sorted(
                ({"idx": i, "label": c, "score": round(float(p[i]), 4)} for i, c in enumerate(head.classes)),
                key=lambda r: -r["score"],
            )
            for p in probs
        ]

    def classify(self, image_id: str, region: str | None = None, roi: Any = None, task: str | None = None) -> dict:
        """{"prediction": [{"idx", "label", "score"}] (best first), "kind", "task", "head_version", ...}."""
        t0 = time.perf_counter()
        path = self._image_path(image_id)
        kind = "image" if roi is None and region in (None, "", "image") else "region"
        task = kind if task in (None, "") else task
        self.heads.check(task, kind)
        head, version = self._head(task)
        out: dict[str, Any] = {"kind": kind, "task": task}
        if roi is not None:
            r = check_roi(roi, self._size_xyz(path))
            views = self.mask_views(path, self._box_image(path, r))
            out["roi"] = r
        elif kind == "image":
            views = self.image_views(path)
        else:
            region = str(region).strip()
            out["region"] = region
            if region in self.label_structures(image_id):
                out["source"] = "label"
                views = self.mask_views(path, self._label_mask(image_id, region))
            else:
                out["source"] = "prediction"
                mask = sitk.GetImageFromArray(self._predicted_mask(path, region).astype(np.uint8))
                mask.CopyInformation(self._stack(path)[1].reference)
                views = self.mask_views(path, mask)
        out["prediction"] = self.predict(head, self.embed([views]))[0]
        out["head_version"] = version
        out["latency"] = round(time.perf_counter() - t0, 4)
        return out

    def classify_regions(self, path: str, label: sitk.Image, names: dict[str, int]) -> dict[str, dict]:
        """The classes of each segmented structure of a result label map, as segmentation result params:
        `classes` {name: {"label", "score", "idx"}} from the default region task and `task_classes`
        {task: {name: ...}} from the named ones; a task without a head adds nothing."""
        heads = {t: h for t, h in self.heads.heads().items() if self.heads.kind(t) == "region"}
        if not heads or not names:
            return {}
        arr = sitk.GetArrayViewFromImage(label)
        present = {n: v for n, v in names.items() if (arr == v).any()}
        views, order = [], []
        for name, value in present.items():
            try:
                views.append(self.mask_views(path, label == value))
                order.append(name)
            except (ValueError, VolumeError) as e:
                logger.warning("no class for %s: %s", name, e)
        if not views:
            return {}
        feats = self.embed(views)
        by_task = {
            task: {name: dict(pred[0]) for name, pred in zip(order, self.predict(head, feats))}
            for task, head in sorted(heads.items())
        }
        out: dict[str, dict] = {"classes": by_task.pop("region")} if "region" in by_task else {}
        return out | ({"task_classes": by_task} if by_task else {})

    def status(self) -> dict:
        return {
            "device": str(self.device),
            "model": self.model_path,
            "heads": self.heads.snapshot(),
            "teach": TEACH,
        }
