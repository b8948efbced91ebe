"""TaskConfig of the few-shot classifier: one service shared by its infer task, the class-correction
routes and the class hook of the segmentation results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.config import TaskConfig

from monailabel_metaapp.core.cls_model import DEFAULT_CLS_STEPS
from monailabel_metaapp.lib.cls.classifier import DEFAULT_CLS_WEIGHTS
from monailabel_metaapp.lib.cls.service import ClsService
from monailabel_metaapp.lib.infers.fewshot_cls import FewShotClsInfer
from monailabel_metaapp.lib.site_adaptation import ClsSiteAdaptationLoop

logger = logging.getLogger(__name__)


class FewShotCls(TaskConfig):
    """The few-shot classifier's TaskConfig (conf keys: `cls_model`, `cls_adapt_steps`, `store_dir`, `device`,
    and the `site_*` keys of its encoder's site adaptation)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        """Build the ClsService and the site adaptation of its encoder (started here when on).

        Args:
            name: the model's name in MONAI Label.
            model_dir: MONAI Label's model folder (unused: the weights are named by `cls_model`).
            conf: the app's conf.
            planner: unused.
            kwargs: `datastore`, `studies`, and `seg` (the SegService whose labels and predictions give regions).
        """
        super().init(name, model_dir, conf, planner, **kwargs)
        store_dir = Path(conf.get("store_dir") or Path(kwargs["studies"]) / ".metaapp")
        model = conf.get("cls_model") or str(DEFAULT_CLS_WEIGHTS)
        self.site = ClsSiteAdaptationLoop(store_dir, conf)  # idle-time site adaptation of the encoder
        model = self.site.live_weights(model)  # its live version when there is one
        self.service = ClsService(
            kwargs["datastore"],
            store_dir,
            model,
            device=conf.get("device", "auto"),
            steps=int(conf.get("cls_adapt_steps", DEFAULT_CLS_STEPS)),
            seg=kwargs.get("seg"),
        )
        self.site.attach(self.service)
        self.path = model
        logger.info("few-shot classification: model %s on %s, heads in %s", model, self.service.device, store_dir)

    def infer(self) -> dict:
        """The `fewshot_cls` infer task."""
        return {self.name: FewShotClsInfer(self.service)}

    def trainer(self) -> dict:
        """None: POST /train/fewshot_cls is answered by the classifier's routes."""
        return {}  # POST /train/fewshot_cls is answered in-process (lib/cls/routes.py)
