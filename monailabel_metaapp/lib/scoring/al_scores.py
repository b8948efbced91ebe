"""Background scoring for active learning: after every adaptation, each study's uncertainty
under the live heads and its encoder descriptor are refreshed in a worker thread and stored in
the datastore's image info (key `metaapp_al`), so that "Next Sample" only reads cached numbers.

The worker yields to adaptation (it waits while heads are being adapted) and restarts its pass
when a newer head is published, so scores never hold up the annotator's save -> better model."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from monailabel.interfaces.tasks.scoring import ScoringMethod

from monailabel_metaapp.core.selection import soft_dice_uncertainty, study_descriptor

logger = logging.getLogger(__name__)

KEY = "metaapp_al"


class ALScores:
    """Keeps `image info[metaapp_al]` = {"model", "descriptor", "uncertainty": {name: u},
    "head_versions": {name: v}, "ts"} up to date for every study, so strategies never call the model.

    A study is rescored when the model changed, it has no descriptor yet, or (unlabelled studies
    only) a head version changed. Every head publish or rollback of `service` triggers a pass.

    Args:
        service: the app's service (datastore, model, live heads and adaptation queue).
    """

    def __init__(self, service):
        self.service = service
        self.datastore = service.datastore
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"passes": 0, "last_pass_s": None, "scored": 0, "state": "idle"}
        self._thread = threading.Thread(target=self._loop, name="metaapp-al-scores", daemon=True)
        service.listeners.append(lambda name: self.trigger())

    def start(self) -> ALScores:
        """Start the worker thread (once) and ask for a first pass; returns this instance."""
        if not self._thread.is_alive():
            self._thread.start()
        self.trigger()
        return self

    def trigger(self) -> None:
        """Ask for a refresh (cheap, never blocks): called after every head publish or rollback."""
        self._dirty.set()

    def status(self) -> dict:
        """The worker's state for clients that poll it.

        Returns:
            ``{"passes", "last_pass_s", "scored", "state", "pending"}``: complete passes, the last one's
            duration, studies scored in the last complete pass, "idle" or "scoring", and whether a
            pass is asked for.
        """
        with self._lock:
            return dict(self._stats, pending=self._dirty.is_set())

    # -- worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._dirty.wait()
            self._set(state="scoring")  # before clearing: a poller never sees idle + not pending mid-pass
            self._dirty.clear()
            t0 = time.perf_counter()
            try:
                complete = self._pass()
            except Exception:  # keep serving with the last scores
                logger.exception("active-learning scoring pass failed")
                complete = True
            if complete:
                with self._lock:
                    self._stats.update(passes=self._stats["passes"] + 1, last_pass_s=round(time.perf_counter() - t0, 2))
            if not self._dirty.is_set():
                self._set(state="idle")

    def _set(self, **kw) -> None:
        with self._lock:
            self._stats.update(kw)

    def _pass(self) -> bool:
        """Score every study that is stale; False when interrupted by a newer head."""
        scored = 0
        labelled_ids = set(self.datastore.get_labeled_images())
        for image_id in sorted(self.datastore.list_images()):
            self.service.queue.wait_idle(3600)  # adaptation first: it is what the annotator waits for
            if self._dirty.is_set():
                return False
            heads = self.service.heads.heads()
            versions = {n: v["version"] for n, v in self.service.heads.snapshot().items() if n in heads}
            old = self.datastore.get_image_info(image_id).get(KEY) or {}
            labelled = image_id in labelled_ids
            same_model = old.get("model") == self.service.model_id
            if same_model and "descriptor" in old and (labelled or old.get("head_versions") == versions):
                continue
            try:
                new = self.score(image_id, heads, versions, need_uncertainty=not labelled)
            except Exception as e:  # a broken study must not stop the others
                logger.warning("cannot score %s: %s", image_id, e)
                continue
            self.datastore.update_image_info(image_id, {KEY: new})
            scored += 1
        self._set(scored=scored)
        return True

    def score(self, image_id: str, heads: dict, versions: dict, need_uncertainty: bool = True) -> dict:
        """One study's active-learning record under the live model (the value stored under `metaapp_al`).

        Args:
            image_id: the study.
            heads: structure name -> live head.
            versions: structure name -> head version, recorded so a later pass can tell stale scores.
            need_uncertainty: compute each head's uncertainty (1 - soft self-Dice); labelled studies
                skip it. Default True.

        Returns:
            ``{"model", "descriptor", "uncertainty": {name: u}, "head_versions", "ts"}``.
        """
        path = self.datastore.get_image_uri(image_id)
        adapter, _ = self.service.live()
        stack, _geom, feats = self.service.study(path, adapter)
        out: dict[str, Any] = {
            "model": self.service.model_id,
            "descriptor": [round(float(x), 5) for x in study_descriptor(feats)],
            "uncertainty": {},
            "head_versions": versions,
            "ts": int(time.time()),
        }
        if need_uncertainty and heads:
            names = sorted(heads)
            probs = [self.service.probabilities(path, stack, feats, adapter, heads[n])[0] for n in names]
            out["uncertainty"] = {n: round(soft_dice_uncertainty(p), 5) for n, p in zip(names, probs)}
        return out


class ALScoring(ScoringMethod):
    """`POST /scoring/metaapp_al`: queue a refresh of every study's active-learning scores.

    Args:
        scores: the background scorer to trigger.
    """

    def __init__(self, scores: ALScores):
        super().__init__("Refresh uncertainty and encoder descriptors of every study (in the background)")
        self.scores = scores

    def __call__(self, request, datastore=None) -> dict:
        """Ask for a pass without waiting for it.

        Args:
            request: the scoring request (unused).
            datastore: the datastore (unused: the scorer has its own); default None.

        Returns:
            ``{"queued": True}`` with the scorer's `status`.
        """
        self.scores.trigger()
        return {"queued": True, **self.scores.status()}
