"""`POST /train/fewshot_seg` (Slicer's Auto-Update): re-adapt the heads, not a full retrain."""

from __future__ import annotations

from monailabel.interfaces.tasks.train import TrainTask

from monailabel_metaapp.lib.seg.service import SegService


class QuickAdapt(TrainTask):
    def __init__(self, service: SegService, timeout: float = 600.0):
        super().__init__("Adapt the task-specific heads of every labelled structure (seconds)")
        self.service, self.timeout = service, timeout

    def stats(self) -> dict:
        return {"structures": self.service.heads.snapshot()}

    def __call__(self, request: dict, datastore) -> dict:
        names = self.service.adapt_all()
        self.service.queue.wait_idle(self.timeout)
        return {"adapted": names, "structures": self.service.heads.snapshot()}
