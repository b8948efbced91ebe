"""`POST /train/fewshot_seg_metatrain`: full episodic meta-training of the encoder on this
datastore (labelled structures + self-supervised superpixel tasks), from the current weights.
MONAI Label runs it in a subprocess; the server picks up the new weights and re-adapts every head."""

from __future__ import annotations

from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from monailabel_metaapp.core.metatrain import MetaTrainConfig, meta_train


class MetaTrain(TrainTask):
    def __init__(self, studies: str, out: Path, init: str | None):
        super().__init__("Meta-train the shared encoder on this datastore (minutes; GPU when present)")
        self.studies, self.out, self.init = studies, out, init

    def config(self) -> dict:
        return {"minutes": 10.0, "lambda_kl": 1e-3, "device": "auto"}

    def __call__(self, request: dict, datastore) -> dict:
        cfg = MetaTrainConfig(
            minutes=float(request.get("minutes", 10.0)), lambda_kl=float(request.get("lambda_kl", 1e-3))
        )
        tmp = self.out.with_suffix(".training.pt")
        summary = meta_train(
            [self.studies],
            tmp,
            cfg,
            init=str(self.out) if self.out.exists() else self.init,
            device=str(request.get("device", "auto")),
            progress=False,
        )
        for suffix in ("", ".json"):  # publish weights then sidecar, each atomically
            Path(str(tmp) + suffix).replace(str(self.out) + suffix)
        return summary
