"""Idle-time site adaptation in the server: while no annotator waits, the encoder keeps meta-training on
the datastore's own images (`core.site_adaptation`), and a guard installs a new encoder only when it is
better on held-out images of the site.

One background thread. Before every short unit of work (one outer step of one task, one image read,
one piece of a check) it waits for its turn at the `SITE` level of the activity gate, so inference,
saves, quick adaptation, Next Sample and structure refinement all pre-empt it within one unit.

Files under `<store_dir>/site/`:
* `state.pt`: the resumable training state (atomic; a restart resumes from it);
* `encoders/vNNNN.pt` (+ `.json` sidecar): every encoder the guard accepted, plain state_dicts;
* `site.json`: the live version, the versions, the checks (both scores, the decision) and the
  minutes of site training.
Version 0 is the encoder the server was started with (conf `model`).

Conf keys: `site_adapt` (default true; false turns it off), `site_adapt_minutes` (cap of training
minutes, 0: no cap), `site_check_minutes` (training minutes between guard checks, default 10),
`site_margin` (the candidate must beat the live encoder by more than this, default 0).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from monailabel_metaapp.core.checkpoint import load_model, save_json, save_model
from monailabel_metaapp.core.episodes import Study, add_superpixels
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.site_adaptation import SiteAdaptation, SiteConfig
from monailabel_metaapp.core.volume import label_slices, read_image, to_slices
from monailabel_metaapp.lib.activity import GATE, SITE

logger = logging.getLogger(__name__)

OFF, IDLE, TRAINING, CHECKING, PAUSED = "off", "idle", "training", "checking", "paused"
KEEP_CHECKS = 50  # checks kept in site.json


def conf_enabled(conf: dict) -> bool:
    return str(conf.get("site_adapt", "true")).strip().lower() not in ("false", "0", "no", "off")


class SiteAdaptationLoop:
    """The background learner of one segmentation service.

    Args:
        store_dir: the app's store (`<studies>/.metaapp`); files go to `<store_dir>/site/`.
        conf: the app's conf (see the module's docstring for the keys).

    `live_weights` says which encoder the service starts with; `attach(service)` starts the thread.
    New encoders go live through the service's `install_encoder(path)`.
    """

    def __init__(self, store_dir: str | Path, conf: dict):
        self.service = None
        self.configured: str | None = None
        self._rolled_back: str | None = None
        self._resumed_at: int | None = None  # the step a restart resumed training at
        self.dir = Path(store_dir) / "site"
        self.enabled = conf_enabled(conf)
        self.cap_minutes = float(conf.get("site_adapt_minutes", 0) or 0)
        self.check_minutes = float(conf.get("site_check_minutes", 10))
        self.cfg = SiteConfig(tasks_per_step=1, margin=float(conf.get("site_margin", 0)))
        self.state = IDLE if self.enabled else OFF
        self.error: str | None = None
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.site: SiteAdaptation | None = None
        self.record = self._load_record()

    # -- the record (site.json) -------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.dir / "site.json"

    def _load_record(self) -> dict:
        import json

        if self.record_path.exists():
            return json.loads(self.record_path.read_text())
        return {}

    def _save_record(self) -> None:
        save_json(self.record_path, self.record)

    def version_path(self, version: int) -> Path:
        return self.dir / "encoders" / f"v{version:04d}.pt"

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
        self._thread = threading.Thread(target=self._run, name="site-adaptation", daemon=True)
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
    def _load_studies(self, cache: dict) -> list[Study]:
        """Every datastore image (final labels where they exist, structures numbered by name), read one by
        one between foreground requests; `cache` keeps those already read (by file and mtime)."""
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
        studies, used = [], set()
        for image_id in sorted(ds.list_images()):
            if not self._turn(TRAINING):
                raise InterruptedError
            path = ds.get_image_uri(image_id)
            lpath = ds.get_label_uri(image_id, "final") if image_id in structures else None
            key = (
                image_id,
                os.path.getmtime(path),
                os.path.getmtime(lpath) if lpath else None,
                tuple(sorted(structures.get(image_id, {}).items())),
            )
            if key not in cache:
                try:
                    stack, geom = to_slices(read_image(path), size)
                except Exception as e:  # an unreadable image is skipped, not fatal
                    logger.warning("site adaptation skips %s: %s", image_id, e)
                    continue
                label = None
                if lpath:
                    raw = label_slices(read_image(lpath), geom, size)
                    label = torch.zeros_like(raw, dtype=torch.int16)
                    for n, v in structures[image_id].items():
                        label[raw == v] = index[n]
                study = Study(name=f"site/{image_id}", image=(stack * 255).round().to(torch.uint8), label=label)
                add_superpixels([study], progress=False)
                cache[key] = study
            studies.append(cache[key])
            used.add(key)
        for k in [k for k in cache if k not in used]:  # images removed or changed since
            del cache[k]
        return studies

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
        studies = self._load_studies(cache)
        if len(studies) < 2:
            self.error = f"site adaptation needs at least 2 images, the datastore has {len(studies)}"
            logger.info(self.error)
            return
        if not self._turn(TRAINING):
            return
        self.site = site = SiteAdaptation(
            studies, rec["base"], self.dir / "state.pt", self.cfg, self.service.device, fresh=fresh
        )
        if site.resumed:
            self._resumed_at = site.steps
            logger.info("site adaptation resumed at step %d (%.1f min)", site.steps, site.minutes)
        live = load_model(self._path_of(int(rec["live"])), self.service.device)
        last_check = rec.get("last_check_minutes", site.minutes)
        last_ckpt = time.monotonic()
        while not self.stop_event.is_set():
            if self.cap_minutes > 0 and site.minutes >= self.cap_minutes:
                if site.minutes > last_check:  # the cap's last minutes are checked too
                    live = self._check(site, live, studies)
                site.checkpoint()
                rec["minutes"] = round(site.minutes, 3)
                self._save_record()
                logger.info("site adaptation reached its cap of %.1f min", self.cap_minutes)
                return
            if not self._turn(TRAINING):
                return
            site.step()
            if time.monotonic() - last_ckpt > self.cfg.checkpoint_seconds:
                site.checkpoint()
                rec["minutes"] = round(site.minutes, 3)
                self._save_record()
                last_ckpt = time.monotonic()
            if site.minutes - last_check >= self.check_minutes:
                studies = self._load_studies(cache)  # images and labels saved since are in the next round
                if len(studies) >= 2:
                    site.set_studies(studies)
                live = self._check(site, live, studies)
                last_check = site.minutes

    def _check(self, site: SiteAdaptation, live, studies: list[Study]):
        """Guard: candidate against live; install the candidate when it is better. Returns the live model."""
        if not self._turn(CHECKING):
            raise InterruptedError
        if self._rolled_back is not None:  # the guard compares against the encoder rolled back to
            live, self._rolled_back = load_model(self._rolled_back, self.service.device), None
        candidate = site.candidate()
        check = site.check(candidate, live, pause=lambda: self._turn(CHECKING))
        rec = self.record
        check["live_version"] = int(rec["live"])
        if check["accepted"]:
            version = max(rec["versions"]) + 1
            path = self.version_path(version)
            save_model(candidate, path, {"site_adaptation": {**site.summary(), "check": check, "version": version}})
            self.service.install_encoder(str(path))
            with self._lock:
                rec["versions"].append(version)
                rec["live"] = version
                rec["live_minutes"] = round(site.minutes, 3)
                rec.setdefault("version_minutes", {})[str(version)] = round(site.minutes, 3)
            check["version"] = version
            live = candidate
            logger.info("site adaptation: encoder v%d is live (%s)", version, _scores(check))
        else:
            logger.info("site adaptation: the live encoder stays (%s)", _scores(check))
        site.checkpoint()
        rec["checks"] = [*rec.get("checks", []), check][-KEEP_CHECKS:]
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
        rec = self.record
        checks = rec.get("checks") or []
        out = {
            "state": self.state,
            "version": int(rec.get("live", 0)),
            "versions": list(rec.get("versions", [0])),
            "minutes": float(rec.get("live_minutes", 0.0)),
            "trained_minutes": round(self.site.minutes, 2) if self.site is not None else float(rec.get("minutes", 0.0)),
            "last_check": checks[-1] if checks else None,
            "steps": self.site.steps if self.site is not None else None,
            "resumed_at_step": self._resumed_at,
            "cap_minutes": self.cap_minutes,
            "check_minutes": self.check_minutes,
        }
        if self.error:
            out["error"] = self.error
        return out


def _scores(check: dict) -> str:
    return f"{check['metric']}: candidate {check['candidate']}, live {check['live']}"
