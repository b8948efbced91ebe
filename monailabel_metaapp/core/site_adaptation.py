"""Site adaptation: the encoder keeps meta-training on a site's own images, and a guard decides whether
the result is better than the live encoder.

Training continues the meta-training recipe (`metatrain.outer_step`, the same meta-objective) from the
live weights, with the KL prior centred on those starting weights so that the encoder cannot drift far:
superpixel tasks on every training image, plus labelled tasks where final labels exist. It runs in
short steps (`SiteAdaptation.step`: an outer step, or with `task_by_task` one task of it) that a caller
can interleave with other work, keeps its elapsed time, and checkpoints atomically so that a restart resumes it.

A few images (about one in eight, at least one) are held out of training. The guard (`check`) compares
a candidate with the live encoder on them:
* with labelled structures: the Dice of heads adapted on the other labelled studies (leave one study
  out, each held-out labelled study predicted in turn), candidate against live;
* without: the self-supervised validation loss (fixed superpixel tasks on the held-out images).
The candidate goes live only when it is better by more than `margin`.

`SiteTrainer` is what the segmentation encoder (`SiteAdaptation`) and the classifier's
(`cls_site_adaptation.ClsSiteAdaptation`) share: steps, checkpoints, resume, the check's decision and
the offline `adapt_site`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import SegAdapter, dice, probabilities_to_labels
from monailabel_metaapp.core.checkpoint import atomic_write, load_model, save_model, sidecar
from monailabel_metaapp.core.episode_bank import BankSampler, SliceBank, TaskShares
from monailabel_metaapp.core.episodes import Episode, EpisodeSampler, Study, add_superpixels, read_studies
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.metatrain import (
    MetaTrainConfig,
    add_gradients,
    any_rank,
    apply_gradients,
    init_distributed,
    make_optimizer,
    one_by_one,
    outer_step,
    rank_device,
)
from monailabel_metaapp.core.networks import FewShotSegModel
from monailabel_metaapp.core.objective import meta_objective, task_loss

Pause = Callable[[], bool]  # called before each unit of work; False: stop now


@dataclass
class SiteConfig:
    lambda_kl: float = 1e-3  # weight of KL(q || p), p centred on the starting weights
    lr: float = 1e-3
    inner_steps: int = 3
    tasks_per_step: int = 4
    # one task per `step` call, the update made when the batch's last task is in (the same update, in
    # pieces of about a second on a CPU: the server's idle loop yields between them)
    task_by_task: bool = False
    ssl_fraction: float = 0.5  # share of superpixel tasks when labelled structures exist (all tasks otherwise)
    # the self-supervised training task: "superpixel" (support and query: one slice, two augmentations) or
    # "supervoxel" (a 3D region's support and query on different slices); the guard's tasks stay superpixel
    ssl_task: str = "superpixel"
    # "classic" (`episodes.EpisodeSampler`) or "bank" (`episode_bank.BankSampler`: multi-scale superpixels,
    # label merges and modality shifts, its kinds weighted by `task_shares`); the guard's tasks stay classic
    sampler: str = "classic"
    task_shares: dict = field(default_factory=dict)  # bank sampler: `episode_bank.TaskShares` fields
    holdout_fraction: float = 0.125  # images held out of training for the guard
    val_tasks: int = 16  # fixed superpixel tasks on the held-out images: the validation loss
    max_support: int = 4  # labelled studies a head adapts on in the guard's Dice check
    check_slices: int = 48  # query slices (evenly spaced) the guard's Dice is computed on
    margin: float = 0.0  # the candidate must beat the live encoder by more than this
    swap_unlabelled: bool = True  # without labels the self-supervised loss decides (False: only reported)
    seed: int = 0
    checkpoint_seconds: float = 60.0
    val_every: int = 50  # steps between validation losses in the log

    def meta(self) -> MetaTrainConfig:
        shared = ("lambda_kl", "lr", "inner_steps", "tasks_per_step", "ssl_fraction", "seed")
        return MetaTrainConfig(**{n: getattr(self, n) for n in shared})


def _rank_key(name: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()


def split_holdout(studies: list[Study], fraction: float, seed: int = 0) -> tuple[list[Study], list[Study]]:
    """(train, held-out) images. Labelled and unlabelled images are held out separately (about
    `fraction` of each, at least one of each kind that has two or more), chosen by a hash of the name,
    so that the choice stays put as a datastore grows."""
    if len(studies) < 2:
        raise VolumeError(
            f"site adaptation needs at least 2 images (some are held out for the check), got {len(studies)}"
        )
    held: list[Study] = []
    for group in ([s for s in studies if s.label is not None], [s for s in studies if s.label is None]):
        if len(group) >= 2:
            ranked = sorted(group, key=lambda s: _rank_key(s.name, seed))
            held += ranked[: max(1, round(len(group) * fraction))]
    ids = {id(s) for s in held}
    return [s for s in studies if id(s) not in ids], held


def structure_key(s: Study, value: int) -> str:
    """Structures are keyed by folder and value, as in the episode sampler."""
    return f"{s.name.split('/')[0]}:{value}"


class SiteTrainer:
    """Continued meta-training of a model's encoder on a site's data, in steps, with a guard: what
    segmentation (`SiteAdaptation`) and classification (`cls_site_adaptation.ClsSiteAdaptation`) share.

    The model starts from `init` with the KL prior centred on it; `step` is one outer step of the
    meta-objective (`metatrain.outer_step`), or with `task_by_task` one task of it; `checkpoint` writes the
    whole state atomically and a new trainer on the same `state_path` resumes it; `check` scores a candidate
    against the live model. A subclass says what the model, the data, the episodes and the two checks are (the
    hooks below).

    Args:
        data: the site's data (what `set_data` takes).
        init: weights of the live model: the start, and the centre of the KL prior.
        state_path: the resumable state (written atomically by `checkpoint`).
        cfg: the settings (`SiteConfig` or a subclass of it).
        device: where to train.
        rank: this process's rank under torchrun.
        world: the number of processes under torchrun.
        fresh: ignore an existing state instead of resuming it.
    """

    config_class: type[SiteConfig] = SiteConfig  # the settings a trainer takes when given none
    label_metric = "dice"  # the labelled check's score (higher is better)
    per_key = "per_structure"  # where the labelled check's per-item scores go in a check record

    def __init__(
        self,
        data,
        init: str | Path | None,
        state_path: str | Path,
        cfg: SiteConfig | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
        fresh: bool = False,
    ):
        self.cfg = cfg or self.config_class()
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.state_path = Path(state_path)
        self.init = str(init) if init else "shipped"
        self.model = self.load(init).to(self.device)
        self.model.encoder.set_prior_to_current()  # p(theta) centred on the live weights
        self.start = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self.model.train()
        self.opt, self.params = make_optimizer(self.model, self.cfg.meta())
        self.steps, self.elapsed = 0, 0.0
        self.pending = 0  # tasks of the next update whose gradients are in (`task_by_task`)
        self.resumed = False
        if self.state_path.exists() and not fresh:
            self._resume()
        self.set_data(data)

    # -- hooks ------------------------------------------------------------------------------
    @classmethod
    def load(cls, init: str | Path | None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model of a weights file (None: the shipped one).

        Args:
            init: the weights file.
            device: where it goes.
        """
        return load_model(init, device)

    @classmethod
    def load_sources(cls, sources: list[str | Path], model: torch.nn.Module, progress: bool = True):
        """The site's data from command-line sources (`adapt_site`).

        Args:
            sources: what `--studies` names.
            model: the live model (its input size).
            progress: show progress.
        """
        return read_studies(sources, model.cfg.size, progress=progress)

    def set_data(self, data) -> None:
        """(Re)build the held-out split, the episode sampler and the validation tasks.

        Args:
            data: the site's data.
        """
        raise NotImplementedError

    def sample(self):
        """One training episode."""
        return self.sampler.sample()

    def draw(self, n: int) -> list:
        """An outer step's n training episodes.

        Args:
            n: how many.
        """
        return one_by_one(self.sample)(n)

    def objective(self, episodes: list) -> tuple[torch.Tensor, dict[str, float]]:
        """The meta-objective of a batch of episodes (task losses and the KL to the prior).

        Args:
            episodes: the batch.
        """
        raise NotImplementedError

    def episode_loss(self, model: torch.nn.Module, episode) -> float:
        """The query loss of one validation episode after the head's inner steps (mean weights).

        Args:
            model: the model to score.
            episode: one of `val_episodes`.
        """
        raise NotImplementedError

    def val_loss(self, model: torch.nn.Module, pause: Pause | None = None) -> float:
        """Mean query loss of the fixed self-supervised tasks on the held-out data (lower is better).

        Args:
            model: the model to score.
            pause: called before each task; False stops (InterruptedError).
        """
        model = model.to(self.device)
        losses = []
        for ep in self.val_episodes:
            if pause is not None and not pause():
                raise InterruptedError("stopped")
            losses.append(self.episode_loss(model, ep))
        return statistics.fmean(losses)

    def has_labels(self) -> bool:
        """Whether the labelled check applies (else the self-supervised loss decides)."""
        return False

    def labelled_scores(self, model: torch.nn.Module, pause: Pause | None = None) -> dict[str, dict[str, float]]:
        """item -> {`label_metric`: score, more scores...} of the labelled check.

        Args:
            model: the model to score.
            pause: called before each unit; False stops (InterruptedError).
        """
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------
    def _resume(self) -> None:
        st = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if st.get("init") != self.init:
            raise ValueError(
                f"{self.state_path} continues site adaptation from {st.get('init')}, not {self.init}: "
                "use the same starting weights to resume, or start afresh"
            )
        self.model.load_state_dict(st["start"])
        self.model.encoder.set_prior_to_current()
        self.start = {k: v.clone() for k, v in st["start"].items()}
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.steps, self.elapsed = int(st["steps"]), float(st["elapsed"])
        self.resumed = True

    def checkpoint(self) -> None:
        """The whole training state, atomically (rank 0 only under torchrun)."""
        if self.rank != 0:
            return
        state = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "start": self.start,
            "init": self.init,
            "steps": self.steps,
            "elapsed": self.elapsed,
        }
        atomic_write(self.state_path, lambda p: torch.save(state, p))

    @property
    def minutes(self) -> float:
        """Minutes of site training so far (a resumed run included)."""
        return self.elapsed / 60

    # -- training ---------------------------------------------------------------------------
    def step(self) -> dict:
        """One outer step of meta-training (a few seconds on a CPU), or with `task_by_task` one task of it
        (`steps` counts the updates); returns its log record."""
        t0 = time.perf_counter()
        self.model.train()
        if not self.cfg.task_by_task:
            parts = outer_step(
                self.model, self.opt, self.params, self.draw, self.objective, self.cfg.tasks_per_step, self.world
            )
            self.steps += 1
        else:
            if not self.pending:
                self.opt.zero_grad(set_to_none=True)
            parts = add_gradients(self.draw, self.objective, 1, scale=1 / self.cfg.tasks_per_step)
            self.pending += 1
            if self.pending == self.cfg.tasks_per_step:
                apply_gradients(self.model, self.opt, self.params, self.world)
                self.pending = 0
                self.steps += 1
        self.elapsed += time.perf_counter() - t0
        return {
            "step": self.steps,
            "seconds": round(self.elapsed, 1),
            "task_loss": round(parts["task"], 4),
            "kl": round(parts["kl"], 4),
        }

    def candidate(self) -> torch.nn.Module:
        """A copy of the weights trained so far, for checking and installing."""
        return copy.deepcopy(self.model).eval()

    def save_candidate(self, path: str | Path, info: dict | None = None) -> None:
        """Write the weights trained so far, with this run's summary in the sidecar.

        Args:
            path: the weights file.
            info: more to record in the sidecar.
        """
        save_model(self.model, path, {"site_adaptation": self.summary(), **(info or {})})

    def summary(self) -> dict:
        """What this run is: start, steps, minutes, data, settings."""
        return {
            "init": self.init,
            "steps": self.steps,
            "minutes": round(self.minutes, 2),
            **self.data_summary(),
            "config": asdict(self.cfg),
        }

    def data_summary(self) -> dict:
        """What `summary` says of the data."""
        return {}

    # -- the guard --------------------------------------------------------------------------
    def check(self, candidate: torch.nn.Module, live: torch.nn.Module, pause: Pause | None = None) -> dict:
        """Candidate against live on the held-out data; `accepted` when the candidate is better by more
        than the margin. Raises InterruptedError when `pause` says stop.

        Args:
            candidate: the model trained so far (`candidate`).
            live: the model in service.
            pause: called before each unit of work; False stops.
        """
        t0 = time.perf_counter()
        rec: dict = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "steps": self.steps}
        rec["minutes"] = round(self.minutes, 2)
        margin, metric = self.cfg.margin, self.label_metric
        if self.has_labels():
            cand, base = self.labelled_scores(candidate, pause), self.labelled_scores(live, pause)
            c = statistics.fmean(v[metric] for v in cand.values())
            b = statistics.fmean(v[metric] for v in base.values())
            rec.update(metric=metric, candidate=round(c, 4), live=round(b, 4), accepted=c > b + margin)
            rec[self.per_key] = {k: _both(cand[k], base[k], metric) for k in cand}
        else:
            c, b = self.val_loss(candidate, pause), self.val_loss(live, pause)
            better = c < b - margin
            rec.update(metric="ssl_loss", candidate=round(c, 4), live=round(b, 4), accepted=better)
            if better and not self.cfg.swap_unlabelled:  # reported, but a loss alone does not swap
                rec.update(accepted=False, better=True, held="no labels to check against")
        rec["margin"] = margin
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        return rec


