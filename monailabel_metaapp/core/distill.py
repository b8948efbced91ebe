"""Model-aware knowledge distillation of the few-shot classifier (the seed article's second method).

The teacher is a larger meta-trained classifier. On every episode it is *adapted to that task*
(prototype head + its own learned inner-loop rates), and its adapted predictions on the query are
the soft targets for the student, which adapts its own head on the same support. So the student
learns to adapt like the teacher, not only to mimic a fixed output. Loss per task:
(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), inside the same
meta-objective (KL term on the student's shared layers) and outer loop as meta-training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.checkpoint import load_cls_model
from monailabel_metaapp.core.cls_data import ClsEpisode
from monailabel_metaapp.core.cls_model import ClsModelConfig, FewShotClsModel, adapt
from monailabel_metaapp.core.metatrain import MetaTrainConfig
from monailabel_metaapp.core.objective import with_kl


def half_width(teacher: ClsModelConfig) -> ClsModelConfig:
    """The default student: the teacher's design with half its channels in every block.

    Args:
        teacher: the teacher's configuration.
    """
    return replace(teacher, channels=tuple(max(1, c // 2) for c in teacher.channels))


def distill_task_loss(
    student: FewShotClsModel,
    teacher: FewShotClsModel,
    ep: ClsEpisode,
    inner_steps: int,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """One task's distillation loss: (1 - alpha) CE on the labels + alpha T^2 KL to the adapted teacher.

    Args:
        student: the classifier being trained (sampled weights, differentiated through its inner loop).
        teacher: the frozen larger classifier, adapted to the same support.
        ep: one classification episode.
        inner_steps: head adaptation steps, for both.
        temperature: T, softening both distributions.
        alpha: the weight of the teacher's soft targets.
    """
    n_s = ep.y_support.shape[0]
    x = torch.cat([ep.x_support, ep.x_query])
    with torch.no_grad():
        t_feats = teacher.embed(x)
    t_params = adapt(teacher, t_feats[:n_s], ep.y_support, ep.n_way, inner_steps)
    with torch.no_grad():
        t_logits = teacher.head.logits(t_feats[n_s:], t_params)
    s_feats = student.embed(x, sample=True)
    s_params = adapt(student, s_feats[:n_s], ep.y_support, ep.n_way, inner_steps, create_graph=True)
    s_logits = student.head.logits(s_feats[n_s:], s_params)
    ce = F.cross_entropy(s_logits, ep.y_query)
    t = temperature
    kd = F.kl_div(F.log_softmax(s_logits / t, 1), F.softmax(t_logits / t, 1), reduction="batchmean") * t * t
    return (1 - alpha) * ce + alpha * kd


def load_teacher(path: str | Path, dev: torch.device) -> FewShotClsModel:
    """The teacher, frozen: it is adapted on every task but never trained.

    Args:
        path: the teacher's weights.
        dev: where it runs.
    """
    return load_cls_model(path, dev).eval().requires_grad_(False)


def student_config(teacher: FewShotClsModel, student_cfg: ClsModelConfig | None) -> ClsModelConfig:
    """The student's design; it sees the images as the teacher does (the teacher's image crop).

    Args:
        teacher: the loaded teacher.
        student_cfg: the student's design (None: `half_width` of the teacher's).
    """
    return replace(student_cfg or half_width(teacher.cfg), image_crop=teacher.cfg.image_crop)


def distill_objective(
    student: FewShotClsModel, teacher: FewShotClsModel, episodes: list[ClsEpisode], cfg: MetaTrainConfig
) -> torch.Tensor:
    """The meta-objective of distillation: the tasks' distillation losses + the KL term on the student.

    Args:
        student: the classifier being trained.
        teacher: the frozen teacher.
        episodes: one meta-batch of tasks (on the student's device).
        cfg: the outer loop's settings (inner steps, KL weight).
    """
    losses = [distill_task_loss(student, teacher, ep, cfg.inner_steps) for ep in episodes]
    return with_kl(losses, student.encoder, cfg.lambda_kl)


def distill_cls(teacher_path: str | Path, *args: Any, **kwargs: Any) -> dict:
    """Meta-train a student classifier distilled from a meta-trained teacher; checkpointed, resumable.

    Distillation is meta-training with a teacher: the outer loop, the data and the checkpoints are
    `core.cls_metatrain.meta_train_cls`'s.

    Args:
        teacher_path: the teacher's weights.
        args, kwargs: as for `meta_train_cls` (paths, out, cfg, model_cfg, n_way, k_shot, device,
            progress, fresh); `out` is the student's weights file and `model_cfg` the student's design
            (default: `half_width` of the teacher's).
    """
    from monailabel_metaapp.core.cls_metatrain import meta_train_cls  # it imports this module

    return meta_train_cls(*args, teacher=teacher_path, **kwargs)
