"""What the classifier sees: the views of a whole image or of a region of a study.

* `image`: a whole image (a 2D X-ray: one view; a 3D volume: its three central orthogonal slices;
  each view the central part of its slice that the model was meta-trained on, its config's
  `image_crop`: 80% for the shipped classifier);
* `region`: a structure NAME (its mask in the image's final label, else the few-shot segmentation's
  prediction of it) or a box `roi = [x0, y0, z0, x1, y1, z1]` (voxel indices of the image, ends
  exclusive), seen as crops of a few of its slices, the crops `region_set` meta-trains on.
The same `views()` serves adaptation, `classify` and the evaluation, so all three see one input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.cls_data import image_file_views, region_views
from monailabel_metaapp.core.volume import label_slices, read_image, to_slices
from monailabel_metaapp.lib.cls.corrections import roi_key
from monailabel_metaapp.lib.lru import LRU

REGION_GRID = 160  # regions are cut from slices resized to this (as the segmentation banks meta-trained on)


def check_roi(roi: Any, size_xyz: tuple[int, ...]) -> list[int]:
    """[x0, y0, z0, x1, y1, z1] inside the image, each end after its start (a 2D image: z0 0, z1 1).

    Args:
        roi: the box as a request sends it.
        size_xyz: the image's size along x, y, z.
    """
    if not isinstance(roi, (list, tuple)) or len(roi) != 6 or not all(isinstance(v, (int, float)) for v in roi):
        raise ValueError(f"roi must be [x0, y0, z0, x1, y1, z1] (voxel indices, ends exclusive), got {roi!r}")
    r = [int(v) for v in roi]
    for a, n in enumerate(size_xyz):
        if not 0 <= r[a] < r[a + 3] <= n:
            raise ValueError(f"roi {r} is empty or outside the image (size x, y, z = {list(size_xyz)})")
    return r


class RegionViews:
    """Cuts the classifier's input from a datastore's images; a few studies and many views are cached.

    Args:
        datastore: the MONAI Label datastore.
        size: the classifier's input size (pixels per side of a view).
        image_crop: the central share of a whole image's slice the classifier was meta-trained on.
        structures: image id -> {name: value} of the structures in its final label.
        seg: the SegService whose predictions outline structures no label holds (None: labels only).
    """

    def __init__(
        self,
        datastore,
        size: int,
        image_crop: float,
        structures: Callable[[str], dict[str, int]],
        seg=None,
    ):
        self.datastore = datastore
        self.size = size
        self.image_crop = image_crop
        self.structures = structures
        self.seg = seg
        self.stacks: LRU[tuple] = LRU(max_items=8)
        self.cache: LRU[torch.Tensor] = LRU(max_items=4096)
        self._ids: dict[str, str] = {}  # image path -> datastore id

    def id_of(self, path: str) -> str | None:
        """The datastore id of an image file (infer requests carry the path); None when not there.

        Args:
            path: the image file.
        """
        real = os.path.realpath(path)
        known = self._ids.get(real)
        if known is not None and os.path.realpath(self.datastore.get_image_uri(known) or "") == real:
            return known
        for image_id in self.datastore.list_images():
            uri = self.datastore.get_image_uri(image_id)
            if uri:
                self._ids[os.path.realpath(uri)] = image_id
        return self._ids.get(real)

    def image_path(self, image_id: str) -> str:
        """The file of a datastore image; KeyError for an unknown id.

        Args:
            image_id: the image.
        """
        if image_id not in set(self.datastore.list_images()):
            raise KeyError(f"unknown image id {image_id!r}")
        return self.datastore.get_image_uri(image_id)

    def stack(self, path: str) -> tuple[torch.Tensor, Any]:
        """(slices in [0, 1] on the region grid, geometry) of a study.

        Args:
            path: the image file.
        """
        key = (os.path.realpath(path), os.path.getmtime(path))
        return self.stacks.get(key, lambda: to_slices(read_image(path), REGION_GRID))

    def size_xyz(self, path: str) -> tuple[int, ...]:
        """The image's size along x, y, z (a 2D image: z is 1).

        Args:
            path: the image file.
        """
        size = tuple(int(s) for s in self.stack(path)[1].reference.GetSize())
        return size + (1,) * (3 - len(size))

    def describe(self, image_id: str, region: str | None = None, roi: Any = None) -> dict:
        """What a request names, as a correction without its class: kind, source, region, roi.

        Args:
            image_id: the image.
            region: a structure name (None, "" or "image": the whole image).
            roi: a box [x0, y0, z0, x1, y1, z1] (wins over `region`).
        """
        path = self.image_path(image_id)
        if roi is not None:
            return {"kind": "region", "roi": check_roi(roi, self.size_xyz(path)), "source": "roi"}
        if region in (None, "", "image"):
            return {"kind": "image", "source": "image"}
        region = str(region).strip()
        source = "label" if region in self.structures(image_id) else "prediction"
        return {"kind": "region", "region": region, "source": source}

    def resolve(self, image_id: str, region: str | None = None, roi: Any = None) -> tuple[str, dict]:
        """(key, correction without its class) for what a request names; a region that only a
        prediction outlines is stored as the prediction's box. Raises KeyError/LookupError/ValueError.

        Args:
            image_id: the image.
            region: a structure name (None: the whole image).
            roi: a box [x0, y0, z0, x1, y1, z1].
        """
        rec = self.describe(image_id, region, roi)
        if rec["source"] == "prediction":
            rec["roi"] = self.predicted_box(image_id, rec["region"])
        key = roi_key(rec["roi"]) if rec["source"] == "roi" else rec.get("region", "image")
        return key, rec

    def image_views(self, path: str) -> torch.Tensor:
        """A whole image -> (V, size, size): 2D one view (uint8 as /255, as MedMNIST), 3D three.

        Args:
            path: the image file.
        """
        return image_file_views(path, self.size, self.image_crop)

    def mask_views(self, path: str, mask_img: sitk.Image) -> torch.Tensor:
        """A region given as a binary mask on the image's grid -> (V, size, size).

        Args:
            path: the image file.
            mask_img: the region, on the image's grid.
        """
        stack, geom = self.stack(path)
        mask = label_slices(mask_img, geom, REGION_GRID) > 0
        if not bool(mask.any()):
            raise ValueError("the region is empty (no voxel of it on the model grid)")
        return region_views(stack, mask, self.size)

    def box_image(self, path: str, roi: list[int]) -> sitk.Image:
        """A box as a binary mask on the image's grid.

        Args:
            path: the image file.
            roi: [x0, y0, z0, x1, y1, z1], checked.
        """
        ref = self.stack(path)[1].reference
        arr = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8)
        x0, y0, z0, x1, y1, z1 = roi
        arr[z0:z1, y0:y1, x0:x1] = 1
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref)
        return img

    def label_mask(self, image_id: str, name: str) -> sitk.Image:
        """A structure's mask in the image's final label; LookupError when the label no longer holds it.

        Args:
            image_id: the image.
            name: the structure.
        """
        value = self.structures(image_id).get(name)
        if value is None:
            raise LookupError(f"the final label of {image_id!r} no longer holds {name!r}")
        return read_image(self.datastore.get_label_uri(image_id, "final")) == value

    def predicted_mask(self, path: str, name: str) -> np.ndarray:
        """The few-shot segmentation's mask of a structure (z, y, x) on the image's grid.

        Args:
            path: the image file.
            name: the structure; LookupError when no segmentation head predicts it.
        """
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

    def predicted_box(self, image_id: str, name: str) -> list[int]:
        """The box [x0, y0, z0, x1, y1, z1] of the segmentation's prediction of a structure.

        Args:
            image_id: the image.
            name: the structure.
        """
        zyx = np.nonzero(self.predicted_mask(self.image_path(image_id), name))
        box = [int(zyx[2].min()), int(zyx[1].min()), int(zyx[0].min())]
        return box + [int(zyx[2].max()) + 1, int(zyx[1].max()) + 1, int(zyx[0].max()) + 1]

    def views(self, image_id: str, rec: dict) -> torch.Tensor:
        """The classifier's input for a correction or a request (`describe`), cached by file times.

        A region only a prediction outlines (no roi) is cut from the current prediction, never cached.

        Args:
            image_id: the image.
            rec: kind, source and the region or roi.
        """
        path = self.image_path(image_id)
        if rec["kind"] == "region" and not rec.get("roi") and rec.get("source") == "prediction":
            mask = sitk.GetImageFromArray(self.predicted_mask(path, rec["region"]).astype(np.uint8))
            mask.CopyInformation(self.stack(path)[1].reference)
            return self.mask_views(path, mask)
        lbl = self.datastore.get_label_uri(image_id, "final") if rec.get("source") == "label" else ""
        key = (
            os.path.realpath(path),
            os.path.getmtime(path),
            rec.get("region"),
            tuple(rec.get("roi") or ()),
            os.path.getmtime(lbl) if lbl else None,
        )
        return self.cache.get(key, lambda: self._cut(image_id, path, rec))

    def _cut(self, image_id: str, path: str, rec: dict) -> torch.Tensor:
        if rec["kind"] == "image":
            return self.image_views(path)
        if rec.get("roi"):
            return self.mask_views(path, self.box_image(path, rec["roi"]))
        return self.mask_views(path, self.label_mask(image_id, rec["region"]))
