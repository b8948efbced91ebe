"""HTTP routes of the few-shot classifier (added in front of MONAI Label's own routes).

* `PUT /metaapp/classes/{image_id}` body
  `{"class": NAME[, "region": STRUCTURE | "roi": [x0,y0,z0,x1,y1,z1]][, "task": TASK]}`: store a class
  correction in the datastore and queue the adaptation of that task's head; replies at once. Without
  "task" it teaches the default task of its kind (`image`, or `region` with a region or roi).
* `DELETE /metaapp/classes/{image_id}?key=KEY`: drop a correction (KEY as the PUT reply gives it:
  "image", a structure, "roi:...", each prefixed "TASK/" for a named task).
* `GET /metaapp/classes[?image=ID]`: the heads (classes, examples per class, version, state) and the
  stored corrections.
* `POST /train/fewshot_cls`: what `MONAILabelClient.train_start("fewshot_cls", params)` sends. With
  `{"image": ID, "class": NAME[, "region" | "roi"]}` (or `{"corrections": [those]}`) it stores the
  corrections as above; with no correction it re-adapts every head from the stored ones.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.lib.auth import ADMIN, ANNOTATOR, USER, include_first


def _body(raw: bytes) -> dict:
    try:
        body = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"the body must be JSON: {e}") from e
    if not isinstance(body, dict):
        raise HTTPException(400, 'the body must be a JSON object like {"class": "malignant", "region": "lesion"}')
    return body


def store_correction(service, image_id: str, body: dict) -> dict:
    """One correction -> stored record, with errors as HTTP statuses (404 image, 400/422 request).

    Args:
        service: the ClsService.
        image_id: the image.
        body: {"class", "region"?, "roi"?, "task"?}.
    """
    if "class" not in body:
        raise HTTPException(400, 'missing "class": send {"class": NAME[, "region": STRUCTURE | "roi": [...]]}')
    try:
        return service.correct(
            image_id, body["class"], region=body.get("region"), roi=body.get("roi"), task=body.get("task")
        )
    except KeyError as e:
        raise HTTPException(404, f"{e.args[0]}: nothing was stored") from e
    except (LookupError, ValueError, VolumeError) as e:
        raise HTTPException(422, f"{image_id}: {e}; nothing was stored") from e


def install(app: FastAPI, service, model: str = "fewshot_cls") -> None:
    """Add the classifier's routes ahead of MONAI Label's (see the module's docstring).

    Args:
        app: MONAI Label's FastAPI app.
        service: the ClsService.
        model: the classifier's name in MONAI Label (its `/train/{model}` route).
    """
    router = APIRouter()

    @router.put(
        "/metaapp/classes/{image_id}",
        summary="Store a class correction; the classifier adapts",
        dependencies=[ANNOTATOR],
    )
    async def put_class(image_id: str, request: Request):  # reads the image: off the event loop
        return await run_in_threadpool(store_correction, service, image_id, _body(await request.body()))

    @router.delete("/metaapp/classes/{image_id}", summary="Drop a class correction", dependencies=[ANNOTATOR])
    async def delete_class(image_id: str, key: str = "image"):
        try:
            return service.remove(image_id, key)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from e

    @router.get("/metaapp/classes", summary="Classifier heads and the stored class corrections", dependencies=[USER])
    async def classes(image: str | None = None):
        ids = [image] if image else service.image_ids()
        try:
            stored = {i: c for i in ids if (c := service.corrections(i))}
        except KeyError as e:
            raise HTTPException(404, str(e)) from e
        return {"heads": service.heads.snapshot(), "corrections": stored}

    @router.post(f"/train/{model}", include_in_schema=False, dependencies=[ADMIN])
    async def train(request: Request):
        body = _body(await request.body())
        items = body.get("corrections") if isinstance(body.get("corrections"), list) else None
        if items is None and "class" in body:
            items = [body]
        reply = {"id": str(uuid.uuid4()), "status": "QUEUED", "start_ts": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not items:
            return reply | {"model": model, "adapting": service.adapt_all()}
        stored = []
        for it in items:
            if not isinstance(it, dict) or not it.get("image"):
                raise HTTPException(400, 'each correction needs "image" (an image id) and "class"')
            stored.append(store_correction(service, str(it["image"]), it))
        return reply | {"model": model, "stored": stored, "adapting": sorted({s["task"] for s in stored})}

    include_first(app, router)  # ahead of MONAI Label's /train/{model} and the app's
