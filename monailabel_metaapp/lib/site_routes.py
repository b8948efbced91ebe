"""REST routes of idle-time site adaptation:
* `GET /metaapp/site`: per model (`fewshot_seg`, `fewshot_cls`), the state, the live encoder version,
  its minutes of site training and the last check (both scores, the decision);
* `POST /metaapp/site/rollback[?version=N][&model=NAME]`: make an earlier encoder live again (default:
  the one before the live one; version 0 is the encoder the server started with; default model: the
  segmentation one); every head re-adapts on it before it goes live.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, FastAPI, HTTPException

from monailabel_metaapp.lib.auth import ADMIN, USER, include_first


def install(app: FastAPI, loops: dict) -> None:
    """Mount the routes.

    Args:
        app: MONAI Label's FastAPI app.
        loops: model name -> its SiteAdaptationLoop (the segmentation model first).
    """
    router = APIRouter()

    def pick(model: str | None):
        loop = loops.get(model) if model else next(iter(loops.values()), None)
        if loop is None:
            raise HTTPException(404, f"unknown model {model!r}" if model else "no model")
        return loop

    @router.get(
        "/metaapp/site", summary="Site adaptation of the encoder: state, versions, last check", dependencies=[USER]
    )
    async def site_status():
        return {name: loop.status() for name, loop in loops.items()}

    @router.post(
        "/metaapp/site/rollback", summary="Make an earlier site-adapted encoder live again", dependencies=[ADMIN]
    )
    async def rollback(version: int | None = None, model: str | None = None):
        loop = pick(model)
        if loop.service is None:
            raise HTTPException(409, "site adaptation is not attached to a service")
        try:  # heads re-adapt on the encoder first: off the event loop
            v = await asyncio.to_thread(loop.rollback, version)
        except ValueError as e:
            raise HTTPException(409, str(e)) from e
        return {"version": v, "site_adaptation": loop.status()}

    include_first(app, router)  # ahead of MONAI Label's routes
