"""Episodes drawn where the model runs: every slice of every study lives as one tensor on the training
device, pseudo-labels are computed once when the bank is built, and each outer step's tasks are cut
and augmented as batched tensor operations (one gather, one `grid_sample`, element-wise intensity
changes), with no per-episode loop over pixels.

Kinds of task, each with a share (`TaskShares`):
* `labelled`: one labelled structure; support slice from one study, queries at the matching relative
  position in another (sometimes a slice outside the structure, so the model learns to predict nothing);
* `merge`: the union of two labelled structures that touch in a study (e.g. a ventricle's blood pool and
  its wall), a new "structure" no source names;
* `superpixel`: a Felzenszwalb superpixel as the pseudo-structure (SSL-ALPNet), at one of several
  scales, so that pseudo-structures range from a vessel's size to an organ's; support and query are two
  augmentations of one slice.

Every task also passes through modality shifts with probability `intensity_prob`: gamma, contrast
inversion, a smooth multiplicative bias field, noise; the encoder then sees contrasts a CT- and
MRI-trained model meets at a new site. Spatial augmentation is an affine map plus a smooth elastic
displacement.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from monailabel_metaapp.core.episodes import BODY, PSEUDO_SIZE, Episode, Study, superpixel_map
from monailabel_metaapp.core.errors import VolumeError

KINDS = ("labelled", "merge", "superpixel")


@dataclass
class TaskShares:
    """Share of each kind of task in an outer step, and the augmentation settings.

    Args:
        labelled: share of labelled-structure tasks.
        merge: share of tasks on two touching structures merged into one.
        superpixel: share of superpixel tasks.
        superpixel_scales: Felzenszwalb `scale` values, one pseudo-label map per value.
        superpixel_slices: at most this many evenly spaced slices per study get superpixels (0: all);
            bounds the one-off cost per study where banks are rebuilt as a datastore grows.
        intensity_prob: probability that a task's slices get a modality shift.
        elastic: amplitude of the elastic displacement, as a share of the image side.
    """

    labelled: float = 0.35
    merge: float = 0.15
    superpixel: float = 0.5
    superpixel_scales: tuple[int, ...] = (60, 100, 200)
    superpixel_slices: int = 0
    intensity_prob: float = 0.5
    elastic: float = 0.02

    def __post_init__(self):
        if self.superpixel_slices < 0:
            raise ValueError(f"superpixel_slices must be >= 0 (0: every slice), got {self.superpixel_slices}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["superpixel_scales"] = list(self.superpixel_scales)
        return d

    def weights(self, has_labels: bool, has_merges: bool) -> dict[str, float]:
        """Shares renormalised over the kinds this bank can draw."""
        w = {"labelled": self.labelled if has_labels else 0.0, "merge": self.merge if has_merges else 0.0,
             "superpixel": self.superpixel}  # fmt: skip
        total = sum(w.values())
        if total <= 0:
            raise ValueError("no kind of task can be drawn: set a share above 0 for a kind the data holds")
        return {k: v / total for k, v in w.items()}


def _touch(label: np.ndarray, a: int, b: int) -> bool:
    """Whether structures a and b share an in-plane border somewhere in a (S, H, W) label stack."""
    ma, mb = label == a, label == b
    return bool((ma[:, 1:] & mb[:, :-1]).any() or (ma[:, :-1] & mb[:, 1:]).any()
                or (ma[:, :, 1:] & mb[:, :, :-1]).any() or (ma[:, :, :-1] & mb[:, :, 1:]).any())  # fmt: skip


def chosen_slices(n: int, cut: int) -> np.ndarray:
    """The slices of an n-slice study that get superpixels: `cut` evenly spaced ones away from the ends
    (every slice when cut is 0 or >= n)."""
    if 0 < cut < n:
        return ((np.arange(cut) + 0.5) * n / cut).astype(int)
    return np.arange(n)


def study_superpixels(s: Study, scale: int, cut: int, keep: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(slice indices, their (len, H, W) int16 superpixel maps) of one study at one Felzenszwalb scale, on
    `chosen_slices(n, cut)`; with `keep` they stay on the study (`Study.superpixels_at`) for the next call.

    Args:
        s: the study.
        scale: Felzenszwalb's scale.
        cut: at most this many slices (0: all).
        keep: keep the result on the study.
    """
    if (scale, cut) in s.superpixels_at:
        return s.superpixels_at[(scale, cut)]
    idx = chosen_slices(s.image.shape[0], cut)
    out = idx, np.stack([superpixel_map(s.image[j].numpy(), scale) for j in idx.tolist()])
    if keep:
        s.superpixels_at[(scale, cut)] = out
    return out


