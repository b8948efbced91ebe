"""Segmentation on the live encoder and heads: a label map of every structure with a head (`infer`),
and one head's probabilities on a study (`probabilities`, `head_features`: a refined head runs on its
own encoder). `SegService` mixes it in; it reads the service's live encoder and heads (`live`,
`heads`), its study cache (`study`) and its refined encoders (`refined`).
"""

from __future__ import annotations

import os
import time

import numpy as np
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.adaptation import Head, SegAdapter, probabilities_to_labels
from monailabel_metaapp.core.refine import refined_adapter
from monailabel_metaapp.core.volume import stack_to_original
from monailabel_metaapp.lib.activity import GATE


class SegInference:
    """Label maps and probabilities of the live heads, mixed into `SegService`."""

    def infer(self, path: str, structures: list[str] | None = None) -> tuple[sitk.Image, dict]:
        """Label image on the original grid + result parameters (names, versions, stages, timing).

        Args:
            path: the image file.
            structures: the structures to segment (None: every one with a head).
        """
        with GATE.busy():
            return self._infer(path, structures)

    def _infer(self, path: str, structures: list[str] | None) -> tuple[sitk.Image, dict]:
        t0 = time.perf_counter()
        self.refresh_model()
        adapter, live = self.live()
        stack, geom, feats = self.study(path, adapter)
        labels = self.heads.labels()
        names = [n for n in (structures or labels) if n in live]
        if structures:
            unknown = [n for n in structures if n not in labels]
            if unknown:
                raise KeyError(f"unknown structure(s) {unknown}; known: {sorted(labels)}")
        params: dict = {"label_names": {n: labels[n] for n in names}, "head_versions": {}, "head_stages": {}}
        if not names:
            out = np.zeros(sitk.GetArrayViewFromImage(geom.reference).shape, np.uint8)
            params["message"] = "no structure has an adapted head yet: save a label to teach one"
        else:
            heads: list[Head] = [live[n] for n in names]
            probs = torch.cat([self.probabilities(path, stack, feats, adapter, h) for h in heads])
            out = probabilities_to_labels(
                stack_to_original(probs, geom), [labels[n] for n in names], one_piece=[h.one_piece for h in heads]
            )
            snap = self.heads.snapshot()
            for n, p in zip(names, probs):  # what the annotator sees: a click on this study starts from it
                self.shown.put((os.path.realpath(path), n, snap[n]["version"]), p >= 0.5)
            params["head_versions"] = {n: snap[n]["version"] for n in names}
            params["head_stages"] = {n: h.stage for n, h in zip(names, heads)}
        img = sitk.GetImageFromArray(out)
        img.CopyInformation(geom.reference)
        params["latencies"] = {"total": round(time.perf_counter() - t0, 3)}
        return img, params

    def probabilities(self, path: str, stack, feats, adapter: SegAdapter, head: Head) -> torch.Tensor:
        """(1, S, size, size) foreground probabilities of one head: on the shared embeddings for a quick
        head, on its own encoder's (loaded on demand, embeddings cached) for a refined one.

        Args:
            path: the image file.
            stack: the study's slices (`study`).
            feats: the study's embeddings under `adapter`.
            adapter: the live encoder.
            head: the structure's head.
        """
        own, feats = self.head_features(path, feats, adapter, head)
        return own.predict(stack, [head], feats=feats)

    def head_features(self, path: str, feats, adapter: SegAdapter, head: Head) -> tuple[SegAdapter, torch.Tensor]:
        """The adapter a head runs on and the study's embeddings under it: the shared ones (`feats`)
        for a quick head, its own encoder's for a refined one.

        Args:
            path: the image file.
            feats: the study's embeddings under `adapter`.
            adapter: the live encoder.
            head: the structure's head.
        """
        if head.encoder_file is None:
            return adapter, feats
        own = self.refined.get(
            head.encoder_file,
            lambda: refined_adapter(adapter, torch.load(head.encoder_file, map_location="cpu", weights_only=True)),
        )
        _, _, own_feats = self.study(path, own, encoder=head.encoder_file)
        return own, own_feats
