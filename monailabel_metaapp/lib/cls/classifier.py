"""The frozen meta-learned classifier and the head arithmetic on top of it: embed examples, fit a
task's head to labelled examples, predict classes. No datastore, no threads: the service does that."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from monailabel_metaapp.core.checkpoint import DEFAULT_CLS_WEIGHTS, load_cls_model, pick_device
from monailabel_metaapp.core.cls_model import DEFAULT_CLS_STEPS, adapt, embed_examples
from monailabel_metaapp.lib.cls.heads import ClsHead

__all__ = ["DEFAULT_CLS_WEIGHTS", "Classifier"]


class Classifier:
    """The meta-trained classifier encoder, frozen, with its head's adaptation and prediction.

    Args:
        model_path: the meta-trained classifier (default: the shipped `weights/metacls.pt`).
        device: "auto", "cpu", "cuda", ...
        steps: inner-loop steps of each adaptation.
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "auto", steps: int = DEFAULT_CLS_STEPS):
        self.device = pick_device(device)
        self.model_path = str(model_path or DEFAULT_CLS_WEIGHTS)
        self.model = load_cls_model(self.model_path, self.device)
        self.steps = steps

    def embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Examples (each (V, size, size), V may differ) -> (N, D) features on the CPU.

        Args:
            views: one tensor of views per example.
        """
        return embed_examples(self.model, views, self.device).cpu()

    def fit(self, views: list[torch.Tensor], names: list[str]) -> ClsHead:
        """A head adapted to labelled examples (at least two classes).

        Args:
            views: one tensor of views per example.
            names: the class of each example.
        """
        t0 = time.perf_counter()
        counts = {c: names.count(c) for c in sorted(set(names))}
        classes = list(counts)
        feats = self.embed(views).to(self.device)
        labels = torch.tensor([classes.index(n) for n in names], device=self.device)
        params = adapt(self.model, feats, labels, len(classes), self.steps)
        return ClsHead({k: v.detach() for k, v in params.items()}, classes, counts, time.perf_counter() - t0)

    def matches(self, head: ClsHead) -> bool:
        """Whether a head was made for this classifier (its shapes fit the model's head).

        Args:
            head: a stored head.
        """
        return self.model.head.matches(head.params)

    def predict(self, head: ClsHead, feats: torch.Tensor) -> list[list[dict]]:
        """Features (N, D) (`embed`) -> per example, every class with its probability, best first.

        Args:
            head: a task's head.
            feats: the examples' features.
        """
        w = head.params["W0"]
        probs = torch.softmax(self.model.head.logits(feats.to(w.device, w.dtype), head.params), 1)
        return [
            sorted(
                ({"idx": i, "label": c, "score": round(float(p[i]), 4)} for i, c in enumerate(head.classes)),
                key=lambda r: -r["score"],
            )
            for p in probs
        ]
