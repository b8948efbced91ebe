"""Site adaptation of the few-shot classifier's encoder: it keeps meta-training on a site's own images,
and a guard decides whether the result is better than the live encoder.

The same recipe as the segmentation encoder's (`site_adaptation.SiteTrainer`: `metatrain.outer_step`,
the KL prior centred on the live weights, resumable steps, atomic checkpoints), with the classifier's
meta-objective (`objective.cls_meta_objective`) and its episodes (`cls_data.ClsEpisodeSampler`):
* self-supervised UMTRA tasks on every training image (each image its own class, augmentations as
  its examples); a 3D image gives its three central orthogonal slices, each a one-view example, as
  the slices of segmentation studies do in meta-training;
* labelled tasks from the class corrections of a task when it has enough of them: 2 classes with
  `k_shot + n_query` corrections each on training images.

About one image in eight (at least two) is held out of training. The guard (`check`):
* with class corrections of at least 2 classes (2 examples each): leave-one-out AUC (accuracy beside
  it) of the head adapted, as the app adapts it, on the task's other corrections, candidate encoder
  against live; a task whose corrections are also trained on is queried on held-out images only;
* without: the self-supervised validation loss (fixed UMTRA tasks on the held-out images), reported
  but deciding nothing unless `swap_unlabelled` (on unlabelled chest X-rays it fell in every run while
  the few-shot AUC fell too: `benchmarks/cls_site_adaptation.py`).
The candidate goes live only when it is better by more than `margin`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from monailabel_metaapp.core.checkpoint import DEFAULT_CLS_WEIGHTS, load_cls_model
from monailabel_metaapp.core.cls_data import (
    ClsEpisode,
    ClsEpisodeSampler,
    ClsSet,
    image_file_views,
    load_unlabelled_images,
)
from monailabel_metaapp.core.cls_metatrain import UNLABELLED_PREFIX
from monailabel_metaapp.core.cls_model import DEFAULT_CLS_STEPS, FewShotClsModel, adapt, embed_examples
from monailabel_metaapp.core.episodes import IMAGE_SUFFIXES
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.objective import cls_meta_objective, cls_task_loss
from monailabel_metaapp.core.site_adaptation import Pause, SiteConfig, SiteTrainer, _rank_key

FLAT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # 2D images a folder may hold


@dataclass
class ClsSiteConfig(SiteConfig):
    """Site adaptation settings of the classifier (`SiteConfig` plus its episodes and check).

    Args:
        tasks_per_step: episodes per outer step (as the shipped classifier's meta-training).
        swap_unlabelled: let the self-supervised loss decide when no task has class corrections to check.
        n_way: classes per episode.
        k_shot: support examples per class.
        n_query: query examples per class.
        head_steps: the guard's head adaptation steps (as the app's).
        max_queries: at most this many left-out examples per task in the guard.
    """

    tasks_per_step: int = 8
    # without class corrections the self-supervised loss is reported but swaps nothing: on unlabelled
    # chest X-rays it fell in every run while the 5-shot AUC fell too (docs/benchmarks/cls_site_adaptation.md)
    swap_unlabelled: bool = False
    n_way: int = 2
    k_shot: int = 5
    n_query: int = 10
    head_steps: int = DEFAULT_CLS_STEPS
    max_queries: int = 200


@dataclass
class ClsExample:
    """One class correction: a task's example and its class.

    Args:
        task: the classification task.
        image: the image it is on (its name in `ClsSiteData.images`, for the held-out split).
        views: (V, size, size) views in [0, 1], as the classifier sees the example.
        label: the class name.
    """

    task: str
    image: str
    views: torch.Tensor
    label: str


@dataclass
class ClsSiteData:
    """A site's images and class corrections.

    Args:
        images: image name -> (V, size, size) whole-image views in [0, 1].
        examples: the class corrections (none: self-supervised only).
    """

    images: dict[str, torch.Tensor]
    examples: list[ClsExample] = field(default_factory=list)


def split_images(names: list[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) image names: about `fraction` held out, at least 2 (a self-supervised task
    needs two images), chosen by a hash of the name so that the choice stays put as a datastore grows.

    Args:
        names: every image's name.
        fraction: the share held out.
        seed: changes the choice.
    """
    if len(names) < 4:
        raise VolumeError(
            f"classifier site adaptation needs at least 4 images (2 are held out for the check), got {len(names)}"
        )
    ranked = sorted(names, key=lambda n: _rank_key(n, seed))
    n_held = max(2, round(len(names) * fraction))
    held = set(ranked[:n_held])
    return [n for n in names if n not in held], [n for n in names if n in held]


