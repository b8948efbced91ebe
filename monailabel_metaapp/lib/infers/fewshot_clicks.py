"""Click-correction infer task: foreground/background points on the open study correct one
structure's label (MONAI Label's `deepgrow` type, so 3D Slicer's MONAI Label module shows its
foreground and background point tools for it, and OHIF's MONAI Label panel its point prompts)."""

from __future__ import annotations

import tempfile
from typing import Any

import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.lib.datastore import requested_image
from monailabel_metaapp.lib.seg.service import SegService


class FewShotClicksInfer(InferTask):
    """Request parameters, as the clients send them: `label` (the structure: the segment's name in
    Slicer; OHIF's deepgrow prompts leave it out, and then the structure whose head is most sure at the
    foreground points is corrected), `foreground` and `background` ([[i, j, k], ...] voxel indices of
    every point placed so far). The result is the structure's corrected label (value 1).

    Args:
        service: the segmentation runtime whose heads the points correct (copies; see `lib.seg.clicks`).
    """

    def __init__(self, service: SegService):
        super().__init__(
            type=InferType.DEEPGROW,
            labels=None,
            dimension=3,
            description="Correct one structure with foreground/background points; learns from them on the spot",
            config={"label": ""},
        )
        self.service = service

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["labels"] = self.service.heads.labels()
        return info

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        path = requested_image(request)
        structure = request.get("label") or request.get("structure") or None
        if structure is not None and not isinstance(structure, str):
            raise HTTPException(status_code=422, detail=f"'label' must be a structure's name; got {structure!r}")
        if isinstance(structure, str) and structure.strip().lower() == "background":  # OHIF's background label
            raise HTTPException(
                status_code=400, detail="select the structure the points are for (not background), then run"
            )
        fg, bg = request.get("foreground") or [], request.get("background") or []
        if not isinstance(fg, list) or not isinstance(bg, list):
            raise HTTPException(status_code=422, detail="'foreground' and 'background' must be lists of [i, j, k]")
        try:
            img, params = self.service.clicks.correct(path, structure, fg, bg)
        except VolumeError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        ext = request.get("result_extension") or ".nii.gz"
        out = tempfile.NamedTemporaryFile(suffix=ext if ext.startswith(".") else f".{ext}", delete=False).name
        sitk.WriteImage(img, out, useCompression=True)
        return out, params
