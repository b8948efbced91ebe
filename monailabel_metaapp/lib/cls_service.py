"""The app's classification runtime: the meta-learned classifier encoder (frozen) and its
task-specific heads, adapted in the background from the class corrections stored in the datastore.

What is classified:
* `image`: a whole image (a 2D X-ray: one view; a 3D volume: its three central orthogonal slices);
* `region`: a region of a study: a structure NAME (its mask in the image's final label, else the
  few-shot segmentation's prediction of it) or a box `roi = [x0, y0, z0, x1, y1, z1]` (voxel
  indices of the image, ends exclusive). A region is seen as crops of a few of its slices, the
  crops `region_set` meta-trains on.
Each kind has its own head (an X-ray's classes are not a lesion's classes).

Class corrections live in the datastore's image info (`datastore_v2.json`):
  metaapp_classes: {"image" | structure name | "roi:x0,y0,z0,x1,y1,z1":
                    {"class", "kind", "source": image|label|prediction|roi, "region"?, "roi"?, "ts"}}
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
from monailabel_metaapp.lib.cls_heads import KINDS, NEEDS_TWO, ClsHead, ClsHeadStore
from monailabel_metaapp.lib.label_names import named_values, split_named

logger = logging.getLogger(__name__)

DEFAULT_CLS_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "metacls.pt"
DEFAULT_CLS_STEPS = 20
INFO_KEY = "metaapp_classes"
REGION_GRID = 160  # regions are cut from slices resized to this (as the segmentation banks meta-trained on)
TEACH = (
    "teach it with PUT /metaapp/classes/{image_id} "
    '{"class": NAME[, "region": STRUCTURE | "roi": [x0,y0,z0,x1,y1,z1]]}, '
    'or MONAILabelClient.train_start("fewshot_cls", {"image": ID, "class": NAME, ...}), '
    'or a saved label whose label_info entries carry "class"'
)


class NoHead(LookupError):
    """The classifier cannot answer yet (no head for this kind of example)."""


def roi_key(roi: list[int]) -> str:
    return "roi:" + ",".join(str(int(v)) for v in roi)


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

    def examples(self, kind: str) -> list[tuple[str, str, dict]]:
        """(image id, key, correction) of every stored correction of this kind."""
        for attempt in range(3):
            try:
                with self._info_lock:
                    return [
                        (image_id, key, rec)
                        for image_id in self.image_ids()
                        for key, rec in sorted(self.corrections(image_id).items())
                        if rec.get("kind") == kind and rec.get("class")
                    ]
            except RuntimeError:  # another writer (active-learning scores) changed an image's info meanwhile
                if attempt == 2:
                    raise
                time.sleep(0.05)
        return []

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

    def correct(self, image_id: str, cls: Any, region: str | None = None, roi: Any = None) -> dict:
        """Store one class correction and queue the adaptation of its head; the reply comes at once."""
        if not isinstance(cls, str) or not cls.strip() or len(cls) > 128:
            raise ValueError(f'"class" must be a non-empty class name (at most 128 characters), got {cls!r}')
        key, rec = self.resolve(image_id, region, roi)
        rec.update({"class": cls.strip(), "ts": int(time.time())})
        self.views(image_id, rec)  # refuse now what could never be learned from (empty region, unreadable)
        with self._info_lock:
            cur = self.corrections(image_id)
            cur[key] = rec
            self.datastore.update_image_info(image_id, {INFO_KEY: cur})
        queued = self.queue.submit([rec["kind"]])
        logger.info("class correction: %s %s -> %s (%s)", image_id, key, rec["class"], rec["source"])
        return {"image": image_id, "key": key, **rec, "adapting": queued}

    def remove(self, image_id: str, key: str) -> dict:
        self._image_path(image_id)
        with self._info_lock:
            cur = self.corrections(image_id)
            if key not in cur:
                raise KeyError(f"{image_id!r} has no class correction {key!r} (it has {sorted(cur)})")
            rec = cur.pop(key)
            self.datastore.update_image_info(image_id, {INFO_KEY: cur})
        return {"image": image_id, "key": key, "removed": rec, "adapting": self.queue.submit([rec["kind"]])}

    def on_label_saved(self, image_id: str) -> dict:
        """Classes carried by a saved final label: `label_info: [{"name", "idx", "class"}]` (or
        `classes: {name: class}`) -> one region correction per named structure."""
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
        stored, refused = {}, {}
        for name, cls in classes.items():
            if name not in named:
                refused[name] = "not a structure of this label"
                continue
            try:
                stored[name] = self.correct(image_id, cls, region=name)["class"]
            except (LookupError, ValueError, VolumeError) as e:
                refused[name] = str(e.args[0] if isinstance(e, KeyError) else e)
        return {"classes": stored, "refused": refused, "adapting": ["region"] if stored else []}

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
        return to_views(arr[:1] if arr.shape[0] == 1 else arr[None], self.size)[0]

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
        return self.queue.submit([k for k in KINDS if self.examples(k)])

    def sync(self) -> list[str]:
        """At start-up: adapt the heads whose stored corrections differ from what they learned from,
        or that another classifier model made (the app's weights changed)."""
        snap, live = self.heads.snapshot(), self.heads.heads()
        stale = []
        for kind in KINDS:
            counts = dict(Counter(rec["class"] for _, _, rec in self.examples(kind)))
            foreign = kind in live and not self.model.head.matches(live[kind].params)
            if counts and (foreign or counts != snap.get(kind, {}).get("examples")):
                stale.append(kind)
        return self.queue.submit(stale)

    def _adapt(self, kind: str) -> None:
        t0 = time.perf_counter()
        views, names = [], []
        for image_id, key, rec in self.examples(kind):
            try:
                views.append(self.views(image_id, rec))
                names.append(rec["class"])
            except (LookupError, ValueError, VolumeError) as e:
                logger.warning("class correction %s %s skipped: %s", image_id, key, e)
        counts = dict(sorted(Counter(names).items()))
        classes = sorted(counts)
        if len(classes) < 2:
            self.heads.retire(kind, counts, NEEDS_TWO)
            logger.info("%s classifier: examples of %s only; %s", kind, classes, NEEDS_TWO)
            return
        t1 = time.perf_counter()
        feats = self.embed(views).to(self.device)
        labels = torch.tensor([classes.index(n) for n in names], device=self.device)
        params = adapt(self.model, feats, labels, len(classes), self.steps)
        t2 = time.perf_counter()
        head = ClsHead({k: v.detach() for k, v in params.items()}, classes, counts, seconds=t2 - t0)
        version = self.heads.publish(kind, head)
        logger.info(
            "%s classifier adapted on %d examples of %d classes in %.3f s (embed + head %.3f s) -> version %d",
            kind,
            len(names),
            len(classes),
            t2 - t0,
            t2 - t1,
            version,
        )

    # -- inference ----------------------------------------------------------------------------
    def _head(self, kind: str) -> tuple[ClsHead, int]:
        head = self.heads.heads().get(kind)
        rec = self.heads.snapshot().get(kind, {})
        if head is None:
            examples = rec.get("examples") or {}
            have = f"examples so far: {examples}" if examples else "no class examples yet"
            raise NoHead(f"the {kind} classifier has no head yet ({have}; it needs 2 classes): {TEACH}")
        return head, int(rec.get("version", 0))

    def predict(self, head: ClsHead, views: list[torch.Tensor]) -> list[list[dict]]:
        w = head.params["W0"]
        probs = torch.softmax(self.model.head.logits(self.embed(views).to(w.device, w.dtype), head.params), 1)
        return [
            sorted(
                ({"idx": i, "label": c, "score": round(float(p[i]), 4)} for i, c in enumerate(head.classes)),
                key=lambda r: -r["score"],
            )
            for p in probs
        ]

    def classify(self, image_id: str, region: str | None = None, roi: Any = None) -> dict:
        """{"prediction": [{"idx", "label", "score"}] (best first), "kind", "head_version", ...}."""
        t0 = time.perf_counter()
        path = self._image_path(image_id)
        kind = "image" if roi is None and region in (None, "", "image") else "region"
        head, version = self._head(kind)
        out: dict[str, Any] = {"kind": kind}
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
        out["prediction"] = self.predict(head, [views])[0]
        out["head_version"] = version
        out["latency"] = round(time.perf_counter() - t0, 4)
        return out

    def classify_regions(self, path: str, label: sitk.Image, names: dict[str, int]) -> dict[str, dict] | None:
        """The class of each segmented structure of a result label map (None: no region head yet)."""
        head = self.heads.heads().get("region")
        if head is None or not names:
            return None
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
        return {
            name: {"label": pred[0]["label"], "score": pred[0]["score"], "idx": pred[0]["idx"]}
            for name, pred in zip(order, self.predict(head, views))
        }

    def status(self) -> dict:
        return {
            "device": str(self.device),
            "model": self.model_path,
            "heads": self.heads.snapshot(),
            "teach": TEACH,
        }
