"""Click corrections in the app: each open study keeps, per structure, a copy of the structure's head
that the annotator's points adapt (`core.clicks`). The copy never touches the structure's shared
head; when the study's label is saved, the copy is dropped and the saved label teaches the head as
every saved label does.

Clients (3D Slicer's and OHIF's point tools) send every point placed so far with each request. When
they extend the points the copy already learned from, only the new ones are learned (the copy goes
on from where it was); otherwise (points removed, another head version live) the copy starts again
from the structure's live head.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.clicks import (
    SAVED_SLICES,
    Click,
    Corrections,
    apply_clicks,
    parse_points,
    saved_support,
    to_grid,
)
from monailabel_metaapp.core.episodes import image_stem
from monailabel_metaapp.lib.activity import GATE
from monailabel_metaapp.lib.lru import LRU


class ClickCorrections:
    """Per-study copies of the structures' heads, adapted to the annotators' points.

    Args:
        service: the app's `SegService` (live encoder and heads, the datastore, the study cache).
        max_copies: studies x structures kept at once (the least recently clicked go first).
    """

    def __init__(self, service, max_copies: int = 16):
        self.service = service
        self.copies: LRU[tuple] = LRU(max_items=max_copies)  # (image path, structure) -> (version, Corrections)
        self._lock = threading.Lock()

    def forget(self, image_id: str) -> None:
        """Drop every copy of a study (its label was saved: from now on it teaches the shared head).
        Matched by the image file's name, so a save never has to fetch an image from a PACS.

        Args:
            image_id: the datastore's image id (its file name without the suffix).
        """
        self.copies.drop(lambda key: image_stem(key[0]) == image_id)

    def correct(self, path: str, structure: str | None, foreground: list, background: list) -> tuple[sitk.Image, dict]:
        """The structure's label on the study after the annotator's points (binary, value 1).

        Args:
            path: the study's image.
            structure: the structure's name; None: the structure with a head that the foreground
                points fall in most.
            foreground: [[i, j, k], ...] voxel indices of foreground points (every point so far).
            background: the same for background points.

        Raises:
            VolumeError: a point outside the image, or a malformed one (HTTP 422).
            ValueError: no point at all, or no structure to correct (HTTP 400).
        """
        with GATE.busy(), self._lock:  # one correction at a time: a study's copy is updated in place
            return self._correct(path, structure, foreground, background)

    def _correct(self, path, structure, foreground, background) -> tuple[sitk.Image, dict]:
        t0 = time.perf_counter()
        svc = self.service
        adapter, live = svc.live()
        stack, geom, feats = svc.study(path, adapter)
        size = geom.reference.GetSize()
        clicks = list(dict.fromkeys(parse_points(foreground, True, size) + parse_points(background, False, size)))
        if not clicks:
            raise ValueError("no points: place at least one foreground or background point")
        if not structure:
            structure = self._structure_at(path, stack, geom, feats, adapter, live, clicks)
        head = live.get(structure)
        version = svc.heads.snapshot().get(structure, {}).get("version") if head is not None else None
        if head is None and not any(c.foreground for c in clicks):
            raise ValueError(
                f"{structure!r} has no head yet: start it with a foreground point"
                if structure in svc.heads.labels()
                else f"unknown structure {structure!r} and no foreground point to start it from"
            )
        own, own_feats = (adapter, feats) if head is None else svc.head_features(path, feats, adapter, head)
        key = (os.path.realpath(path), structure)
        kept = self.copies.peek(key)
        state = kept[1] if kept is not None and kept[0] == (version, id(own)) else None
        if state is not None and not set(state.clicks) <= set(clicks):
            state = None  # points were removed: start again from the live head
        if state is None:
            one_piece = head.one_piece if head is not None else True
            shown = svc.shown.peek((key[0], structure, version)) if head is not None else None
            state = Corrections(head, self._saved(structure, own), one_piece, shown=shown)
        new = [c for c in clicks if c not in set(state.clicks)]
        mask = apply_clicks(own, stack, geom, own_feats, state, new) if new else state.mask
        self.copies.put(key, ((version, id(own)), state))
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.CopyInformation(geom.reference)
        params = {
            "label_names": {structure: 1},
            "structure": structure,
            "points": {
                "foreground": sum(c.foreground for c in clicks),
                "background": sum(not c.foreground for c in clicks),
            },
            "head_version": version,
            "learned_from": "points alone" if head is None else f"head version {version} and the points",
            "latencies": {"total": round(time.perf_counter() - t0, 3)},
        }
        return img, params

    def _structure_at(self, path, stack, geom, feats, adapter, live, clicks: list[Click]) -> str:
        """The structure whose live head is most sure at the foreground points (a client that does not
        send the structure's name, such as OHIF's point prompts for a deepgrow model)."""
        fg = [c for c in clicks if c.foreground]
        if not fg or not live:
            raise ValueError("name the structure the points are for (request parameter 'label')")
        best, best_p = None, -1.0
        for name, head in live.items():
            own, own_feats = self.service.head_features(path, feats, adapter, head)
            probs = own.predict(stack, [head], feats=own_feats)[0]
            p = float(np.mean([float(probs[s, y, x]) for s, y, x in (to_grid(c, geom, own.size) for c in fg)]))
            if p > best_p:
                best, best_p = name, p
        return best

    def _saved(self, structure: str, adapter) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features, masks) of about SAVED_SLICES slices of the structure's latest saved labels."""
        items = self.service.labelled_structures().get(structure, [])[-SAVED_SLICES:]
        if not items:
            return None
        _, masks, feats = self.service.labelled(items, adapter)
        return saved_support(adapter, masks, lambda n, idx: feats[n][idx])