def single_views(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Every view of every image as a one-view example (N, 1, size, size): the UMTRA pool.

    Args:
        images: (V, size, size) views per image.
        size: the view size (for an empty pool).
    """
    return torch.cat([v[:, None] for v in images]) if images else torch.zeros(0, 1, size, size)


class ClsSiteAdaptation(SiteTrainer):
    """Continued meta-training of the classifier's encoder on a site's images, in steps, with a guard.

    Args:
        data: the site's images and class corrections.
        init: weights of the live classifier: the start, and the centre of the KL prior (None: shipped).
        state_path: the resumable state (written atomically by `checkpoint`).
        cfg: the settings (`ClsSiteConfig`).
        device: where to train.
        rank: this process's rank under torchrun.
        world: the number of processes under torchrun.
        fresh: ignore an existing state instead of resuming it.
    """

    config_class = ClsSiteConfig
    label_metric = "auc"
    per_key = "per_task"

    @classmethod
    def load(cls, init: str | Path | None, device: str | torch.device = "cpu") -> FewShotClsModel:
        """The classifier of a weights file (None: the shipped `metacls.pt`).

        Args:
            init: the weights file.
            device: where it goes.
        """
        return load_cls_model(init or DEFAULT_CLS_WEIGHTS, device)

    @classmethod
    def load_sources(cls, sources: list[str | Path], model: FewShotClsModel, progress: bool = True) -> ClsSiteData:
        """Images of folders (any SimpleITK-readable file, PNG and JPEG too) and of `unlabelled:FILE.npz`
        (the train images of a MedMNIST-layout file; its labels are never read), as the model sees them.

        Args:
            sources: folders and `unlabelled:` files.
            model: the live classifier (its view size and crop).
            progress: unused (loading is quick).
        """
        size, crop = model.cfg.size, model.cfg.image_crop
        images: dict[str, torch.Tensor] = {}
        for src in map(str, sources):
            if src.startswith(UNLABELLED_PREFIX):
                path = Path(src[len(UNLABELLED_PREFIX) :])
                views = load_unlabelled_images(path, size, crop=crop)
                images.update({f"{path.stem}:{i}": v for i, v in enumerate(views)})
                continue
            folder = Path(src)
            if not folder.is_dir():
                raise FileNotFoundError(f"no such images folder: {src} (or pass unlabelled:FILE.npz)")
            suffixes = IMAGE_SUFFIXES + FLAT_SUFFIXES
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
            if not files:
                raise ValueError(f"no images found in {folder}")
            images.update({f"{folder.name}/{p.name}": image_file_views(p, size, crop) for p in files})
        return ClsSiteData(images)

    # -- data -------------------------------------------------------------------------------
    def set_data(self, data: ClsSiteData) -> None:
        """(Re)build the held-out split, the episode sampler, the labelled tasks and the validation
        tasks, e.g. after a datastore gained images or class corrections.

        Args:
            data: the site's images and class corrections.
        """
        cfg, size = self.cfg, self.model.cfg.size
        train, held = split_images(sorted(data.images), cfg.holdout_fraction, cfg.seed)
        held_set = set(held)
        need = cfg.k_shot + cfg.n_query
        sets, trained = [], set()
        for task, examples in _by_task(data.examples).items():
            for nv, group in _by_views([e for e in examples if e.image not in held_set]).items():
                counts = {c: sum(e.label == c for e in group) for c in {e.label for e in group}}
                classes = sorted(c for c, n in counts.items() if n >= need)
                if len(classes) >= cfg.n_way:
                    kept = [e for e in group if e.label in classes]
                    images = torch.stack([e.views for e in kept])
                    labels = torch.tensor([classes.index(e.label) for e in kept])
                    sets.append(ClsSet(images, labels, f"corrections:{task}:{nv}"))
                    trained.add(task)
        pool = single_views([data.images[n] for n in train], size)
        seed = cfg.seed + 1000 * self.rank + self.steps  # a resumed run draws other episodes
        ssl = cfg.ssl_fraction if sets else 1.0
        self.sampler = ClsEpisodeSampler(sets, pool, cfg.n_way, cfg.k_shot, cfg.n_query, ssl, seed=seed)
        held_pool = single_views([data.images[n] for n in held], size)
        val = ClsEpisodeSampler([], held_pool, cfg.n_way, cfg.k_shot, cfg.n_query, 1.0, seed=12345)
        self.val_episodes = [val.ssl_task() for _ in range(cfg.val_tasks)]
        self.train_images, self.held, self.labelled_sets = train, held, sets
        self.checks = _loo_checks(data.examples, held_set, trained, cfg.max_queries, cfg.seed)

    def sample(self) -> ClsEpisode:
        """One training episode, on the training device."""
        return self.sampler.sample().to(self.device)

    def objective(self, episodes: list[ClsEpisode]) -> tuple[torch.Tensor, dict[str, float]]:
        """The classification meta-objective (`objective.cls_meta_objective`).

        Args:
            episodes: the batch.
        """
        return cls_meta_objective(self.model, episodes, self.cfg.lambda_kl, self.cfg.inner_steps)

    def data_summary(self) -> dict:
        """Training and held-out images, labelled training tasks and the tasks the guard checks."""
        return {
            "train_images": len(self.train_images),
            "held_out_images": list(self.held),
            "labelled_training_sets": [s.name for s in self.labelled_sets],
            "checked_tasks": sorted(self.checks),
        }

    # -- the guard --------------------------------------------------------------------------
    def episode_loss(self, model: FewShotClsModel, episode: ClsEpisode) -> float:
        """The query loss of one held-out UMTRA task.

        Args:
            model: the classifier to score.
            episode: one of `val_episodes`.
        """
        loss = cls_task_loss(model, episode.to(self.device), self.cfg.inner_steps, first_order=True, sample=False)
        return float(loss.detach())

    def has_labels(self) -> bool:
        """Whether some task has class corrections of 2 classes, 2 examples each, to leave out in turn."""
        return bool(self.checks)

    def labelled_scores(self, model: FewShotClsModel, pause: Pause | None = None) -> dict[str, dict[str, float]]:
        """task -> {"auc", "acc"}: each query example classified by a head adapted on the task's other
        corrections (prototype init and `head_steps` steps at the learned rates, as the app adapts it).

        Args:
            model: the classifier to score.
            pause: called before each task; False stops (InterruptedError).
        """
        from monailabel_metaapp.evaluate_cls import scores

        model = model.to(self.device).eval()
        out = {}
        for task, (examples, queries) in self.checks.items():
            if pause is not None and not pause():
                raise InterruptedError("stopped")
            classes = sorted({e.label for e in examples})
            feats = embed_examples(model, [e.views for e in examples], self.device)
            labels = torch.tensor([classes.index(e.label) for e in examples], device=self.device)
            probs = []
            for q in queries:
                keep = torch.arange(len(examples), device=self.device) != q
                params = adapt(model, feats[keep], labels[keep], len(classes), self.cfg.head_steps)
                with torch.no_grad():
                    probs.append(torch.softmax(model.head.logits(feats[q : q + 1], params), 1)[0])
            y = labels[queries].cpu().numpy()
            out[task] = scores(y, torch.stack(probs).cpu().numpy())
            out[task].pop("bacc")
        return out


def _by_task(examples: list[ClsExample]) -> dict[str, list[ClsExample]]:
    out: dict[str, list[ClsExample]] = {}
    for e in examples:
        out.setdefault(e.task, []).append(e)
    return out


def _by_views(examples: list[ClsExample]) -> dict[int, list[ClsExample]]:
    """Examples grouped by their number of views (an episode stacks examples of one shape)."""
    out: dict[int, list[ClsExample]] = {}
    for e in examples:
        out.setdefault(int(e.views.shape[0]), []).append(e)
    return out


def _loo_checks(
    examples: list[ClsExample], held: set[str], trained: set[str], max_queries: int, seed: int
) -> dict[str, tuple[list[ClsExample], list[int]]]:
    """task -> (its examples of classes with 2 or more, the indices left out in turn). A task trained on
    is queried on held-out images only; a task is checked when its queries hold 2 classes."""
    out = {}
    for task, group in sorted(_by_task(examples).items()):
        counts = {c: sum(e.label == c for e in group) for c in {e.label for e in group}}
        group = [e for e in group if counts[e.label] >= 2]
        queries = [i for i, e in enumerate(group) if task not in trained or e.image in held]
        queries = sorted(queries, key=lambda i: _rank_key(f"{group[i].image}/{i}", seed))[:max_queries]
        if len({group[i].label for i in queries}) >= 2:
            out[task] = (group, sorted(queries))
    return out
