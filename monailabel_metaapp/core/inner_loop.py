"""The inner loop: adapt only the task-specific head, with Meta-SGD per-parameter learning rates.

The loop is written functionally (a head's `logits` is a pure function of its parameters), so the
outer loop can differentiate through it (second order) into the encoder, the head's
initialisation and the learned rates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F


class TaskHead(Protocol):
    """Task-specific layers as a pure function of their parameters (segmentation or classification).

    Not to be confused with `core.adaptation.Head`, an adapted segmentation head's parameters.
    """

    @staticmethod
    def logits(feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features -> logits, a pure function of `params`.

        Args:
            feats: the features.
            params: the head's parameters.
        """
        ...


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice over the whole batch (robust to empty slices).

    Args:
        logits: predicted logits, any shape.
        target: the binary mask, the shape of `logits`.
    """
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice


def inner_adapt(
    head: TaskHead,
    params: dict[str, torch.Tensor],
    lrs: dict[str, torch.Tensor],
    feats: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    create_graph: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = seg_loss,
) -> dict[str, torch.Tensor]:
    """`steps` gradient steps on the support: theta' = theta - lr (element-wise) * grad, for the
    parameters that have a learned rate (others, such as a support statistic, stay as they are).
    Segmentation heads use `seg_loss`; classification heads pass `F.cross_entropy` (Meta-SGD: Li et
    al., 2017, arXiv:1707.09835).

    Args:
        head: whose `logits(feats, params)` is differentiated.
        params: the head's initial parameters.
        lrs: a learned learning rate per parameter (same shape); parameters without one are not stepped.
        feats: the support's features.
        target: the support's labels, as `loss_fn` takes them.
        steps: how many gradient steps.
        create_graph: keep the graph of the steps (meta-training differentiates through them).
        loss_fn: (logits, target) -> scalar loss.

    Returns:
        The adapted parameters (a new dict; the inputs are not changed).
    """
    names = [n for n in params if n in lrs]
    for _ in range(steps):
        loss = loss_fn(head.logits(feats, params), target)
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        params = {**params, **{n: params[n] - lrs[n] * g for n, g in zip(names, grads)}}
    return params
