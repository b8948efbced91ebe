"""Idle-time site adaptation in the server: while no annotator waits, the encoder keeps meta-training on
the datastore's own images (`core.site_adaptation`), and a guard installs a new encoder only when it is
better on held-out images of the site.

One background thread. Before every short unit of work (one task of a segmentation update, one step of the
classifier's, one image read, one piece of a check) it waits for its turn at the `SITE` level of the activity
gate, so inference, saves, quick adaptation, Next Sample and structure refinement all pre-empt it within one
unit.

Files under `<store_dir>/site/`:
* `state.pt`: the resumable training state (atomic; a restart resumes from it);
* `encoders/vNNNN.pt` (+ `.json` sidecar): every encoder the guard accepted, plain state_dicts;
* `site.json`: the live version, the versions, the checks (both scores, the decision) and the
  minutes of site training.
Version 0 is the encoder the server was started with (conf `model`).

The classifier's encoder has a loop of its own (`ClsSiteAdaptationLoop`): UMTRA tasks on the
datastore's images (plus labelled tasks from class corrections where there are enough), checked by
the leave-one-out AUC of the class heads (without class corrections a self-supervised loss is only
reported and nothing swaps: `core.cls_site_adaptation`); its
files are `cls_state.pt`, `cls_encoders/vNNNN.pt` and `cls.json` in the same folder. The two loops
take turns: one training step at a time.

Conf keys: `site_adapt` (default true; false turns both off), `site_adapt_seg` and `site_adapt_cls`
(default true; false turns one off), `site_adapt_minutes` (cap of training minutes of each, 0: no
cap), `site_check_minutes` (training minutes between guard checks, default 10), `site_margin` (the
candidate must beat the live encoder by more than this, default 0), `site_sampler` (the segmentation
encoder's tasks: `bank`, the default, or `classic`; see `core.site_adaptation.SiteConfig.sampler`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

import torch

from monailabel_metaapp.core.checkpoint import save_json, save_model
from monailabel_metaapp.core.cls_site_adaptation import ClsExample, ClsSiteAdaptation, ClsSiteConfig, ClsSiteData
from monailabel_metaapp.core.episode_bank import TaskShares, study_superpixels
from monailabel_metaapp.core.episodes import Study, add_superpixels
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.site_adaptation import SiteAdaptation, SiteConfig, SiteTrainer
from monailabel_metaapp.core.volume import label_slices, read_image, to_slices
from monailabel_metaapp.lib.activity import GATE, SITE, lower_thread_priority
from monailabel_metaapp.lib.conf_flags import flag

logger = logging.getLogger(__name__)

OFF, IDLE, TRAINING, CHECKING, PAUSED = "off", "idle", "training", "checking", "paused"
KEEP_CHECKS = 50  # checks kept in site.json
SERVER_SUPERPIXEL_SLICES = 24  # bank sampler in the server: slices per image given superpixels (all three scales)
STEP_LOCK = threading.Lock()  # the loops take turns: one training step at a time


def conf_enabled(conf: dict, part: str = "seg") -> bool:
    """Whether site adaptation of one encoder is on.

    Args:
        conf: the app's conf (`site_adapt`, and `site_adapt_seg` or `site_adapt_cls`).
        part: "seg" or "cls".
    """
    return flag(conf, "site_adapt", True) and flag(conf, f"site_adapt_{part}", True)


class SiteAdaptationLoop:
    """The background learner of one segmentation service.

    Args:
        store_dir: the app's store (`<studies>/.metaapp`); files go to `<store_dir>/site/`.
        conf: the app's conf (see the module's docstring for the keys).

    `live_weights` says which encoder the service starts with; `attach(service)` starts the thread.
    New encoders go live through the service's `install_encoder(path)`. A subclass adapts another
    encoder through the hooks marked below.
    """

    part = "seg"  # the conf key `site_adapt_seg`
    files = ("site.json", "state.pt", "encoders")  # record, training state, versions (under site/)
    trainer: type[SiteTrainer] = SiteAdaptation
    min_items = 2  # images needed to start

    def __init__(self, store_dir: str | Path, conf: dict):
        self.service = None
        self.configured: str | None = None
        self._rolled_back: str | None = None
        self._resumed_at: int | None = None  # the step a restart resumed training at
        self.dir = Path(store_dir) / "site"
        self.enabled = conf_enabled(conf, self.part)
        self.cap_minutes = float(conf.get("site_adapt_minutes", 0) or 0)
        self.check_minutes = float(conf.get("site_check_minutes", 10))
        self.cfg = self.config(conf)
        self.state = IDLE if self.enabled else OFF
        self.error: str | None = None
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.site: SiteTrainer | None = None
        self.record = self._load_record()

    # -- hooks ------------------------------------------------------------------------------
    def config(self, conf: dict) -> SiteConfig:
        """The trainer's settings in the server: the offline run's update of 4 tasks, built one task per call
        (about a second on a CPU: a request waits for one task, not four).

        Args:
            conf: the app's conf (`site_margin`, `site_sampler`).
        """
        sampler = str(conf.get("site_sampler", "bank"))
        if sampler not in ("bank", "classic"):
            raise ValueError(f"conf site_sampler must be 'bank' or 'classic', got {sampler!r}")
        shares = {"superpixel_slices": SERVER_SUPERPIXEL_SLICES} if sampler == "bank" else {}  # bounded cost
        margin = float(conf.get("site_margin", 0))
        return SiteConfig(task_by_task=True, margin=margin, sampler=sampler, task_shares=shares)

    def load_live(self, path: str):
        """The model of a weights file, on the service's device.

        Args:
            path: the weights file.
        """
        return self.trainer.load(path, self.service.device)

    # -- the record (site.json) -------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.dir / self.files[0]

    def _load_record(self) -> dict:
        import json

        if self.record_path.exists():
            return json.loads(self.record_path.read_text())
        return {}

    def _save_record(self) -> None:
        save_json(self.record_path, self.record)

    def version_path(self, version: int) -> Path:
        return self.dir / self.files[2] / f"v{version:04d}.pt"

    def live_weights(self, configured: str) -> str:
        """The encoder to start the server with: the live site version when it was adapted from the
        configured weights (also with site adaptation off: what was learned stays until a rollback to
        version 0), the configured weights otherwise (a new `model` starts site adaptation anew)."""
        self.configured = str(configured)
        rec = self.record
        if rec.get("base") != str(configured):  # off too: heads on disk were adapted on the live version
            return configured
        v = int(rec.get("live", 0))
        return str(self.version_path(v)) if v > 0 and self.version_path(v).exists() else configured

    def _path_of(self, version: int) -> str:
        return self.record["base"] if version == 0 else str(self.version_path(version))

    # -- thread -----------------------------------------------------------------------------
    def attach(self, service) -> None:
        """Adapt `service`'s encoder, starting now (in the background) when enabled."""
        self.service = service
        if self.configured is None:
            self.configured = str(service.model_path)
        self.start()

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"site-adaptation-{self.part}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _turn(self, state: str) -> bool:
        """Wait until nothing of higher priority runs; `state` while working. False: stop."""
        if not GATE.quiet(SITE):
            self.state = PAUSED
        ok = GATE.wait_turn(SITE, self.stop_event)
        self.state = state
        return ok

    def _run(self) -> None:
        lower_thread_priority()
        try:
            self._loop()
        except InterruptedError:
            pass
        except Exception as e:  # a failing learner must not take the server down
            logger.exception("site adaptation stopped")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if self.site is not None and self.site.steps:
                self.site.checkpoint()
            self.state = IDLE if self.enabled else OFF

    # -- studies ----------------------------------------------------------------------------
    def load_data(self, cache: dict) -> list[Study]:
        """Every datastore image (final labels where they exist, structures numbered by name), read one by
        one between foreground requests; `cache` keeps those already read (by file and mtime), and an
        image's slices and superpixels survive a new label of it."""
        ds, service = self.service.datastore, self.service
        size = service.adapter.size
        labelled = set(ds.get_labeled_images())
        structures: dict[str, dict[str, int]] = {}
        for image_id in sorted(labelled):
            try:
                structures[image_id] = service.label_structures(image_id)
            except VolumeError as e:
                logger.warning("site adaptation skips the label of %s: %s", image_id, e)
        names = sorted({n for s in structures.values() for n in s})
        index = {n: i + 1 for i, n in enumerate(names)}
        images, labelled_studies = cache.setdefault("images", {}), cache.setdefault("studies", {})
        studies, used = [], set()
        for image_id in sorted(ds.list_images()):
            if not self._turn(TRAINING):
                raise InterruptedError
            path = ds.get_image_uri(image_id)
            lpath = ds.get_label_uri(image_id, "final") if image_id in structures else None
            ikey = (image_id, os.path.getmtime(path))
            key = (  # the numbering of structures is global: a new name elsewhere renumbers this label
                *ikey,
                os.path.getmtime(lpath) if lpath else None,
                tuple(sorted((n, v, index[n]) for n, v in structures.get(image_id, {}).items())),
            )
            if key not in labelled_studies:
                if ikey not in images:
                    try:
                        stack, geom = to_slices(read_image(path), size)
                    except Exception as e:  # an unreadable image is skipped, not fatal
                        logger.warning("site adaptation skips %s: %s", image_id, e)
                        continue
                    image = Study(name=f"site/{image_id}", image=(stack * 255).round().to(torch.uint8), label=None)
                    self.prepare(image)
                    images[ikey] = (image, geom)
                image, geom = images[ikey]
                label = None
                if lpath:
                    raw = label_slices(read_image(lpath), geom, size)
                    label = torch.zeros_like(raw, dtype=torch.int16)
                    for n, v in structures[image_id].items():
                        label[raw == v] = index[n]
                labelled_studies[key] = dataclasses.replace(image, label=label) if label is not None else image
            studies.append(labelled_studies[key])
            used.add(key)
        for k in [k for k in labelled_studies if k not in used]:  # images removed or changed since
            del labelled_studies[k]
        for k in [k for k in images if k not in {u[:2] for u in used}]:
            del images[k]
        return studies

    def prepare(self, image: Study) -> None:
        """An image's self-supervised pseudo-labels, computed once when it is first read (between turns):
        the bank sampler's superpixels at each scale, or the classic sampler's.

        Args:
            image: the image, unlabelled.
        """
        if self.cfg.sampler != "bank":
            add_superpixels([image], progress=False)
            return
        shares = TaskShares(**self.cfg.task_shares)
        for scale in shares.superpixel_scales:
            if not self._turn(TRAINING):
                raise InterruptedError
            study_superpixels(image, scale, shares.superpixel_slices, keep=True)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        rec = self.record
        fresh = False
        if rec.get("base") != self.configured:
            if rec:
                logger.info("site adaptation: the server's model is now %s: starting anew", self.configured)
            rec.clear()
            rec.update(base=self.configured, live=0, versions=[0], minutes=0.0, live_minutes=0.0, checks=[])
            self._save_record()
            fresh = True
        if self.cap_minutes > 0 and float(rec.get("minutes", 0)) >= self.cap_minutes:
            logger.info("site adaptation has already trained its cap of %.1f min", self.cap_minutes)
            return
        cache: dict = {}
        data = self.load_data(cache)
        if _count(data) < self.min_items:
            self.error = f"site adaptation needs at least {self.min_items} images, the datastore has {_count(data)}"
            logger.info(self.error)
            return
        if not self._turn(TRAINING):
            return
        state = self.dir / self.files[1]
        self.site = site = self.trainer(data, rec["base"], state, self.cfg, self.service.device, fresh=fresh)
        if site.resumed:
            self._resumed_at = site.steps
            logger.info("site adaptation (%s) resumed at step %d (%.1f min)", self.part, site.steps, site.minutes)
        live = self.load_live(self._path_of(int(rec["live"])))
        last_check = rec.get("last_check_minutes", site.minutes)
        last_ckpt = time.monotonic()
        while not self.stop_event.is_set():
            if self.cap_minutes > 0 and site.minutes >= self.cap_minutes and not site.pending:
                if site.minutes > last_check:  # the cap's last minutes are checked too
                    live = self._check(site, live)
                site.checkpoint()
                rec["minutes"] = round(site.minutes, 3)
                self._save_record()
                logger.info("site adaptation reached its cap of %.1f min", self.cap_minutes)
                return
            with STEP_LOCK:
                if not self._turn(TRAINING):
                    return
                with GATE.busy(SITE):  # `GET /metaapp/background` shows a step under way
                    site.step()
            if time.monotonic() - last_ckpt > self.cfg.checkpoint_seconds and not site.pending:
                site.checkpoint()
                rec["minutes"] = round(site.minutes, 3)
                self._save_record()
                last_ckpt = time.monotonic()
            if site.minutes - last_check >= self.check_minutes and not site.pending:  # between updates
                data = self.load_data(cache)  # images and labels saved since are in the next round
                if _count(data) >= self.min_items:
                    site.set_data(data)
                live = self._check(site, live)
                last_check = site.minutes

    def _check(self, site: SiteTrainer, live):
        """Guard: candidate against live; install the candidate when it is better. Returns the live model."""
        if not self._turn(CHECKING):
            raise InterruptedError
        if self._rolled_back is not None:  # the guard compares against the encoder rolled back to
            live, self._rolled_back = self.load_live(self._rolled_back), None
        candidate = site.candidate()
        check = site.check(candidate, live, pause=lambda: self._turn(CHECKING))
        rec = self.record
        check["live_version"] = int(rec["live"])
        if check["accepted"]:
            version = max(rec["versions"]) + 1
            path = self.version_path(version)
            save_model(candidate, path, {"site_adaptation": {**site.summary(), "check": check, "version": version}})
            self.service.install_encoder(str(path))
            check["version"] = version
            live = candidate
        with self._lock:  # a new version and the check that made it live are seen together
            if check["accepted"]:
                rec["versions"].append(version)
                rec["live"] = version
                rec["live_minutes"] = round(site.minutes, 3)
                rec.setdefault("version_minutes", {})[str(version)] = round(site.minutes, 3)
            rec["checks"] = [*rec.get("checks", []), check][-KEEP_CHECKS:]
        if check["accepted"]:
            logger.info("site adaptation (%s): encoder v%d is live (%s)", self.part, version, _scores(check))
        else:
            logger.info("site adaptation (%s): the live encoder stays (%s)", self.part, _scores(check))
        site.checkpoint()
        rec["minutes"] = round(site.minutes, 3)
        rec["last_check_minutes"] = round(site.minutes, 3)
        self._save_record()
        return live

    # -- rollback and status ----------------------------------------------------------------
    def rollback(self, version: int | None = None) -> int:
        """Make an earlier encoder live again (default: the one before the live one); heads re-adapt on it.
        A later check may take a newer candidate live again, as a later save re-adapts a rolled-back head."""
        with self._lock:
            rec = self.record
            if not rec:
                raise ValueError("no site-adapted encoder yet: nothing to roll back")
            older = [v for v in rec["versions"] if v < rec["live"]]
            target = version if version is not None else (max(older) if older else None)
            if target is None or target not in rec["versions"] or target == rec["live"]:
                raise ValueError(
                    f"no encoder version {target} to roll back to (versions: {rec['versions']}, live: {rec['live']})"
                )
            path = self._path_of(target)
        self.service.install_encoder(path)
        with self._lock:
            rec["live"] = target
            rec["live_minutes"] = rec.get("version_minutes", {}).get(str(target), 0.0)
            self._save_record()
        self._rolled_back = path
        return target

    def status(self) -> dict:
        with self._lock:
            rec = self.record
            checks = rec.get("checks") or []
            version, versions = int(rec.get("live", 0)), list(rec.get("versions", [0]))
            minutes = float(rec.get("live_minutes", 0.0))
            last_check = checks[-1] if checks else None
        out = {
            "state": self.state,
            "version": version,
            "versions": versions,
            "minutes": minutes,
            "trained_minutes": round(self.site.minutes, 2) if self.site is not None else float(rec.get("minutes", 0.0)),
            "last_check": last_check,
            "steps": self.site.steps if self.site is not None else None,
            "resumed_at_step": self._resumed_at,
            "cap_minutes": self.cap_minutes,
            "check_minutes": self.check_minutes,
        }
        if self.error:
            out["error"] = self.error
        return out


