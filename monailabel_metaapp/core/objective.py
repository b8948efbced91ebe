"""The meta-objective L_meta = sum_i [L_task_i + lambda * KL(q(theta; alpha) || p(theta))].

The KL is the mean per-weight KL of the encoder's mean-field posterior against its prior
(see `VariationalEncoder.kl`), so `lambda` does not scale with the network's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.cls_data import ClsEpisode
from monailabel_metaapp.core.cls_model import FewShotClsModel
from monailabel_metaapp.core.cls_model import adapt as cls_adapt
from monailabel_metaapp.core.episodes import Episode
from monailabel_metaapp.core.inner_loop import inner_adapt, seg_loss
from monailabel_metaapp.core.networks import FewShotSegModel
from monailabel_metaapp.core.variational import VariationalNet


def task_loss(
    model: FewShotSegModel, ep: Episode, inner_steps: int, first_order: bool = False, sample: bool = True
) -> torch.Tensor:
    """Query loss after adapting the head on the support: one task's L_task_i.

    Args:
        model: the few-shot segmentation model.
        ep: one episode (support and query slices with masks).
        inner_steps: head adaptation steps on the support.
        first_order: do not differentiate through the inner steps.
        sample: embed with one sample of the encoder's weights (else their mean).
    """
    feats = model.embed(torch.cat([ep.x_support, ep.x_query]), sample=sample)
    return head_loss(model, feats, ep, inner_steps, first_order)


def head_loss(
    model: FewShotSegModel, feats: torch.Tensor, ep: Episode, inner_steps: int, first_order: bool = False
) -> torch.Tensor:
    """The query loss of one episode from its embedded support and query slices (in that order)."""
    n_s = ep.x_support.shape[0]
    # channels-last features: the head's per-pixel matmul reads them without a copy, which made the
    # head's steps with their second-order graph 1.4x faster on a 2-core AMD EPYC CPU
    feats = feats.contiguous(memory_format=torch.channels_last)
    f_s, f_q = feats[:n_s], feats[n_s:]
    params = model.head.init_params(f_s, ep.y_support)
    params = inner_adapt(model.head, params, model.lrs(), f_s, ep.y_support, inner_steps, create_graph=not first_order)
    return seg_loss(model.head.logits(f_q, params), ep.y_query)


def with_kl(
    task_losses: list[torch.Tensor], encoder: VariationalNet, lambda_kl: float, kinds: list[str] | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over tasks of [L_task_i + lambda * KL]; returns the loss and its parts for logging.

    Args:
        task_losses: one query loss per episode.
        encoder: the variational encoder whose KL is added.
        lambda_kl: the weight of the KL (0: none, and the KL is not computed).
        kinds: each task's kind: the parts then hold `task_<kind>`, the mean loss of each kind.
    """
    task = torch.stack(task_losses).mean()
    kl = encoder.kl() if lambda_kl > 0 else torch.zeros((), device=task.device)
    parts = {"task": float(task.detach()), "kl": float(kl.detach())}
    for kind in sorted(set(kinds or [])):
        mine = [float(t.detach()) for t, k in zip(task_losses, kinds) if k == kind]
        parts[f"task_{kind}"] = sum(mine) / len(mine)
    return task + lambda_kl * kl, parts


def meta_objective(
    model: FewShotSegModel,
    episodes: list[Episode],
    lambda_kl: float,
    inner_steps: int,
    first_order: bool = False,
    batched: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The segmentation meta-objective over a batch of episodes.

    Args:
        model: the few-shot segmentation model.
        episodes: the batch of tasks.
        lambda_kl: the weight of the KL term.
        inner_steps: head adaptation steps per task.
        first_order: do not differentiate through the inner steps.
        batched: embed every episode's slices in one encoder pass, with one draw of the encoder's weights
            for the whole batch (else one pass and one draw per episode). One large pass keeps an
            accelerator busy; on a CPU the per-episode passes are faster (`benchmarks/metatrain_throughput.py`).
    """
    if batched:
        feats = model.embed(torch.cat([torch.cat([ep.x_support, ep.x_query]) for ep in episodes]), sample=True)
        sizes = [ep.x_support.shape[0] + ep.x_query.shape[0] for ep in episodes]
        losses = [head_loss(model, f, ep, inner_steps, first_order) for f, ep in zip(feats.split(sizes), episodes)]
    else:
        losses = [task_loss(model, ep, inner_steps, first_order) for ep in episodes]
    return with_kl(losses, model.encoder, lambda_kl, [task_kind(ep) for ep in episodes])


def task_kind(ep: Episode) -> str:
    """The kind of a segmentation task, for logging: a pseudo-structure's kind, or `labelled`."""
    return ep.structure if ep.structure in ("merge", "superpixel", "supervoxel") else "labelled"


def cls_task_loss(
    model: FewShotClsModel, ep: ClsEpisode, inner_steps: int, first_order: bool = False, sample: bool = True
) -> torch.Tensor:
    """Query cross-entropy after adapting the prototype-initialised linear head on the support.

    Args:
        model: the few-shot classifier.
        ep: one classification episode.
        inner_steps: head adaptation steps on the support.
        first_order: do not differentiate through the inner steps.
        sample: embed with one sample of the encoder's weights (else their mean).
    """
    n_s = ep.y_support.shape[0]
    feats = model.embed(torch.cat([ep.x_support, ep.x_query]), sample=sample)
    params = cls_adapt(model, feats[:n_s], ep.y_support, ep.n_way, inner_steps, create_graph=not first_order)
    return F.cross_entropy(model.head.logits(feats[n_s:], params), ep.y_query)


def cls_meta_objective(
    model: FewShotClsModel, episodes: list[ClsEpisode], lambda_kl: float, inner_steps: int, first_order: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """The classification meta-objective: the same L_meta, with classification tasks.

    Args:
        model: the few-shot classifier.
        episodes: the batch of tasks.
        lambda_kl: the weight of the KL term.
        inner_steps: head adaptation steps per task.
        first_order: do not differentiate through the inner steps.
    """
    return with_kl([cls_task_loss(model, ep, inner_steps, first_order) for ep in episodes], model.encoder, lambda_kl)
