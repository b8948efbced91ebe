"""The inner loop: adapt only the task-specific head, with Meta-SGD per-parameter learning rates.

The loop is written functionally (`PrototypeHead.logits` is a pure function of its parameters), so the
outer loop can differentiate through it (second order) into the encoder, the head's
initialisation and the learned rates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.networks import PrototypeHead


def seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy + soft Dice over the whole batch (robust to empty slices)."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    p = torch.sigmoid(logits)
    if weight is not None:
        p, target = p * weight, target * weight
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice


def inner_adapt(
    head: PrototypeHead,
    params: dict[str, torch.Tensor],
    lrs: dict[str, torch.Tensor],
    feats: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    create_graph: bool = False,
    weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """`steps` gradient steps on the support: theta' = theta - lr (element-wise) * grad."""
    names = list(params)
    for _ in range(steps):
        loss = seg_loss(head.logits(feats, params), mask, weight)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        params = {n: params[n] - lrs[n] * g for n, g in zip(names, grads)}
    return params
