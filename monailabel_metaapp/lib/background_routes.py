"""REST routes that pause and resume every background learner at once (structure refinement and
site adaptation), e.g. for a busy clinic or to compare request times with and without them:
* `GET /metaapp/background`: whether background learning is paused, and whether a refinement or a site
  adaptation step is still finishing;
* `POST /metaapp/background/pause`: hold every background learner at its next step (admin);
* `POST /metaapp/background/resume`: let them go on (admin).
A pause lasts until it is resumed or the server restarts; learners keep their checkpoints meanwhile.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from monailabel_metaapp.lib.activity import GATE, REFINE, SITE
from monailabel_metaapp.lib.auth import ADMIN, USER, include_first


def status() -> dict:
    """Whether background learning is paused, and whether a refinement or site adaptation step is running
    now (a pause takes hold when it ends)."""
    return {
        "paused": GATE.paused,
        "refinement_step_running": GATE.running(REFINE) > 0,
        "site_step_running": GATE.running(SITE) > 0,
    }


def install(app: FastAPI) -> None:
    """Mount the routes on MONAI Label's FastAPI `app`."""
    router = APIRouter()

    @router.get("/metaapp/background", summary="Whether background learning is paused", dependencies=[USER])
    async def background():
        return status()

    @router.post("/metaapp/background/pause", summary="Pause refinement and site adaptation", dependencies=[ADMIN])
    async def pause():
        GATE.pause()
        return status()

    @router.post("/metaapp/background/resume", summary="Resume refinement and site adaptation", dependencies=[ADMIN])
    async def resume():
        GATE.resume()
        return status()

    include_first(app, router)