def _both(cand: dict[str, float], live: dict[str, float], metric: str) -> dict[str, float]:
    """One item's scores in a check record: `candidate` and `live` for the metric, `candidate_X` and
    `live_X` for any other score X."""
    out = {"candidate": round(cand[metric], 4), "live": round(live[metric], 4)}
    for n in cand:
        if n != metric:
            out[f"candidate_{n}"], out[f"live_{n}"] = round(cand[n], 4), round(live[n], 4)
    return out


class SiteAdaptation(SiteTrainer):
    """Continued meta-training of the segmentation encoder on a site's images, in steps, with a guard.

    Args:
        studies: every image of the site (`Study`, labels where final labels exist).
        init: weights of the live encoder: the start, and the centre of the KL prior.
        state_path: the resumable state (written atomically by `checkpoint`).
        cfg: the settings.
        device: where to train.
        rank: this process's rank under torchrun.
        world: the number of processes under torchrun.
        fresh: ignore an existing state instead of resuming it.
    """

    def set_data(self, data: list[Study]) -> None:
        """See `set_studies`.

        Args:
            data: every image of the site.
        """
        self.set_studies(data)

    def set_studies(self, studies: list[Study]) -> None:
        """(Re)build the held-out split, the episode sampler and the validation tasks, e.g. after a
        datastore gained images or labels.

        Args:
            studies: every image of the site.
        """
        train, held = split_holdout(studies, self.cfg.holdout_fraction, self.cfg.seed)
        ctx = self.model.cfg.context
        seed = self.cfg.seed + 1000 * self.rank + self.steps  # a resumed run draws other episodes
        if self.cfg.sampler == "bank":
            if self.cfg.ssl_task != "superpixel":
                raise ValueError("the bank sampler's self-supervised tasks are superpixels: use ssl_task 'superpixel'")
            shares = TaskShares(**self.cfg.task_shares)
            bank = SliceBank(train, ctx, shares, set(), self.device, progress=False, keep_superpixels=True)
            sampler = BankSampler(bank, shares, seed=seed)
        elif self.cfg.sampler == "classic":
            sampler = EpisodeSampler(
                train, ctx, set(), self.cfg.ssl_fraction, device=self.device, seed=seed, ssl_kind=self.cfg.ssl_task
            )
        else:
            raise ValueError(f"sampler must be 'classic' or 'bank', got {self.cfg.sampler!r}")
        add_superpixels(held, progress=False)
        val_sampler = EpisodeSampler(held, ctx, set(), 1.0, device=self.device, seed=12345)
        self.val_episodes = [val_sampler.ssl_task() for _ in range(self.cfg.val_tasks)]
        self.train_studies, self.held, self.all_studies, self.sampler = train, held, list(studies), sampler

    def draw(self, n: int) -> list[Episode]:
        """An outer step's n training episodes (the bank sampler cuts them together).

        Args:
            n: how many.
        """
        if isinstance(self.sampler, BankSampler):
            return self.sampler.sample_batch(n)
        return super().draw(n)

    def objective(self, episodes: list) -> tuple[torch.Tensor, dict[str, float]]:
        """The segmentation meta-objective (`objective.meta_objective`).

        Args:
            episodes: the batch.
        """
        return meta_objective(self.model, episodes, self.cfg.lambda_kl, self.cfg.inner_steps)

    def data_summary(self) -> dict:
        """Training and held-out images."""
        out = {"train_images": len(self.train_studies), "held_out_images": [s.name for s in self.held]}
        if self.cfg.sampler == "bank":  # every share, defaults included
            out["task_shares"] = TaskShares(**self.cfg.task_shares).to_dict()
        return out

    def episode_loss(self, model: FewShotSegModel, episode: Episode) -> float:
        """The query loss of one held-out superpixel task.

        Args:
            model: the model to score.
            episode: one of `val_episodes`.
        """
        return float(task_loss(model, episode, self.cfg.inner_steps, first_order=True, sample=False).detach())

    def labelled_checks(self) -> list[tuple[str, int, Study, list[Study]]]:
        """(structure, value, held-out query, support studies) for the leave-one-study-out Dice."""
        out = []
        for q in self.held:
            for v in q.values():
                key = structure_key(q, v)
                pool = [s for s in self.all_studies if s is not q and structure_key(s, v) == key and v in s.values()]
                if pool:
                    out.append((key, v, q, pool[: self.cfg.max_support]))
        return out

    def has_labels(self) -> bool:
        """Whether a held-out study has a labelled structure that other studies hold too."""
        return bool(self.labelled_checks())

    def labelled_scores(self, model: FewShotSegModel, pause: Pause | None = None) -> dict[str, dict[str, float]]:
        """structure -> {"dice": mean over its held-out studies} (`loso_dice`).

        Args:
            model: the model to score.
            pause: called before each structure; False stops (InterruptedError).
        """
        return {k: {"dice": d} for k, d in self.loso_dice(model, pause).items()}

    def loso_dice(self, model: FewShotSegModel, pause: Pause | None = None) -> dict[str, float]:
        """structure -> mean Dice over its held-out studies, each predicted by a head adapted on the other
        labelled studies (on the model's slice grid, at most `check_slices` evenly spaced slices).

        Args:
            model: the model to score.
            pause: called before each structure; False stops (InterruptedError).
        """
        adapter = SegAdapter(model, self.device)
        per: dict[str, list[float]] = {}
        query_feats: dict[int, torch.Tensor] = {}  # a query holding several structures is embedded once
        for key, v, q, support in self.labelled_checks():
            if pause is not None and not pause():
                raise InterruptedError("stopped")
            head = adapter.adapt([s.image.float() / 255 for s in support], [s.label == v for s in support])
            n = q.image.shape[0]
            idx = sorted({round(i) for i in np.linspace(0, n - 1, min(n, self.cfg.check_slices))})
            if id(q) not in query_feats:
                query_feats[id(q)] = adapter.embed(q.image.float() / 255, idx)
            probs = adapter.predict(q.image, [head], feats=query_feats[id(q)]).numpy()
            pred = probabilities_to_labels(probs, [1], one_piece=head.one_piece) == 1
            per.setdefault(key, []).append(dice(pred, (q.label[idx] == v).numpy()))
        return {k: statistics.fmean(d) for k, d in per.items()}


