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

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.checkpoint import load_cls_model, pick_device
from monailabel_metaapp.core.cls_data import ClsEpisode
from monailabel_metaapp.core.cls_metatrain import cls_sources, sampler_for
from monailabel_metaapp.core.cls_model import ClsModelConfig, FewShotClsModel, adapt
from monailabel_metaapp.core.metatrain import MetaTrainConfig, outer_loop
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


def distill_cls(
    teacher_path: str | Path,
    paths: list[str | Path],
    out: str | Path,
    cfg: MetaTrainConfig | None = None,
    student_cfg: ClsModelConfig | None = None,
    n_way: int = 2,
    k_shot: int = 5,
    device: str = "auto",
    progress: bool = True,
    fresh: bool = False,
) -> dict:
    """Meta-train a student classifier distilled from a meta-trained teacher; checkpointed, resumable.

    Args:
        teacher_path: the teacher's weights.
        student_cfg: the student's design (default: `half_width` of the teacher's).
        paths, out, cfg, n_way, k_shot, device, progress, fresh: as for
            `core.cls_metatrain.meta_train_cls` (`out` is the student's weights file).
    """
    cfg = cfg or MetaTrainConfig()
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    teacher = load_cls_model(teacher_path, dev).eval().requires_grad_(False)
    # the student sees the images as the teacher does
    student_cfg = replace(student_cfg or half_width(teacher.cfg), image_crop=teacher.cfg.image_crop)
    student = FewShotClsModel(student_cfg).to(dev).train()
    if student.cfg.size != teacher.cfg.size:
        raise ValueError(f"student size {student.cfg.size} must equal the teacher's {teacher.cfg.size}")
    train, _, pool = cls_sources(paths, student.cfg.size, student.cfg.image_crop, cfg.seed)
    sampler = sampler_for(train, pool, cfg, n_way, k_shot)

    def sample() -> ClsEpisode:
        return sampler.sample().to(dev)

    def objective(episodes):
        losses = [distill_task_loss(student, teacher, ep, cfg.inner_steps) for ep in episodes]
        return with_kl(losses, student.encoder, cfg.lambda_kl)

    return outer_loop(
        student, sample, objective, lambda: float("nan"), cfg, Path(out), dev, progress=progress, fresh=fresh
    )
