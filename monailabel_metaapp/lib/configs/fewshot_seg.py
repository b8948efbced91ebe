"""TaskConfig of the few-shot segmentation model: one service shared by its infer, its quick
adaptation ("train") and its full meta-training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.config import TaskConfig

from monailabel_metaapp.core.adaptation import DEFAULT_ADAPT_STEPS
from monailabel_metaapp.core.checkpoint import DEFAULT_SEG_WEIGHTS
from monailabel_metaapp.core.episodes import label_names
from monailabel_metaapp.core.refine import RefineConfig
from monailabel_metaapp.lib.activelearning.meta_strategies import DEFAULT_LEASE_SECONDS, Diversity, Hybrid, Uncertainty
from monailabel_metaapp.lib.conf_flags import OFF, ON, flag
from monailabel_metaapp.lib.infers.fewshot_clicks import FewShotClicksInfer
from monailabel_metaapp.lib.infers.fewshot_seg import FewShotSegInfer
from monailabel_metaapp.lib.scoring.al_scores import ALScores, ALScoring
from monailabel_metaapp.lib.seg.service import SegService
from monailabel_metaapp.lib.site_adaptation import SiteAdaptationLoop
from monailabel_metaapp.lib.trainers.meta_train import MetaTrain
from monailabel_metaapp.lib.trainers.quick_adapt import QuickAdapt

logger = logging.getLogger(__name__)


def refine_config(conf: dict[str, str]) -> RefineConfig | None:
    """Background refinement settings from the app's conf (None when `refine` is false)."""
    if not flag(conf, "refine", False):
        return None  # off unless asked for: at one label its guard can still let a worse version through
    return RefineConfig(
        budget_seconds=float(conf.get("refine_budget_seconds", RefineConfig.budget_seconds)),
        fresh=int(conf.get("refine_fresh", RefineConfig.fresh)),
    )


def unseen_structures(conf: dict[str, str]) -> bool | frozenset[str]:
    """Structures declared new to the encoder (conf `refine_unseen`), which refine from fresh weights
    (`RefineConfig.fresh_first`): True for every structure, else the (lower-case) names listed, comma
    separated. Per structure, because the same start sinks the structures the encoder knows."""
    value = str(conf.get("refine_unseen", "false")).strip()
    if value.lower() in OFF:
        return frozenset()
    if value.lower() in ON:
        return True
    return frozenset(n.strip().lower() for n in value.split(",") if n.strip())


class FewShotSeg(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        datastore, studies = kwargs["datastore"], kwargs["studies"]
        self.store_dir = Path(conf.get("store_dir") or Path(studies) / ".metaapp")
        self.site_model = self.store_dir / "model" / "metaseg.pt"
        model = conf.get("model") or (str(self.site_model) if self.site_model.exists() else str(DEFAULT_SEG_WEIGHTS))
        self.site = SiteAdaptationLoop(self.store_dir, conf)  # idle-time site adaptation of the encoder
        model = self.site.live_weights(model)  # its live version when there is one
        names = {n: v for v, n in label_names(studies).items()}
        unseen = unseen_structures(conf)
        if unseen is not True and (later := sorted(unseen - {n.lower() for n in names})):
            logger.warning("refine_unseen names %s, which no label of the studies defines yet", ", ".join(later))
        self.service = SegService(
            datastore,
            self.store_dir,
            model,
            device=conf.get("device", "auto"),
            steps=int(conf.get("adapt_steps", DEFAULT_ADAPT_STEPS)),
            default_names=names,
            refine=refine_config(conf),
            unseen=unseen,
            refined_in_ram=int(conf.get("refine_models_in_ram", 4)),
            cache_mb=int(conf.get("embedding_cache_mb", 2048)),
        )
        self.site.attach(self.service)
        self.scores = ALScores(self.service)  # started by the app once start-up adaptation is queued
        self.lease = float(conf.get("al_lease_seconds", DEFAULT_LEASE_SECONDS))
        self.path = model
        logger.info("few-shot segmentation: model %s on %s, heads in %s", model, self.service.device, self.store_dir)

    def infer(self) -> dict:
        return {self.name: FewShotSegInfer(self.service), f"{self.name}_clicks": FewShotClicksInfer(self.service)}

    def trainer(self) -> dict:
        return {
            self.name: QuickAdapt(self.service),
            f"{self.name}_metatrain": MetaTrain(self.conf_studies, self.site_model, self.path),
        }

    def strategy(self) -> dict:
        return {
            "uncertainty": Uncertainty(lease_seconds=self.lease),
            "diversity": Diversity(lease_seconds=self.lease),
            "hybrid": Hybrid(lease_seconds=self.lease),
        }

    def scoring_method(self) -> dict:
        return {"metaapp_al": ALScoring(self.scores)}

    @property
    def conf_studies(self) -> str:
        return str(self.kwargs["studies"])