def adapt_site(
    sources: list[str | Path],
    out: str | Path,
    init: str | Path | None = None,
    minutes: float = 30.0,
    cfg: SiteConfig | None = None,
    device: str = "auto",
    check_minutes: float = 0.0,
    progress: bool = True,
    fresh: bool = False,
    keep_candidates: bool = False,
    trainer: type[SiteTrainer] | None = None,
) -> dict:
    """Offline site adaptation (`metaapp adapt-site`): train for `minutes`, check the candidate against
    the starting weights (also every `check_minutes` when > 0), and write to `out` the encoder the guard
    chose: the candidate when accepted, the starting weights otherwise (the last candidate is then kept
    as `out.candidate.pt`). Resumes from `out.state.pt`; a JSON-lines log in `out.log.jsonl`.

    Args:
        sources: the site's data (`trainer.load_sources`): datastore folders or banks for segmentation.
        out: the weights file the guard's choice is written to.
        init: the starting weights and the prior's centre (None: the shipped model).
        minutes: the training budget.
        cfg: the settings.
        device: "auto", "cpu", "cuda", ...
        check_minutes: also check the candidate every this many minutes (0: at the end only).
        progress: show a progress bar.
        fresh: ignore an existing `out.state.pt` instead of resuming it.
        keep_candidates: every checked candidate is also kept, as `out.stepNNNNN.pt`.
        trainer: what is adapted (default `SiteAdaptation`, the segmentation encoder).
    """
    trainer = trainer or SiteAdaptation
    cfg = cfg or trainer.config_class()
    if minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if init and not Path(init).exists():
        raise FileNotFoundError(f"--init {init}: no such weights file")
    rank, world = init_distributed()
    dev = rank_device(device, world)
    torch.manual_seed(cfg.seed + rank)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    live = trainer.load(init, dev)
    data = trainer.load_sources(sources, live, progress=progress and rank == 0)
    site = trainer(data, init, Path(str(out) + ".state.pt"), cfg, dev, rank, world, fresh)
    if site.resumed and rank == 0:
        print(f"resuming from {site.state_path} at step {site.steps} ({site.minutes:.1f} min done)")
    log_path = Path(str(out) + ".log.jsonl")
    log = open(log_path, "a" if site.resumed else "w", buffering=1) if rank == 0 else None
    checks: list[dict] = []

    def do_check() -> dict:
        rec = site.check(site.candidate(), live)
        checks.append(rec)
        if keep_candidates:
            site.save_candidate(f"{out}.step{site.steps:05d}.pt", {"check": rec})
        if log:
            log.write(json.dumps({"check": rec}) + "\n")
        return rec

    budget = minutes * 60
    bar = tqdm(
        total=int(budget),
        unit="s",
        desc="adapt-site",
        disable=not (progress and rank == 0),
        initial=int(min(site.elapsed, budget)),
    )
    last_ckpt = time.time()
    next_check = site.elapsed + check_minutes * 60 if check_minutes > 0 else math.inf
    if log and not site.resumed:
        log.write(json.dumps({"step": 0, "seconds": 0.0, "val_loss": round(site.val_loss(live), 4)}) + "\n")
    while not any_rank(site.elapsed >= budget, dev, world):
        rec = site.step()
        if site.steps % cfg.val_every == 0 and rank == 0:
            rec["val_loss"] = round(site.val_loss(site.model), 4)
        bar.update(int(min(site.elapsed, budget)) - bar.n)
        bar.set_postfix(loss=rec["task_loss"], **({"val": rec["val_loss"]} if "val_loss" in rec else {}))
        if log:
            log.write(json.dumps(rec) + "\n")
        if time.time() - last_ckpt > cfg.checkpoint_seconds:
            site.checkpoint()
            last_ckpt = time.time()
        if rank == 0 and site.elapsed >= next_check:
            do_check()
            next_check += check_minutes * 60
    bar.close()
    site.checkpoint()
    if rank != 0:
        _finish(world)  # waits for rank 0's check and writes
        return {"rank": rank, "steps": site.steps}
    final = checks[-1] if checks and checks[-1]["steps"] == site.steps else do_check()  # not twice
    info = {"site_adaptation": {**site.summary(), "checks": checks, "accepted": final["accepted"]}}
    candidate_path = Path(str(out) + ".candidate.pt")
    if final["accepted"]:
        site.save_candidate(out, info)
        if candidate_path.exists():
            candidate_path.unlink()
            sidecar(candidate_path).unlink(missing_ok=True)
    else:
        site.save_candidate(candidate_path, info)
        save_model(live, out, info)  # the guard kept the starting weights
    if log:
        log.write(json.dumps({"step": site.steps, "seconds": round(site.elapsed, 1), "final": True}) + "\n")
        log.close()
    _finish(world)
    return {
        "out": str(out),
        "accepted": final["accepted"],
        "check": final,
        "steps": site.steps,
        "minutes": round(site.minutes, 2),
        **({} if final["accepted"] else {"candidate": str(candidate_path)}),
    }


def _finish(world: int) -> None:
    """Under torchrun: every rank leaves together, once rank 0 has written its files."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
