"""Active-learning scores from the meta-learned model (plain PyTorch, no MONAI Label).

* uncertainty: how unsure an adapted head is about a study, as 1 - the soft Dice between its
  probabilities and their own thresholded mask. Fuzzy boundaries relative to the structure's size
  score high; a study where the head finds nothing at all scores 1 (the most informative case:
  the structure is there but the head cannot see it).
* descriptor: a study's place in the shared encoder's feature space (pooled embeddings), for
  diversity (k-center greedy: the study farthest from everything already labelled or served).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_uncertainty(probs: torch.Tensor, threshold: float = 0.5, eps: float = 1.0) -> float:
    """How unsure a head is about a study: 1 - soft Dice of its probabilities with their own mask.

    Args:
        probs: foreground probabilities of one structure over a study, any shape.
        threshold: the probability that makes the mask.
        eps: below this much foreground (probabilities + mask) nothing is predicted: the score is 1.

    Returns:
        A score in [0, 1], higher for a less certain head.
    """
    p = probs.float().flatten()
    hard = (p >= threshold).float()
    denom = p.sum() + hard.sum()
    if float(denom) < eps:  # nothing predicted anywhere: the head does not see the structure
        return 1.0
    return float(1.0 - 2.0 * (p * hard).sum() / denom)


def study_descriptor(feats: torch.Tensor) -> torch.Tensor:
    """(S, C, H, W) embeddings of a study -> (2C,) unit vector: mean and std of every channel.

    Args:
        feats: the study's slice embeddings.
    """
    f = feats.float().flatten(2)
    d = torch.cat([f.mean((0, 2)), f.std(2).mean(0)])
    return F.normalize(d, dim=0)


def farthest_first(candidates: torch.Tensor, anchors: torch.Tensor) -> list[int]:
    """Greedy k-center order of `candidates` (N, D) given already covered `anchors` (M, D).

    The first index is the candidate farthest from every anchor; each next one is farthest from the
    anchors and the candidates already taken. With no anchors the first is the medoid-like point
    closest to the mean (the most representative study), then farthest-first.

    Args:
        candidates: (N, D) descriptors of the studies to order.
        anchors: (M, D) descriptors of the studies already covered (M may be 0).
    """
    n = candidates.shape[0]
    if n == 0:
        return []
    if anchors.numel() == 0:
        first = int(torch.cdist(candidates, candidates.mean(0, keepdim=True))[:, 0].argmin())
        order, dist = [first], torch.cdist(candidates, candidates[first : first + 1])[:, 0]
    else:
        dist = torch.cdist(candidates, anchors).min(1).values
        order = []
    while len(order) < n:
        d = dist.clone()
        d[order] = -1.0
        nxt = int(d.argmax())
        order.append(nxt)
        dist = torch.minimum(dist, torch.cdist(candidates, candidates[nxt : nxt + 1])[:, 0])
    return order
