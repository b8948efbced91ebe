"""Few-shot segmentation infer task: every structure with an adapted head, in one label map."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import Any

import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.lib.datastore import requested_image
from monailabel_metaapp.lib.seg.service import SegService

logger = logging.getLogger(__name__)


class FewShotSegInfer(InferTask):
    def __init__(self, service: SegService):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=None,
            dimension=3,
            description="Meta-learned few-shot segmentation: any structure, learned from 1-5 saved labels",
            config={"structures": []},
        )
        self.service = service
        # optional hook (the app sets it to the classifier's): (image path, result label, {name: value})
        # -> params to add (`classes` {name: {"label", "score", "idx"}}, `task_classes` {task: ...});
        # Slicer and OHIF list no classification models, so the classes of each segmented region
        # ride along in the result's params
        self.classify_regions: Callable[[str, sitk.Image, dict], dict] | None = None

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["labels"] = self.service.heads.labels()  # grows as annotators name new structures
        info["structures"] = self.service.heads.snapshot()
        return info

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        structures = request.get("structures") or None
        if isinstance(structures, str):
            structures = [s.strip() for s in structures.split(",") if s.strip()]
        path = requested_image(request)
        try:
            img, params = self.service.infer(path, structures)
        except VolumeError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        except KeyError as e:
            raise HTTPException(status_code=400, detail=str(e.args[0])) from e
        if self.classify_regions is not None:
            try:
                params.update(self.classify_regions(path, img, params.get("label_names") or {}))
            except Exception as e:  # the segmentation must come back even if classification fails
                logger.exception("classifying the segmented regions of %s failed", path)
                params["classes_error"] = str(e)
        ext = request.get("result_extension") or ".nii.gz"
        out = tempfile.NamedTemporaryFile(suffix=ext if ext.startswith(".") else f".{ext}", delete=False).name
        sitk.WriteImage(img, out, useCompression=True)
        return out, params