class ClsSiteAdaptationLoop(SiteAdaptationLoop):
    """The background learner of the classifier's encoder (`core.cls_site_adaptation`): UMTRA tasks on
    every datastore image, labelled tasks from class corrections where there are enough, and the
    guard's leave-one-out AUC of the class heads (without corrections nothing swaps).

    Args:
        store_dir: the app's store (`<studies>/.metaapp`); files go to `<store_dir>/site/cls*`.
        conf: the app's conf (see the module's docstring for the keys).
    """

    part = "cls"
    files = ("cls.json", "cls_state.pt", "cls_encoders")
    trainer = ClsSiteAdaptation
    min_items = 4

    def config(self, conf: dict) -> ClsSiteConfig:
        """The classifier's settings (a step of 8 tasks takes a fraction of a second on a CPU).

        Args:
            conf: the app's conf (`site_margin`, of the leave-one-out AUC).
        """
        return ClsSiteConfig(margin=float(conf.get("site_margin", 0)))

    def load_data(self, cache: dict) -> ClsSiteData:
        """Every datastore image as the classifier sees it (a whole image) and every class correction,
        read one by one between foreground requests; `cache` keeps the images already read (by file
        and mtime)."""
        service = self.service
        images, used = {}, set()
        for image_id in sorted(service.image_ids()):
            if not self._turn(TRAINING):
                raise InterruptedError
            try:
                path = service.datastore.get_image_uri(image_id)
                key = (image_id, os.path.getmtime(path))
                if key not in cache:
                    cache[key] = service.regions.image_views(path)
            except Exception as e:  # an unreadable image is skipped, not fatal
                logger.warning("classifier site adaptation skips %s: %s", image_id, e)
                continue
            images[image_id] = cache[key]
            used.add(key)
        for k in [k for k in cache if k not in used]:  # images removed or changed since
            del cache[k]
        examples = []
        for task in sorted(service.store.by_task()):
            if not self._turn(TRAINING):
                raise InterruptedError
            for image_id, key, rec in service.examples(task):
                try:
                    examples.append(ClsExample(task, image_id, service.views(image_id, rec), rec["class"]))
                except (LookupError, ValueError, VolumeError) as e:
                    logger.warning("classifier site adaptation skips correction %s %s: %s", image_id, key, e)
        return ClsSiteData(images, examples)


def _count(data) -> int:
    """Images in a loop's data (a list of studies, or `ClsSiteData`)."""
    return len(data.images) if isinstance(data, ClsSiteData) else len(data)


def _scores(check: dict) -> str:
    return f"{check['metric']}: candidate {check['candidate']}, live {check['live']}"
