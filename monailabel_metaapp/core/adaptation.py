"""Test-time use of a meta-trained model: embed volumes, adapt one head per structure from k
labelled studies, predict a volume. Used by the app (adapt on save) and by the evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from monailabel_metaapp.core.episodes import with_context
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.inner_loop import inner_adapt
from monailabel_metaapp.core.networks import FewShotSegModel

DEFAULT_ADAPT_STEPS = 10  # inner-loop steps at test time (meta-training uses 3 on one slice)
COMPONENT_KEY = "component_share"  # stored with a head's parameters; the inner loop leaves it as it is
ONE_PIECE = 0.9  # support labels with at least this share of voxels in their largest component are one piece


@dataclass
class Head:
    """A structure's adapted task-specific head. A quick head (`stage` "head") runs on the shared
    encoder's embeddings; a refined one ("refined") on its own fine-tuned encoder, whose weights live
    in `encoder_file` and are loaded on demand."""

    params: dict[str, torch.Tensor]
    n_labels: int
    seconds: float
    stage: str = "head"
    encoder_file: str | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.params.items()}

    @property
    def one_piece(self) -> bool:
        """Whether predictions keep only their largest component: yes when the support labels were one
        piece (an organ, a cavity), no when they were scattered (CSF); heads from before: yes."""
        share = self.params.get(COMPONENT_KEY)
        return share is None or float(share) >= ONE_PIECE


class SegAdapter:
    """Wraps a model for embedding, head adaptation and prediction (no gradients into the encoder).

    Args:
        model: a meta-trained `FewShotSegModel` (put in eval mode on `device`).
        device: where embedding, adaptation and prediction run.
        steps: inner-loop steps of an adaptation (Meta-SGD, the learned rates).
        chunk: slices embedded at once.
        max_slices: support slices an adaptation reads, whatever k is (bounded cost).
    """

    def __init__(
        self,
        model: FewShotSegModel,
        device: str | torch.device = "cpu",
        steps: int = DEFAULT_ADAPT_STEPS,
        chunk: int = 16,
        max_slices: int = 24,
    ):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.steps = steps
        self.chunk = chunk
        self.max_slices = max_slices

    @property
    def size(self) -> int:
        return self.model.cfg.size

    @torch.no_grad()
    def embed(self, stack: torch.Tensor, idx: list[int] | None = None) -> torch.Tensor:
        """(S, size, size) intensities in [0,1] -> (len(idx), C, size, size) embeddings, posterior mean.

        Args:
            stack: a study's slices on the model grid.
            idx: the slices to embed (default: all), each with its neighbours as context.
        """
        idx = list(range(stack.shape[0])) if idx is None else idx
        out = []
        for i in range(0, len(idx), self.chunk):
            x = with_context(stack, idx[i : i + self.chunk], self.model.cfg.context).to(self.device)
            out.append(self.model.embed(x))
        return torch.cat(out)

    def support_slices(self, mask: torch.Tensor, n_background: int = 4) -> list[int]:
        """Every slice holding the structure plus a few without it, so the head learns where it is absent.

        Args:
            mask: (S, size, size) binary mask of the structure.
            n_background: slices without the structure to add, the nearest first.
        """
        has = mask.flatten(1).any(1)
        fg = [int(i) for i in torch.nonzero(has).flatten()]
        if not fg:
            raise VolumeError("the label holds no voxel of this structure")
        bg = [int(i) for i in torch.nonzero(~has).flatten()]
        if bg:
            near = sorted(bg, key=lambda i: min(abs(i - j) for j in fg))
            pick = near[: n_background // 2] + near[n_background // 2 :][:: max(1, len(near) // max(1, n_background))]
            fg += sorted(set(pick))[:n_background]
        return sorted(fg)

    def adapt(
        self, stacks: list[torch.Tensor], masks: list[torch.Tensor], steps: int | None = None, feats: list | None = None
    ) -> Head:
        """Adapt a head from k labelled studies.

        Args:
            stacks: (S, size, size) image stacks.
            masks: (S, size, size) binary masks of the structure, one per stack.
            steps: inner-loop steps (default: the adapter's).
            feats: cached embeddings of each whole stack, in any float precision (None: embed the support
                slices now).
        """
        t0 = time.perf_counter()
        fs, ms = [], []
        per_study = max(4, self.max_slices // max(1, len(stacks)))  # bounded cost whatever k is
        for i, (stack, mask) in enumerate(zip(stacks, masks)):
            idx = self.support_slices(mask)
            if len(idx) > per_study:
                idx = [idx[j] for j in np.linspace(0, len(idx) - 1, per_study).round().astype(int)]
            cached = feats is not None and feats[i] is not None
            f = feats[i][idx].to(self.device, torch.float32) if cached else self.embed(stack, idx)
            fs.append(f)
            ms.append(mask[idx].float().to(self.device))
        head = self.adapt_features(torch.cat(fs), torch.cat(ms), steps)
        head.params[COMPONENT_KEY] = torch.tensor(largest_component_share(masks))
        head.n_labels, head.seconds = len(stacks), time.perf_counter() - t0
        return head

    def adapt_features(self, feats: torch.Tensor, masks: torch.Tensor, steps: int | None = None) -> Head:
        """Prototype init + Meta-SGD steps on support embeddings (the encoder is not touched).

        Args:
            feats: (N, C, size, size) support embeddings.
            masks: (N, size, size) binary masks.
            steps: inner-loop steps (default: the adapter's).
        """
        t0 = time.perf_counter()
        head = self.model.head
        feats = feats.contiguous(memory_format=torch.channels_last)  # see PrototypeHead.logits
        with torch.enable_grad():
            params = {k: v.detach().clone().requires_grad_(True) for k, v in head.init_params(feats, masks).items()}
            lrs = {k: v.detach() for k, v in self.model.lrs().items()}
            params = inner_adapt(head, params, lrs, feats, masks, self.steps if steps is None else steps)
        params = {k: v.detach() for k, v in params.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return Head(params=params, n_labels=1, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def predict(self, stack: torch.Tensor, heads: list[Head], feats: torch.Tensor | None = None) -> torch.Tensor:
        """(S, size, size) -> (len(heads), S, size, size) foreground probabilities.

        Args:
            stack: a study's slices on the model grid.
            heads: adapted heads (all on this adapter's encoder).
            feats: the stack's embeddings, when cached (in any float precision).
        """
        feats = self.embed(stack) if feats is None else feats.to(self.device, torch.float32)
        feats = feats.contiguous(memory_format=torch.channels_last)
        out = []
        for h in heads:
            params = {k: v.to(self.device) for k, v in h.params.items()}
            chunks = [self.model.head.logits(feats[i : i + 32], params) for i in range(0, feats.shape[0], 32)]
            logits = torch.cat(chunks)
            out.append(torch.sigmoid(logits).cpu())
        return torch.stack(out)


def largest_component_share(masks: list[torch.Tensor]) -> float:
    """Share of the labelled voxels that lie in their study's largest 3D component (1.0 when every
    study's label is one piece, as organs and cavities are; CSF on the sample studies: about 0.3).

    Args:
        masks: binary masks of the structure, one per labelled study.
    """
    inside = total = 0.0
    for m in masks:
        a = m.cpu().numpy().astype(bool)
        cc, n = ndimage.label(a)
        if n:
            sizes = ndimage.sum_labels(a, cc, index=np.arange(1, n + 1))
            inside, total = inside + float(sizes.max()), total + float(sizes.sum())
    return inside / total if total else 1.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 3D connected component of a binary mask (the mask itself when it has at most one).

    Args:
        mask: a binary volume.
    """
    cc, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, cc, index=np.arange(1, n + 1))
    return cc == 1 + int(np.argmax(sizes))


def probabilities_to_labels(
    probs: np.ndarray, values: list[int], threshold: float = 0.5, one_piece: bool | list[bool] = True
) -> np.ndarray:
    """(K, z, y, x) per-structure probabilities -> label map: threshold, keep the largest 3D component
    of each structure that is one piece (`one_piece`, per structure or for all), and give overlapping
    voxels to the most probable structure.

    Args:
        probs: (K, z, y, x) probabilities on the original grid.
        values: the output label value of each structure.
        threshold: the probability that makes a voxel foreground.
        one_piece: whether to keep only the largest component, per structure or for all.
    """
    if any(not 0 < v < 256 for v in values):
        raise ValueError(f"label values must be 1-255 (the label map is 8-bit): {values}")
    keep = probs >= threshold
    one_piece = [one_piece] * keep.shape[0] if isinstance(one_piece, bool) else one_piece
    for k in range(keep.shape[0]):
        if one_piece[k]:
            keep[k] = largest_component(keep[k])
    scored = np.where(keep, probs, -1.0)
    best = scored.argmax(0)
    out = np.zeros(probs.shape[1:], dtype=np.uint8)
    any_fg = keep.any(0)
    lut = np.asarray(values, dtype=np.uint8)
    out[any_fg] = lut[best[any_fg]]
    return out


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """3D Dice of two binary volumes (1.0 when both are empty).

    Args:
        pred: the prediction.
        ref: the reference.
    """
    pred, ref = pred.astype(bool), ref.astype(bool)
    denom = pred.sum() + ref.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, ref).sum() / denom)