class SliceBank:
    """All studies' slices as device tensors, with the index tables episodes are drawn from.

    Args:
        studies: the studies (labelled, unlabelled or both).
        context: neighbouring slices each side fed as channels.
        shares: the kinds of task and their pseudo-label scales.
        exclude: label values never drawn (held-out structures).
        device: where the tensors live.
        progress: show a progress bar while pseudo-labels are computed.
        keep_superpixels: keep each study's superpixels on it (`study_superpixels`), for a bank that is
            rebuilt as a datastore grows.
    """

    def __init__(
        self,
        studies: list[Study],
        context: int,
        shares: TaskShares,
        exclude: set[int] | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        keep_superpixels: bool = False,
    ):
        if not studies:
            raise VolumeError("no studies to draw episodes from")
        self.device, self.context = torch.device(device), context
        exclude = exclude or set()
        starts = np.cumsum([0] + [s.image.shape[0] for s in studies])
        self.images = torch.cat([s.image for s in studies]).to(self.device)  # (N, H, W) uint8
        self.labels = torch.cat(
            [s.label if s.label is not None else torch.zeros_like(s.image, dtype=torch.int16) for s in studies]
        ).to(self.device)
        # neighbours of every slice inside its own study (edge-clamped): the context channels by one gather
        offs = torch.arange(-context, context + 1)
        rows = []
        for i, s in enumerate(studies):
            idx = torch.arange(s.image.shape[0])[:, None] + offs[None]
            rows.append(idx.clamp(0, s.image.shape[0] - 1) + int(starts[i]))
        self.neighbours = torch.cat(rows).to(self.device)  # (N, 1 + 2 context)
        self.study_range = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]  # [start, end) per study
        self.study_of = np.repeat(np.arange(len(studies)), np.diff(starts))

        # labelled structures: (source, value) -> per study, its slices holding the structure
        self.structures: dict[tuple[str, tuple[int, ...]], list[list[int]]] = {}
        merges: set[tuple[str, tuple[int, ...]]] = set()
        for i, s in enumerate(studies):
            if s.label is None:
                continue
            source, lab = s.name.split("/")[0], s.label.numpy()
            values = [v for v in s.values() if v not in exclude]
            for v in values:
                self.structures.setdefault((source, (v,)), []).append(
                    [int(starts[i]) + int(j) for j in np.nonzero((lab == v).any((1, 2)))[0]]
                )
            merges |= {(source, (a, b)) for a in values for b in values if a < b and _touch(lab, a, b)}
        self.merges: dict[tuple[str, tuple[int, ...]], list[list[int]]] = {}
        for i, s in enumerate(studies):
            if s.label is None:
                continue
            source, lab = s.name.split("/")[0], s.label.numpy()
            for key in (k for k in merges if k[0] == source):
                on = np.isin(lab, key[1]).any((1, 2))
                if on.any():
                    self.merges.setdefault(key, []).append([int(starts[i]) + int(j) for j in np.nonzero(on)[0]])

        # superpixels at each scale, and the (slice, id) pairs of usable size inside the body
        self.superpixels: list[torch.Tensor] = []
        self.sp_pairs: list[torch.Tensor] = []
        if shares.superpixel > 0:
            n_pix = studies[0].image[0].numel()
            for scale in shares.superpixel_scales:
                maps, pairs = [], []
                bar = tqdm(studies, desc=f"superpixels (scale {scale})", disable=not progress, unit="study")
                for s, start in zip(bar, starts):
                    idx, sp_maps = study_superpixels(s, scale, shares.superpixel_slices, keep_superpixels)
                    full = np.zeros(tuple(s.image.shape), np.int16)
                    full[idx] = sp_maps
                    maps.append(full)
                    for j, sp in zip(idx.tolist(), sp_maps):
                        body = s.image[j].numpy() > BODY
                        if body.mean() < 0.05:
                            continue
                        counts = np.bincount(sp[body].ravel(), minlength=int(sp.max()) + 1)
                        ok = np.nonzero((counts > PSEUDO_SIZE[0] * n_pix) & (counts < PSEUDO_SIZE[1] * n_pix))[0]
                        pairs += [(int(start) + j, int(k)) for k in ok]
                self.superpixels.append(torch.from_numpy(np.concatenate(maps)).to(self.device))
                self.sp_pairs.append(torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))
            if not any(len(p) for p in self.sp_pairs):
                raise VolumeError("no usable superpixel found: are the images empty?")
        self.sp_scales = [i for i, p in enumerate(self.sp_pairs) if len(p)]  # scales with a usable superpixel
        self.weights = shares.weights(bool(self.structures), bool(self.merges))

    def slices(self, idx: torch.Tensor) -> torch.Tensor:
        """(T,) slice indices -> (T, 1 + 2 context, H, W) float images in [0, 1], on the device."""
        return self.images[self.neighbours[idx.to(self.device)]].float() / 255.0


