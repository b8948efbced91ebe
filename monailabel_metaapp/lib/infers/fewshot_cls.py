"""Few-shot classification infer task: the class of an image, of a segmented structure or of a box."""

from __future__ import annotations

import os
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.lib.cls.inference import NoHead
from monailabel_metaapp.lib.cls.service import ClsService


class FewShotClsInfer(InferTask):
    """Params: none (the whole image), `{"region": STRUCTURE}` or `{"roi": [x0, y0, z0, x1, y1, z1]}`,
    and `"task"` for a named task (default: the task of that kind, `image` or `region`).
    Result (JSON only): `{"prediction": [{"idx", "label", "score"}, ...]}`, best first.

    Args:
        service: the ClsService that answers.
    """

    def __init__(self, service: ClsService):
        super().__init__(
            type=InferType.CLASSIFICATION,
            labels=None,
            dimension=3,
            description="Meta-learned few-shot classification of an image or a region, learned from class corrections",
            config={"region": "", "roi": [], "task": ""},
        )
        self.service = service

    def info(self) -> dict[str, Any]:
        """MONAI Label's task info, with each task's classes and heads."""
        info = super().info()
        snap = self.service.heads.snapshot()
        info["labels"] = {task: rec.get("classes", []) for task, rec in snap.items()}
        info["heads"] = snap
        return info

    def is_valid(self) -> bool:
        """Always: a task without a head answers 409 with how to teach it."""
        return True

    def __call__(self, request: dict) -> tuple[None, dict]:
        path = request.get("image") or ""
        image_id = self.service.id_of(path) if isinstance(path, str) and os.path.exists(path) else None
        if image_id is None:
            raise HTTPException(status_code=404, detail=f"image not found in the datastore: {path or '(unknown id)'}")
        roi = request.get("roi") or None
        region = request.get("region") or None
        try:
            return None, self.service.classify(image_id, region=region, roi=roi, task=request.get("task") or None)
        except NoHead as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except (LookupError, ValueError, VolumeError) as e:
            raise HTTPException(status_code=422, detail=str(e.args[0] if isinstance(e, KeyError) else e)) from e
