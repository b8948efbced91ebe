"""Active-learning strategies that use the meta-learned model's own knowledge.

All three read only the cached scores of `lib/scoring/al_scores.py` (no model call on the request
path), never return a labelled study, nor one that another annotator (client id) was served within
the lease (MONAI Label records `strategy.{name}.{ts, client_id}` in the image info on every pick).

* `uncertainty` - the study the adapted heads are least sure about (1 - soft self-Dice; a study
  where a head sees nothing counts as most uncertain; not yet scored = not yet seen = uncertain).
* `diversity` - k-center greedy in the shared encoder's space: the study farthest from every
  labelled or served study (with nothing labelled yet: the most representative one).
* `hybrid` - diversity among the more uncertain half: informative and not redundant.

A request may name structures (`{"structure": "liver"}` or `{"structures": [...]}`) to rank by
those heads only; otherwise the mean over every live head is used.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from monailabel_metaapp.core.selection import farthest_first
from monailabel_metaapp.lib.scoring.al_scores import KEY

logger = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 600.0  # a served study stays reserved for its annotator this long

# MONAI Label records a pick in the image info only after the strategy returns, and its local
# datastore can drop an info update when its file watcher reloads the JSON during a concurrent write
# (e.g. the scoring thread's). The picks are therefore also kept here, in memory, under one lock over
# "rank + reserve", so that two Next Sample requests close together are served different studies.
_PICK_LOCK = threading.Lock()
# datastore -> {image id -> {"client_id", "ts"}} of each study's latest pick in this process
_PICKS: weakref.WeakKeyDictionary[Datastore, dict[str, dict]] = weakref.WeakKeyDictionary()


def requested_structures(request: dict) -> list[str] | None:
    """The structures a request ranks by, so a user can ask for the study most useful to one head.

    Args:
        request: the strategy request; `structures` (a list or a comma-separated string) or `structure`.

    Returns:
        The structure names, or None when the request names none (every live head is used).
    """
    s = request.get("structures") or request.get("structure")
    if not s:
        return None
    return [x.strip() for x in s.split(",")] if isinstance(s, str) else [str(x) for x in s]


def served_to_others(info: dict, client_id: str | None, now: float, lease: float, picks: Sequence[dict] = ()) -> bool:
    """Whether another annotator holds a study, so two annotators are not served the same one.

    Args:
        info: the study's image info (MONAI Label's `strategy.{name}.{ts, client_id}` records).
        client_id: the asking client.
        now: the current time (epoch seconds).
        lease: seconds a served study stays reserved.
        picks: further pick records of the study (`{"client_id", "ts"}`), e.g. this process's own.

    Returns:
        True when any strategy served the study to another client less than `lease` seconds ago.
    """
    for rec in [*(info.get("strategy") or {}).values(), *picks]:
        if isinstance(rec, dict) and rec.get("client_id") != client_id and now - rec.get("ts", 0) < lease:
            return True
    return False


class MetaStrategy(Strategy):
    """Shared eligibility and the ranking API (`rank` is also served at GET /metaapp/activelearning).

    Subclasses implement `order`.

    Args:
        description: the strategy's description shown by MONAI Label.
        lease_seconds: seconds a study served to one client is withheld from others; default
            `DEFAULT_LEASE_SECONDS` (600).
    """

    def __init__(self, description: str, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        super().__init__(description)
        self.lease = lease_seconds

    def candidates(self, request: dict, datastore: Datastore) -> tuple[list[str], list[str]]:
        """Split the studies into those that may be served and those already covered.

        Args:
            request: the strategy request (`client_id`, and `label_tag`/`labels` as MONAI Label passes them).
            datastore: the datastore.

        Returns:
            ``(eligible, covered)``: unlabelled studies not held by another client (sorted), and the
            labelled studies plus those served to others.
        """
        now, client = time.time(), request.get("client_id")
        unlabelled = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        eligible, covered = [], list(datastore.get_labeled_images())
        picks = _PICKS.get(datastore, {})
        for image_id in sorted(unlabelled):
            mine = [picks[image_id]] if image_id in picks else []
            if served_to_others(datastore.get_image_info(image_id), client, now, self.lease, mine):
                covered.append(image_id)
            else:
                eligible.append(image_id)
        return eligible, covered

    def rank(self, request: dict, datastore: Datastore) -> list[dict]:
        """Every eligible study, best first.

        Args:
            request: the strategy request.
            datastore: the datastore.

        Returns:
            Rows ``{"id", "score", "scored", ...}``, best first; empty when no study is eligible.
        """
        eligible, covered = self.candidates(request, datastore)
        return self.order(eligible, covered, request, datastore)

    def order(self, eligible: list[str], covered: list[str], request: dict, datastore: Datastore) -> list[dict]:
        """Rank the eligible studies; each strategy defines it.

        Args:
            eligible: the studies that may be served.
            covered: the studies already labelled or served to others.
            request: the strategy request.
            datastore: the datastore.

        Returns:
            Rows ``{"id", "score", "scored", ...}``, best first.

        Raises:
            NotImplementedError: in this base class.
        """
        raise NotImplementedError

    def __call__(self, request, datastore: Datastore):
        """MONAI Label's strategy call ("Next Sample").

        Args:
            request: the strategy request.
            datastore: the datastore.

        Returns:
            The best study's row (its `id` is the image id), or None when no study is eligible.
        """
        with _PICK_LOCK:
            ranked = self.rank(request, datastore)
            if not ranked:
                return None
            best = ranked[0]
            _PICKS.setdefault(datastore, {})[best["id"]] = {"client_id": request.get("client_id"), "ts": time.time()}
        logger.info("%s: selected %s (%s)", request.get("strategy"), best["id"], best)
        return dict(best)


def uncertainty_of(info: dict, structures: list[str] | None) -> float | None:
    """A study's cached uncertainty, averaged over the asked heads.

    Args:
        info: the study's image info.
        structures: the heads to average over; None: every scored head.

    Returns:
        The mean uncertainty, or None when none of those heads has scored the study.
    """
    u = (info.get(KEY) or {}).get("uncertainty") or {}
    vals = [v for n, v in u.items() if structures is None or n in structures]
    return sum(vals) / len(vals) if vals else None


class Uncertainty(MetaStrategy):
    """`uncertainty`: the study the adapted heads are least sure about.

    Args:
        kw: passed to `MetaStrategy` (`lease_seconds`).
    """

    def __init__(self, **kw):
        super().__init__("Study the adapted heads are least sure about (meta-learned model)", **kw)

    def order(self, eligible, covered, request, datastore):
        """Most uncertain first (ties by id); a study not yet scored counts as most uncertain (score 1)."""
        structures = requested_structures(request)
        rows = []
        for i in eligible:
            u = uncertainty_of(datastore.get_image_info(i), structures)
            rows.append({"id": i, "score": 1.0 if u is None else round(u, 5), "scored": u is not None})
        return sorted(rows, key=lambda r: (-r["score"], r["id"]))


def descriptors(ids: list[str], datastore: Datastore) -> tuple[list[str], torch.Tensor]:
    """The cached encoder descriptors of some studies, for distances in the shared encoder's space.

    Args:
        ids: the studies.
        datastore: the datastore.

    Returns:
        ``(ids that have a descriptor, their (N, D) descriptors)``; a (0, 0) tensor when none has one.
    """
    have, vecs = [], []
    for i in ids:
        d = (datastore.get_image_info(i).get(KEY) or {}).get("descriptor")
        if d:
            have.append(i)
            vecs.append(torch.tensor(d))
    return have, (torch.stack(vecs) if vecs else torch.zeros(0, 0))


def diversity_order(eligible: list[str], covered: list[str], datastore: Datastore) -> list[dict]:
    """Eligible studies in k-center greedy order, so each next study is the least like those before it.

    Args:
        eligible: the studies to order.
        covered: the studies already labelled or served to others (the anchors).
        datastore: the datastore.

    Returns:
        Rows ``{"id", "score", "scored"}``, score = distance to the nearest covered study (0 with none
        covered); studies without a descriptor come last, unscored.
    """
    ids, cand = descriptors(eligible, datastore)
    _, anchors = descriptors(covered, datastore)
    rows = []
    if ids:
        dist = torch.cdist(cand, anchors).min(1).values if anchors.numel() else torch.zeros(len(ids))
        for j in farthest_first(cand, anchors):
            rows.append({"id": ids[j], "score": round(float(dist[j]), 5), "scored": True})
    rows += [{"id": i, "score": 0.0, "scored": False} for i in eligible if i not in ids]
    return rows


class Diversity(MetaStrategy):
    """`diversity`: the study farthest from every labelled or served one in the shared encoder's space.

    Args:
        kw: passed to `MetaStrategy` (`lease_seconds`).
    """

    def __init__(self, **kw):
        super().__init__("Study farthest from everything labelled, in the shared encoder's space", **kw)

    def order(self, eligible, covered, request, datastore):
        """Eligible studies in k-center greedy order (see `diversity_order`)."""
        return diversity_order(eligible, covered, datastore)


class Hybrid(MetaStrategy):
    """`hybrid`: diversity among the more uncertain half, so picks are informative and not redundant.

    Args:
        kw: passed to `MetaStrategy` (`lease_seconds`).
    """

    def __init__(self, **kw):
        super().__init__("Most diverse study among the more uncertain half", **kw)
        self._uncertainty = Uncertainty()

    def order(self, eligible, covered, request, datastore):
        """The more uncertain half in diversity order (rows carry their `uncertainty` too), then the
        rest by uncertainty."""
        by_u = self._uncertainty.order(eligible, covered, request, datastore)
        top = [r["id"] for r in by_u[: max(1, (len(by_u) + 1) // 2)]]
        u = {r["id"]: r["score"] for r in by_u}
        head = [dict(r, uncertainty=u[r["id"]]) for r in diversity_order(top, covered, datastore)]
        return head + [r for r in by_u if r["id"] not in top]
