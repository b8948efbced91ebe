"""MONAI Label's busiest routes, with their work moved off the event loop.

MONAI Label 0.8.5 declares inference, label save, image download and Next Sample as `async` routes
and does the work inside them, so while one inference runs (a second or more on a CPU) the server
answers nothing else: with 16 annotators at once a label save waited 2.5 s (p95) and an image
download 20 s (`docs/benchmarks/load.md`). These routes replace them with the same path, parameters,
role and answer; MONAI Label's own function does the work, in a worker thread. Inference also
refuses an `image` that is not a datastore id (404).

With `max_inferences` (conf `max_concurrent_inferences`, 0 by default: no cap) at most that many
inferences run at once, and the others wait their turn without holding a thread. A label save or
Next Sample then no longer waits behind a crowd of inferences for its share of the cores, but the
inferences run fewer at a time: at 16 annotators on 2 cores, a cap of 2 took the label-save p95
from 2.4 s to 0.69 s and cost 37 % of the throughput (`docs/benchmarks/load.md`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from monailabel.config import settings
from monailabel.endpoints import activelearning, datastore, infer
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from monailabel_metaapp.lib.auth import include_first


def known_image(image: str) -> None:
    """404 for an `image` that is a path rather than one of the datastore's ids. MONAI Label takes any
    existing file path for an id, so `image=../../etc/passwd` would be read. Ids never hold a path
    separator; the datastore is asked only about what looks like a path (a PACS that is down then
    still answers an id with its own 503)."""
    looks_like_path = any(sep and sep in image for sep in (os.sep, os.altsep)) or os.path.exists(image)
    if looks_like_path and image not in set(app_instance().datastore().list_images()):
        raise HTTPException(status_code=404, detail=f"image not found in the datastore: {image!r}")


def install(app: FastAPI, max_inferences: int = 0) -> None:
    """Mount the routes ahead of MONAI Label's.

    Args:
        app: MONAI Label's FastAPI app.
        max_inferences: inferences that run at once; the others queue (0: no cap).
    """
    if max_inferences < 0:
        raise ValueError(f"max_concurrent_inferences must be 0 (no cap) or more, got {max_inferences}")
    turns = asyncio.Semaphore(max_inferences) if max_inferences else contextlib.nullcontext()
    router = APIRouter()
    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    annotator_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))

    @router.post("/infer/{model}", summary="Run inference (off the event loop)")
    async def run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[infer.ResultType] = None,  # noqa: UP045 (FastAPI reads the annotation)
        user: User = user_role,
    ):
        if image and not session_id and file is None:  # an id, never a path on the server
            await run_in_threadpool(known_image, image)
        args = (background_tasks, model, image, session_id, params, file, label, output)
        async with turns:
            return await run_in_threadpool(infer.run_inference, *args)

    @router.put("/datastore/label", summary="Save a label (off the event loop)")
    async def save_label(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = annotator_role,
    ):
        return await run_in_threadpool(datastore.save_label, background_tasks, image, params, tag, label, user.username)

    @router.get("/datastore/image", summary="Download an image (off the event loop)")
    async def download_image(image: str, user: User = user_role):
        return await run_in_threadpool(datastore.download_image, image)

    @router.post("/activelearning/{strategy}", summary="Next Sample (off the event loop)")
    async def next_sample(strategy: str, params: Optional[dict] = None, user: User = user_role):  # noqa: UP045
        return await run_in_threadpool(activelearning.sample, strategy, params, user.username)

    include_first(app, router)
