"""HTTP routes the app adds to MONAI Label's server.

* `POST /train/{model}` for a quick-adapt model is answered in-process (queue the head
  adaptation, reply at once) instead of MONAI Label's training subprocess; other models fall
  through to the stock route.
* `POST /scoring/metaapp_al` queues the in-process refresh of active-learning scores (the stock route
  would start a subprocess with its own copy of the model).
* `GET /metaapp/structures`, `POST /metaapp/structures/{name}/rollback[?version=N]`.
* `GET /metaapp/activelearning/{strategy}[?structure=NAME&client_id=ID]`: the whole ranking a strategy
  would pick from, with scores (for team leads; "Next Sample" returns its first row).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, FastAPI, HTTPException, Request

from monailabel_metaapp.lib.auth import ADMIN, ANNOTATOR, USER, include_first


def install(app: FastAPI, services: dict, strategies: dict | None = None) -> None:
    """services: quick-adapt model name -> SegService; strategies: name -> Strategy (ranked ones listed)."""
    router = APIRouter()
    strategies = strategies or {}

    @router.post("/train/{model}", include_in_schema=False, dependencies=[ADMIN])
    async def quick_train(model: str, request: Request):
        service = services.get(model)
        if service is None:  # not ours: hand over to MONAI Label's own /train/{model}
            return await _stock(app, request)
        names = service.adapt_all()
        return {
            "id": str(uuid.uuid4()),
            "status": "QUEUED",
            "start_ts": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": model,
            "adapting": names,
        }

    @router.get(
        "/metaapp/structures", summary="Adapted heads: version, labels learned from, state", dependencies=[USER]
    )
    async def structures():
        return {m: s.structures() for m, s in services.items()}

    @router.post(
        "/metaapp/structures/{name}/rollback", summary="Make an earlier head version live again", dependencies=[ADMIN]
    )
    async def rollback(name: str, version: int | None = None, model: str | None = None):
        service = services.get(model) if model else next(iter(services.values()))
        if service is None:
            raise HTTPException(404, f"unknown model {model!r}")
        try:
            v = service.heads.rollback(name, version)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from e
        except ValueError as e:
            raise HTTPException(409, str(e)) from e
        service.refinement.hold(name)  # the administrator's choice stands until the structure's next label
        service.notify(name)
        return {"structure": name, "version": v, "stage": service.heads.version_info(name).get("stage", "head")}

    @router.post("/scoring/{method}", include_in_schema=False, dependencies=[ANNOTATOR])
    async def scoring(method: str, request: Request):
        from monailabel.interfaces.utils.app import app_instance

        task = app_instance()._scoring_methods.get(method)
        if task is None or not hasattr(task, "scores"):  # not ours: MONAI Label's own route
            return await _stock(app, request, "scoring")
        return task({})

    @router.get(
        "/metaapp/activelearning/{strategy}",
        summary="The ranking a strategy picks from, with scores",
        dependencies=[USER],
    )
    async def ranking(strategy: str, structure: str | None = None, client_id: str | None = None):
        from monailabel.interfaces.utils.app import app_instance

        task = strategies.get(strategy)
        if task is None or not hasattr(task, "rank"):
            ranked = sorted(n for n, t in strategies.items() if hasattr(t, "rank"))
            raise HTTPException(404, f"no ranked strategy {strategy!r}; ranked strategies: {ranked}")
        request = {"strategy": strategy, "structure": structure, "client_id": client_id}
        return {"strategy": strategy, "ranking": task.rank(request, app_instance().datastore())}

    include_first(app, router)  # our /train/{model} must win over MONAI Label's


async def _stock(app: FastAPI, request: Request, kind: str = "train"):
    from monailabel.endpoints import scoring, train

    params = None
    body = await request.body()
    if body:
        import json

        params = json.loads(body)
    q = request.query_params
    if kind == "scoring":
        return scoring.run_method(request.path_params["method"], params, q.get("run_sync", "false").lower() == "true")
    return train.run_model(
        request.path_params["model"],
        params,
        q.get("run_sync", "false").lower() == "true",
        q.get("enqueue", "false").lower() == "true",
    )
