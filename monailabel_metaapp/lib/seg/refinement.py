"""Background refinement of every structure after its quick head is live (see core/refine.py).

One worker thread refines one structure at a time (structures take turns of `TURN_SECONDS`), in
short steps that wait for their turn at the activity gate, so inference, saves, quick adaptation
and Next Sample pre-empt it within one step; the thread runs at the lowest CPU priority, so a step
already under way gives the cores to them at once.
A refined candidate that passes the guard is published as a new version of the structure (stage
`refined`, its own encoder weights beside the head). A new label of a structure restarts its run
warm, from its last state, with the new label included and a new budget; a run stops at a plateau
of its Dice on the held-out slices (a block of every labelled study) or at its budget. With one
labelled study the run is also distilled towards the quick head on other studies of the datastore
(`core.refine`); from two labelled studies a second run from fresh weights trains beside it under
the same guard (`core.refine.TwoStartRefinement`). Each run checkpoints atomically under
`<store>/refine/`, and a restarted server resumes it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from monailabel_metaapp.core.checkpoint import save_torch
from monailabel_metaapp.core.refine import (
    REFINED,
    RefineConfig,
    Refinement,
    TwoStartRefinement,
    refined_adapter,
    start_refinement,
    study_split,
)
from monailabel_metaapp.lib.activity import GATE, REFINE, lower_thread_priority
from monailabel_metaapp.lib.versioned_store import slug

logger = logging.getLogger(__name__)

QUEUED, RUNNING, PLATEAU, BUDGET = "queued", "refining", "plateau", "budget spent"
HELD, FAILED, UNCHECKABLE, OFF = "held after rollback", "failed", "waiting for a label that holds the structure", "off"
CHECKPOINT_SECONDS = 30.0  # of refinement compute between two checkpoints
PUBLISH_SECONDS = 20.0  # of refinement compute between two published versions
ANCHORS = 3  # other studies a candidate must agree with the quick head on
TURN_SECONDS = 60.0  # of refinement compute a structure gets before the next waiting one has its turn


class RefinementWorker:
    """Refines structures of a `SegService` in the background.

    Args:
        service: the segmentation service (its labels, embeddings, head store and device).
        folder: where run checkpoints live (`<store>/refine`).
        cfg: refinement settings (budget, learning rates, guard).
        enabled: False keeps the worker idle (conf `refine=false`).
        unseen: structures new to the encoder, which refine from fresh weights (`RefineConfig.fresh_first`;
            True: every structure; conf `refine_unseen`).
    """

    def __init__(
        self,
        service,
        folder: str | Path,
        cfg: RefineConfig | None = None,
        enabled: bool = True,
        unseen: bool | frozenset[str] = frozenset(),
    ):
        self.service = service
        self.folder = Path(folder)
        self.cfg = cfg or RefineConfig()
        self.enabled = enabled
        self.unseen = unseen
        self._status: dict[str, dict] = {}
        self._pending: list[str] = []
        self._interrupt: set[str] = set()  # structures whose running run must end now
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker and resume every structure whose run is not finished."""
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="metaapp-refine", daemon=True)
        self._thread.start()
        snap = self.service.heads.snapshot()
        for name, items in sorted(self.service.labelled_structures().items()):
            if snap.get(name, {}).get("state") in ("queued", "adapting"):
                continue  # its quick head adapts first, then submits it
            state = self._read(name)
            if state is None or state.get("finished") is None or state.get("labels") != [i for i, _ in items]:
                self.submit(name)
            else:
                self._status[name] = self._status_from(state, state["finished"])

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def submit(self, name: str) -> None:
        """(Re)start the refinement of `name` (after its quick head adapted on new labels)."""
        if not self.enabled:
            return
        with self._cv:
            self._interrupt.add(name)
            if name not in self._pending:
                self._pending.append(name)
            self._status.setdefault(name, {}).update(state=QUEUED)
            self._cv.notify_all()

    def hold(self, name: str) -> None:
        """Stop refining `name` until its next label (an administrator rolled it back)."""
        with self._cv:
            if name in self._pending:
                self._pending.remove(name)
            self._interrupt.add(name)
            self._status.setdefault(name, {}).update(state=HELD)

    def status(self) -> dict[str, dict]:
        """Per structure: the refinement's state, seconds spent, steps, best held-out Dice and the
        quick head's on the same slices."""
        with self._cv:
            return {n: dict(s) for n, s in self._status.items()}

    def wait_idle(self, timeout: float) -> bool:
        """Block until no structure is queued or refining (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or any(s.get("state") == RUNNING for s in self._status.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.2))
            return True

    # -- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        lower_thread_priority()
        while not self._stop.is_set():
            with self._cv:
                self._cv.wait_for(lambda: bool(self._pending) or self._stop.is_set())
                if self._stop.is_set():
                    return
                name = self._pending.pop(0)
                self._interrupt.discard(name)
            try:
                self._run(name)
            except Exception as e:  # a failed refinement must not kill the worker
                logger.exception("refinement of %s failed", name)
                with self._cv:
                    self._status.setdefault(name, {}).update(state=FAILED, error=str(e))
            finally:
                with self._cv:
                    self._cv.notify_all()

    def _run(self, name: str) -> None:
        if not GATE.wait_turn(REFINE, self._stop):
            return
        with GATE.busy(REFINE):
            run, labels, spent = self._prepare(name)
        if run is None:
            return
        self._set(name, run, RUNNING, spent)
        last_ckpt, last_pub = run.seconds, None
        best = None  # the best candidate not yet published: (head, encoder weights, held-out Dice)
        while True:
            if not GATE.wait_turn(REFINE, self._stop):
                self._checkpoint(name, run, labels, spent, None)
                return
            with self._cv:
                interrupted = name in self._interrupt
            if interrupted:  # new labels (queued again: continues from this state) or a rollback
                self._checkpoint(name, run, labels, spent, None)
                with self._cv:
                    if self._status.get(name, {}).get("state") == RUNNING:
                        self._status[name]["state"] = QUEUED
                return
            with GATE.busy(REFINE):
                result = run.advance()
                if result is not None and result[1]:
                    best = (run.head(), run.encoder_state(), result[0])
            with self._cv:
                if name in self._interrupt:  # a rollback or new labels during the step: publish nothing, end above
                    continue
            finished = PLATEAU if run.plateau else BUDGET if spent + run.seconds >= self.cfg.budget_seconds else None
            # the first better candidate goes live at once, later ones at most every PUBLISH_SECONDS (each
            # new version re-scores every study for active learning) and the best one when the run ends
            if best and (last_pub is None or finished or run.seconds - last_pub >= PUBLISH_SECONDS):
                with GATE.busy(REFINE):
                    self._publish(name, run, *best)
                best, last_pub = None, run.seconds
            self._set(name, run, RUNNING if finished is None else finished, spent)
            if finished or run.seconds - last_ckpt >= CHECKPOINT_SECONDS:
                self._checkpoint(name, run, labels, spent, finished)
                last_ckpt = run.seconds
            if finished:
                logger.info(
                    "refinement of %s: %s after %.0f s (held-out Dice %.3f)", name, finished, run.seconds, run.best
                )
                return
            with self._cv:  # other structures wait: take turns, this one goes on later from its checkpoint
                rotate = bool(self._pending) and run.seconds >= TURN_SECONDS
                if rotate:
                    self._pending.append(name)
                    self._status[name]["state"] = QUEUED
            if rotate:
                if best:
                    with GATE.busy(REFINE):
                        self._publish(name, run, *best)
                self._checkpoint(name, run, labels, spent, None)
                return

    def settings(self, name: str) -> RefineConfig:
        """The refinement settings of one structure: from fresh weights when it is declared new to the encoder."""
        new = self.unseen is True or (self.unseen is not False and name.lower() in self.unseen)
        return replace(self.cfg, fresh_first=self.cfg.fresh_first or new)

    def _prepare(self, name: str) -> tuple[Refinement | TwoStartRefinement | None, list[str], float]:
        """A run over the structure's current labels, warm from its last state when there is one."""
        svc = self.service
        items = svc.labelled_structures().get(name, [])
        live = svc.heads.heads().get(name)
        if not items or live is None:
            return None, [], 0.0
        adapter, _ = svc.live()
        stacks, masks, feats = svc.labelled(items, adapter)  # feats: cached, the guard scores the quick head on them
        labels = [image_id for image_id, _ in items]
        if not any(study_split(masks)[1]):  # no label holds the structure: nothing to check a version on
            with self._cv:
                self._status[name] = {"state": UNCHECKABLE, "labels": len(labels)}
            return None, labels, 0.0
        state = self._read(name)
        resumed = state is not None and state.get("labels") == labels and state.get("finished") is None
        spent = float(state.get("spent", 0.0)) if resumed else 0.0
        if live.stage == REFINED and live.encoder_file:  # the live refined version sets the bar too
            floor_adapter = refined_adapter(adapter, torch.load(live.encoder_file, weights_only=True))
        else:
            floor_adapter = None
        anchors, anchor_feats = self._anchors(set(labels), adapter)
        # the warm run starts from, and is distilled towards, the quick head on the meta-learned encoder;
        # a live refined version's head belongs to its own encoder
        quick = live if live.stage != REFINED else adapter.adapt(stacks, masks, feats=feats)
        run = start_refinement(
            adapter,
            stacks,
            masks,
            quick,
            self.settings(name),
            seed=len(labels),
            state=state and state["run"],
            anchors=anchors,
            feats=feats,
            anchor_feats=anchor_feats,
        )
        if floor_adapter is not None:
            run.best = max(run.best, run.score(floor_adapter, live))
        if resumed:
            run.best = max(run.best, float(state.get("best", -1.0)))
        logger.info(
            "refining %s on %d label(s) (%s; quick head's held-out Dice %.3f)",
            name,
            len(labels),
            "resumed" if resumed else "warm" if state else "from the live version",
            run.baseline,
        )
        return run, labels, spent

    def _anchors(self, labelled: set[str], adapter) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(slices, cached embeddings) of up to ANCHORS other studies of the datastore (the guard's
        agreement check)."""
        ds = self.service.datastore
        others = [i for i in sorted(ds.list_images()) if i not in labelled][:ANCHORS]
        stacks, feats = [], []
        for image_id in others:
            try:
                stack, _, f = self.service.study(ds.get_image_uri(image_id), adapter)
            except Exception as e:  # an unreadable study is no anchor
                logger.warning("refinement skips %s as an anchor: %s", image_id, e)
                continue
            stacks.append(stack)
            feats.append(f)
        return stacks, feats

    def _publish(self, name: str, run: Refinement | TwoStartRefinement, head, encoder: dict, val: float) -> None:
        head.stage = REFINED
        info = {
            "val_dice": round(val, 4),
            "baseline_dice": round(run.baseline, 4),
            "refine_seconds": round(run.seconds, 1),
            "start": run.start,
        }
        version = self.service.heads.publish(name, head, encoder=encoder, info=info)
        self.service.notify(name)
        logger.info("refined %s -> version %d (held-out Dice %.3f, quick head %.3f)", name, version, val, run.baseline)

    # -- state ----------------------------------------------------------------------------------
    def _set(self, name: str, run: Refinement | TwoStartRefinement, state: str, spent: float) -> None:
        with self._cv:
            if name in self._interrupt:  # a rollback (held) or new labels (queued) since the step began: it stands
                state = self._status.get(name, {}).get("state", state)
            self._status[name] = {
                "state": state,
                "seconds": round(spent + run.seconds, 1),
                "steps": run.steps,
                "best_val_dice": round(run.best, 4),
                "head_val_dice": None if run.baseline is None else round(run.baseline, 4),
                "labels": len(run.stacks),
            }
            if isinstance(run, TwoStartRefinement):  # which start leads, and the seconds each has had
                self._status[name]["starts"] = {
                    k: {
                        "seconds": round(r.seconds, 1) if r else 0.0,
                        "steps": r.steps if r else 0,  # the fresh run starts at the warm run's first validation
                        "best_val_dice": round(r.top, 4) if r and r.top >= 0 else None,  # None: not validated yet
                    }
                    for k, r in (("warm", run.warm), ("fresh", run.fresh))
                }
            else:  # "fresh" for a structure declared new to the encoder
                self._status[name]["start"] = run.start
            self._cv.notify_all()

    def _status_from(self, state: dict, finished: str) -> dict:
        return {
            "state": finished,
            "seconds": round(float(state.get("spent", 0.0)), 1),
            "steps": int(state["run"].get("steps", 0)),
            "best_val_dice": state.get("best"),
            "labels": len(state.get("labels", [])),
        }

    def _path(self, name: str) -> Path:
        return self.folder / slug(name) / "state.pt"

    def _read(self, name: str) -> dict | None:
        p = self._path(name)
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a damaged checkpoint: start again from the live version
            logger.exception("refinement checkpoint of %s unreadable; starting from the live version", name)
            return None

    def _checkpoint(
        self, name: str, run: Refinement | TwoStartRefinement, labels: list[str], spent: float, finished: str | None
    ) -> None:
        if run.steps == 0 and finished is None:  # nothing learned yet: the previous checkpoint still holds
            return
        state = {
            "run": run.state_dict(),
            "labels": labels,
            "spent": spent + run.seconds,
            "best": run.best,
            "finished": finished,
        }
        save_torch(self._path(name), state)
