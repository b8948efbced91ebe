"""MONAI Label app: meta-learned few-shot segmentation that adapts on every saved label.

Layout follows MONAI Label's radiology sample app: this file wires `lib/configs/*` (one
TaskConfig per model) into infer, train, active-learning and scoring tasks."""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from monailabel_metaapp import __version__
from monailabel_metaapp.core.episodes import label_names
from monailabel_metaapp.lib import memory
from monailabel_metaapp.lib.activity import GATE
from monailabel_metaapp.lib.configs.fewshot_cls import FewShotCls
from monailabel_metaapp.lib.configs.fewshot_seg import FewShotSeg
from monailabel_metaapp.lib.datastore import ValidatingDatastore

logger = logging.getLogger(__name__)
DEFAULT_MAX_UPLOAD_MB = 1024  # largest request body (a study or a label upload)
DEFAULT_MAX_INFERENCES = 0  # inferences run at once, more queue; 0: no cap (a cap trades throughput for latency)


class MetaApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.configs = {"fewshot_seg": FewShotSeg()}
        self.cls_configs = {"fewshot_cls": FewShotCls()}  # the classifier: regions come from fewshot_seg
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monailabel_metaapp",
            description="Meta-learned few-shot segmentation: learns a structure from 1-5 labels, adapts on every save",
            version=__version__,
        )

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            from monailabel_metaapp.pacs.connect import pacs_datastore

            return pacs_datastore(self.studies, self.conf)
        names = {n: v for v, n in label_names(self.studies).items()}
        return ValidatingDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            default_names=names,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        model_dir = os.path.join(self.app_dir, "model")
        # with a PACS, the heads and the meta-train task live in its local cache
        shared = {"datastore": self._datastore, "studies": getattr(self._datastore, "local_root", self.studies)}
        for name, cfg in self.configs.items():
            cfg.init(name, model_dir, self.conf, None, **shared)
            infers.update(cfg.infer())
        for name, cfg in self.cls_configs.items():
            cfg.init(name, model_dir, self.conf, None, seg=self.configs["fewshot_seg"].service, **shared)
            infers.update(cfg.infer())
            for task in infers.values():  # the class of each segmented region rides in seg results
                if hasattr(task, "classify_regions"):
                    task.classify_regions = cfg.service.classify_regions
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        for cfg in self.configs.values():
            trainers.update(cfg.trainer())
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}  # stock, for comparison
        for cfg in self.configs.values():
            strategies.update(cfg.strategy())
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        methods: dict[str, ScoringMethod] = {}
        for cfg in self.configs.values():
            methods.update(cfg.scoring_method())
        return methods

    def async_scoring(self, method, params=None):
        """MONAI Label would start a scoring subprocess on every "Next Sample"; ours refresh in-process, in
        the background, after each adaptation, so this only nudges them."""
        return {m: self._scoring_methods[m]({}) for m in ([method] if method else self._scoring_methods)}

    def seg_services(self) -> dict[str, Any]:
        return {name: cfg.service for name, cfg in self.configs.items()}

    def on_init_complete(self):
        super().on_init_complete()
        from monailabel.app import app as fastapi_app

        from monailabel_metaapp.lib import auth, limits, offload, ohif
        from monailabel_metaapp.lib.seg import routes as seg_routes

        auth.install()  # before any route can be reached
        limits.install(fastapi_app, float(self.conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB)))
        self.trimmer = memory.Trimmer(lambda: GATE.ticks).start()
        # MONAI Label's inference, save, download and Next Sample off the event loop
        offload.install(fastapi_app, int(self.conf.get("max_concurrent_inferences", DEFAULT_MAX_INFERENCES)))
        seg_routes.install(fastapi_app, self.seg_services(), self._strategies)
        ohif.install(fastapi_app)
        from monailabel_metaapp.lib import site_routes

        loops = {name: cfg.site for name, cfg in {**self.configs, **self.cls_configs}.items()}
        site_routes.install(fastapi_app, loops)
        from monailabel_metaapp.lib import background_routes

        background_routes.install(fastapi_app)
        from monailabel_metaapp.lib.cls import routes as cls_routes

        for name, cfg in self.cls_configs.items():
            cls_routes.install(fastapi_app, cfg.service, name)
            if queued := cfg.service.sync():
                logger.info("adapting classifier heads from stored class corrections: %s", queued)
        for cfg in self.configs.values():
            queued = cfg.service.sync()
            if queued:
                logger.info("adapting heads from existing labels: %s", queued)
            cfg.scores.start()
            cfg.service.refinement.start()
        if hasattr(self._datastore, "poll"):  # a PACS: SEGs stored there by others become final labels
            self._datastore.on_label_imported = lambda image_id: self.on_save_label(image_id, image_id)
            self._datastore.start()

    def next_sample(self, request):
        """Next Sample pre-empts background learning like any request an annotator waits for."""
        with GATE.busy():
            return super().next_sample(request)

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        with GATE.busy():
            return self._on_save_label(image_id, label_id)

    def _on_save_label(self, image_id: str, label_id: str) -> dict:
        super().on_save_label(image_id, label_id)
        saving = getattr(self._datastore, "saving", None)
        if getattr(saving, "tag", "final") != "final":  # a draft or a model's output: nothing to learn from
            return {"metaapp": {}}
        reply = {name: s.on_label_saved(image_id) for name, s in self.seg_services().items()}
        for name, cfg in self.cls_configs.items():  # label_info entries that carry a "class"
            if classes := cfg.service.on_label_saved(image_id):
                reply[name] = classes
        return {"metaapp": reply}

    def info(self) -> dict:
        meta = super().info()
        meta["metaapp"] = {
            name: {
                "device": str(cfg.service.device),
                "model": cfg.service.model_path,
                "structures": cfg.service.structures(),
                "activelearning": cfg.scores.status(),
                "site_adaptation": cfg.site.status(),
            }
            for name, cfg in self.configs.items()
        }
        for name, cfg in self.cls_configs.items():
            meta["metaapp"][name] = {**cfg.service.status(), "site_adaptation": cfg.site.status()}
        if hasattr(self._datastore, "poll"):
            meta["metaapp"]["pacs"] = self._datastore.pacs_status()
        services = {n: c.service for n, c in {**self.configs, **self.cls_configs}.items()}
        found = list(getattr(self._datastore, "problems", []))
        found += [f"{n}: {p}" for n, s in services.items() for p in s.heads.problems]
        from monailabel_metaapp.lib import background_routes

        meta["metaapp"]["background"] = background_routes.status()
        meta["metaapp"]["damaged_at_start"] = found  # damaged files skipped or rebuilt at start-up
        caches = {f"{n}.{k}": v for n, s in services.items() for k, v in s.memory().items()}
        meta["metaapp"]["memory"] = memory.report(caches, getattr(self, "trimmer", None))
        return meta
