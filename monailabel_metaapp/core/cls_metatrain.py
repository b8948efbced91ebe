"""Meta-training of the few-shot classifier: the same outer loop and meta-objective as
segmentation, on classification episodes from MedMNIST-layout files, from regions of segmentation
studies, and from self-supervised (UMTRA) tasks on every image."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from monailabel_metaapp.core.checkpoint import pick_device
from monailabel_metaapp.core.cls_data import (
    ClsEpisode,
    ClsEpisodeSampler,
    ClsSet,
    load_medmnist,
    load_unlabelled_images,
    region_set,
)
from monailabel_metaapp.core.cls_model import ClsModelConfig, FewShotClsModel
from monailabel_metaapp.core.distill import distill_objective, load_teacher, student_config
from monailabel_metaapp.core.episodes import load_bank, load_studies, split_validation
from monailabel_metaapp.core.metatrain import MetaTrainConfig, one_by_one, outer_loop
from monailabel_metaapp.core.objective import cls_meta_objective, cls_task_loss

UNLABELLED_PREFIX = "unlabelled:"


def sampler_for(train: list[ClsSet], pool: torch.Tensor, cfg: MetaTrainConfig, n_way: int, k_shot: int):
    """The meta-training episode sampler of `cfg` (shared by meta-training and distillation).

    Args:
        train: the labelled training sets.
        pool: unlabelled views for self-supervised and synthetic-abnormality tasks.
        cfg: the meta-training settings (SSL share, harder tasks, seed).
        n_way: classes per episode.
        k_shot: support examples per class.
    """
    return ClsEpisodeSampler(
        train,
        pool,
        n_way,
        k_shot,
        10,
        cfg.ssl_fraction,
        seed=cfg.seed,
        max_way=cfg.cls_max_way,
        augment=cfg.cls_augment,
        abnormal_fraction=cfg.cls_abnormal_fraction,
    )


def is_medmnist(path: str | Path) -> bool:
    """Whether a file is a MedMNIST-layout .npz (it has `train_images`).

    Args:
        path: the file.
    """
    return str(path).endswith(".npz") and "train_images" in np.load(path).files


def cls_sources(
    paths: list[str | Path], size: int, crop: float, seed: int = 0
) -> tuple[list[ClsSet], list[ClsSet], torch.Tensor]:
    """(train sets, validation sets, unlabelled views for SSL) from MedMNIST files, segmentation banks
    and segmentation datastore folders (their validation regions come from held-out studies,
    `split_validation`, as in segmentation meta-training). `unlabelled:FILE.npz`
    (`UNLABELLED_PREFIX`) adds only the train images of a MedMNIST-layout file to the unlabelled
    views: its labels are never read. Whole images are seen through their central `crop`.

    Args:
        paths: MedMNIST files, `unlabelled:` files, segmentation banks and datastore folders.
        size: the model's view size.
        crop: the central share of a whole image the model sees.
        seed: for the validation split and the sampling of slices.
    """
    train, val, pool = [], [], []
    for p in paths:
        if str(p).startswith(UNLABELLED_PREFIX):
            pool.append(load_unlabelled_images(str(p)[len(UNLABELLED_PREFIX) :], size, crop=crop))
        elif is_medmnist(p):
            tr = load_medmnist(p, "train", size, crop)
            train.append(tr)
            pool.append(tr.images)
            if "val_images" in np.load(p).files:
                val.append(load_medmnist(p, "val", size, crop))
        else:  # a segmentation bank (`metaapp bank`) or datastore folder: regions + slices for SSL
            studies = load_bank(p) if str(p).endswith(".npz") else load_studies([p], 160, progress=False)
            train_studies, val_studies = split_validation(studies, seed)
            rs = region_set(train_studies, size, seed=seed)
            rs.name = f"regions:{Path(p).stem}"
            train.append(rs)
            vs = region_set(val_studies, size, seed=seed) if val_studies else None
            if vs is not None and len(vs.classes()) >= 2:
                val.append(vs)
            slices = torch.cat([s.image.float() / 255.0 for s in studies])
            pick = random.Random(seed).sample(range(slices.shape[0]), min(2000, slices.shape[0]))
            pool.append(torch.nn.functional.interpolate(slices[pick][:, None], size=(size, size), mode="bilinear"))
    return train, val, torch.cat(pool) if pool else torch.zeros(0, 1, size, size)


def meta_train_cls(
    paths: list[str | Path],
    out: str | Path,
    cfg: MetaTrainConfig | None = None,
    model_cfg: ClsModelConfig | None = None,
    n_way: int = 2,
    k_shot: int = 5,
    device: str = "auto",
    progress: bool = True,
    fresh: bool = False,
    teacher: str | Path | None = None,
) -> dict:
    """Meta-train the few-shot classifier (checkpointed, resumable), validating on held-out tasks.

    With a `teacher`, the classifier is a student distilled from it (`core.distill`): each task's
    loss is `distill_task_loss`, and no validation tasks are drawn (their loss would need the
    teacher's adapted predictions too).

    Args:
        paths: the training data (see `cls_sources`).
        out: the weights file.
        cfg: the outer loop's settings (minutes, steps, tasks per step, KL weight, SSL share, ...).
        model_cfg: the classifier's design (default: `ClsModelConfig()`; with a teacher, `half_width`
            of the teacher's, and always the teacher's image crop).
        n_way: classes per episode.
        k_shot: support examples per class.
        device: "auto", "cpu", "cuda", ...
        progress: show a progress bar.
        fresh: start over instead of resuming from `out`'s checkpoint.
        teacher: a meta-trained classifier's weights to distill from (None: plain meta-training).

    Returns:
        The training summary (also in the weights' sidecar).
    """
    cfg = cfg or MetaTrainConfig()
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    tutor = None
    if teacher is not None:
        tutor = load_teacher(teacher, dev)
        model_cfg = student_config(tutor, model_cfg)
    model = FewShotClsModel(model_cfg or ClsModelConfig()).to(dev).train()
    if tutor is not None and model.cfg.size != tutor.cfg.size:
        raise ValueError(f"student size {model.cfg.size} must equal the teacher's {tutor.cfg.size}")
    train, val, pool = cls_sources(paths, model.cfg.size, model.cfg.image_crop, cfg.seed)
    sampler = sampler_for(train, pool, cfg, n_way, k_shot)
    val_sampler = ClsEpisodeSampler(val, None, n_way, k_shot, 10, seed=12345) if val and tutor is None else None
    val_eps = [val_sampler.labelled_task() for _ in range(cfg.val_tasks)] if val_sampler else []

    def validate() -> dict[str, float]:
        if not val_eps:
            return {}
        losses = [
            float(cls_task_loss(model, ep.to(dev), cfg.inner_steps, True, sample=False).detach()) for ep in val_eps
        ]
        return {"val_loss": sum(losses) / len(losses)}

    def objective(episodes):
        if tutor is not None:
            return distill_objective(model, tutor, episodes, cfg)
        return cls_meta_objective(model, episodes, cfg.lambda_kl, cfg.inner_steps, cfg.first_order)

    def sample() -> ClsEpisode:
        return sampler.sample().to(dev)

    return outer_loop(
        model, one_by_one(sample), objective, validate, cfg, Path(out), dev, progress=progress, fresh=fresh
    )