class BankSampler:
    """Draws a whole outer step of episodes at once from a `SliceBank`.

    Args:
        bank: the slices and index tables.
        shares: the kinds of task, their shares and the augmentation settings.
        n_support: support slices per episode.
        n_query: query slices per episode.
        negative_prob: probability that a labelled task's last query lies outside the structure.
        seed: the random draws (Python for the picks, torch for the augmentation).
        augment: warp and shift the slices (off: the bank's slices as they are, e.g. to inspect tasks).
    """

    def __init__(
        self,
        bank: SliceBank,
        shares: TaskShares,
        n_support: int = 1,
        n_query: int = 2,
        negative_prob: float = 0.3,
        seed: int = 0,
        augment: bool = True,
    ):
        self.bank, self.shares, self.augment = bank, shares, augment
        self.n_support, self.n_query, self.negative_prob = n_support, n_query, negative_prob
        self.rng = random.Random(seed)
        self.gen = torch.Generator(device=bank.device).manual_seed(seed)
        self.kinds_drawn: dict[str, int] = {k: 0 for k in KINDS}

    def sample_batch(self, n: int, kind: str | None = None) -> list[Episode]:
        """n episodes cut and augmented together; `kind` forces one kind of task (validation by kind)."""
        kinds = [kind] * n if kind else self.rng.choices(list(self.bank.weights), list(self.bank.weights.values()), k=n)
        ns, nq = self.n_support, self.n_query
        rows, ids, src = [], [], []  # per slice row: bank index, target id(s), source map
        for k in kinds:
            self.kinds_drawn[k] += 1
            if k == "superpixel":
                scale = self.rng.choice(self.bank.sp_scales)
                pairs = self.bank.sp_pairs[scale]
                i, sp = pairs[self.rng.randrange(len(pairs))].tolist()
                rows += [i] * (ns + nq)
                ids += [(sp, sp)] * (ns + nq)
                src += [scale + 1] * (ns + nq)  # 0: labels, 1..: superpixel scales
            else:
                table = self.bank.structures if k == "labelled" else self.bank.merges
                key = self.rng.choice(sorted(table))
                pool = table[key]
                a, b = self.rng.sample(pool, 2) if len(pool) >= 2 else (pool[0], pool[0])
                r = self.rng.random()
                i_s = [a[min(len(a) - 1, int(r * len(a)))]] + [self.rng.choice(a) for _ in range(ns - 1)]
                j = int(r * len(b))
                i_q = [b[min(len(b) - 1, max(0, j + o))] for o in range(nq)]
                if self.rng.random() < self.negative_prob:
                    i_q[-1] = self._outside(b)
                rows += i_s + i_q
                values = key[1] if len(key[1]) == 2 else key[1] * 2
                ids += [values] * (ns + nq)
                src += [0] * (ns + nq)
        idx = torch.tensor(rows, device=self.bank.device)
        x = self.bank.slices(idx)
        dev = self.bank.device
        y = self._masks(idx, torch.tensor(ids, device=dev), torch.tensor(src, device=dev))
        if self.augment:
            x, y = self._augment(x, y, kinds)
        per = ns + nq
        return [
            Episode(
                x[t * per : t * per + ns],
                y[t * per : t * per + ns],
                x[t * per + ns : (t + 1) * per],
                y[t * per + ns : (t + 1) * per],
                structure=k,
            )  # fmt: skip
            for t, k in enumerate(kinds)
        ]

    def _outside(self, on: list[int]) -> int:
        """A slice of the same study outside the structure (the structure's own slice when there is none)."""
        lo, hi = self.bank.study_range[int(self.bank.study_of[on[0]])]
        outside = sorted(set(range(lo, hi)) - set(on))
        return self.rng.choice(outside) if outside else on[0]

    def _masks(self, idx: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """(T, H, W) float masks: label value(s) or superpixel id of each row, from its source map
        (`src` 0: the labels, s > 0: superpixel scale s - 1). All on the bank's device."""
        y = torch.zeros((len(idx),) + tuple(self.bank.images.shape[1:]), device=self.bank.device)
        lab = src == 0
        if lab.any():
            maps, v = self.bank.labels[idx[lab]], ids[lab]
            y[lab] = ((maps == v[:, :1, None]) | (maps == v[:, 1:, None])).float()
        for s, sp in enumerate(self.bank.superpixels, start=1):
            on = src == s
            if on.any():
                y[on] = (sp[idx[on]] == ids[on, :1, None]).float()
        return y

    def _augment(self, x: torch.Tensor, y: torch.Tensor, kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Affine + elastic warp, then modality shifts, for every row at once. A support warped so that
        its structure leaves the view keeps its unwarped slice. Labelled tasks are augmented at half
        strength (their support and query already differ), superpixel tasks at full strength."""
        t, _, h, w = x.shape
        dev, g = x.device, self.gen
        per = self.n_support + self.n_query
        strength = torch.tensor([0.5 if k != "superpixel" else 1.0 for k in kinds], device=dev).repeat_interleave(per)

        def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1)
            return torch.rand(*shape, device=dev, generator=g) * 2 - 1

        ang = torch.deg2rad(u(t) * 15 * strength)
        sc = 1 + u(t) * 0.12 * strength
        shift = u(t, 2) * 0.08 * strength[:, None]
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [t, 1, h, w], align_corners=False)
        if self.shares.elastic > 0:
            coarse = u(t, 2, 5, 5) * self.shares.elastic * 2 * strength[:, None, None, None]
            grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        xw = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        yw = F.grid_sample(y[:, None], grid, mode="nearest", align_corners=False)[:, 0]
        support = torch.zeros(t, dtype=torch.bool, device=dev).view(-1, per)
        support[:, : self.n_support] = True
        support = support.flatten()
        lost = support & (yw.flatten(1).sum(1) == 0) & (y.flatten(1).sum(1) > 0)
        xw, yw = torch.where(lost[:, None, None, None], x, xw), torch.where(lost[:, None, None], y, yw)

        # modality shifts: per task (its support and queries alike), with probability intensity_prob
        n_tasks = t // per
        shift_on = (torch.rand(n_tasks, device=dev, generator=g) < self.shares.intensity_prob).repeat_interleave(per)
        invert = shift_on & (torch.rand(n_tasks, device=dev, generator=g) < 0.3).repeat_interleave(per)
        gamma = torch.exp(u(t) * 0.3 * strength + shift_on * u(n_tasks).repeat_interleave(per) * 0.4)
        xw = xw.clamp(0, 1) ** gamma[:, None, None, None]
        xw = torch.where(invert[:, None, None, None], (1 - xw) * (xw > 0.02), xw)  # background stays dark
        bias = F.interpolate(u(t, 1, 4, 4) * 0.3, size=(h, w), mode="bicubic", align_corners=False)
        xw = xw * torch.where(shift_on[:, None, None, None], torch.exp(bias), torch.ones_like(bias))
        noise = 0.02 * strength + shift_on * 0.03 * torch.rand(t, device=dev, generator=g)
        xw = xw + torch.randn(xw.shape, device=dev, generator=g) * noise[:, None, None, None]
        return xw, yw
