"""Classification data and episodes (plain PyTorch).

Sources of N-way K-shot tasks:
* labelled arrays in the MedMNIST layout (`{split}_images`, `{split}_labels`);
* regions cut from segmentation studies: "which structure is this region" (one class per
  (dataset, label value)), so any segmentation datastore also teaches the classifier;
* self-supervised tasks from unlabelled images (UMTRA): each sampled image is its own class, its
  support and query examples are different random augmentations of it;
* synthetic "normal vs abnormal" tasks from unlabelled images: one class is augmented images, the
  other different images with a smooth, textured opacity added (a style drawn per task).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monailabel_metaapp.core.episodes import Study, augment


@dataclass
class ClsSet:
    """Examples as views on the model grid.

    Args:
        images: (N, V, size, size) views in [0, 1].
        labels: (N,) class indices.
        name: where they come from (for logs and episode sources).
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def classes(self) -> list[int]:
        """The class indices present, sorted."""
        return sorted(int(c) for c in torch.unique(self.labels))


@dataclass
class ClsEpisode:
    """One N-way K-shot classification task.

    Args:
        x_support: (n_way * k, V, size, size) support views.
        y_support: (n_way * k,) classes in 0..n_way-1.
        x_query: query views.
        y_query: query classes.
        n_way: the number of classes.
        source: the set it was drawn from ("ssl", "abnormal" or a set's name).
    """

    x_support: torch.Tensor  # (n_way * k, V, size, size)
    y_support: torch.Tensor  # (n_way * k,) in 0..n_way-1
    x_query: torch.Tensor
    y_query: torch.Tensor
    n_way: int
    source: str

    def to(self, device: torch.device | str) -> ClsEpisode:
        """The same episode with its tensors on `device`.

        Args:
            device: where to move them.
        """
        return ClsEpisode(
            self.x_support.to(device),
            self.y_support.to(device),
            self.x_query.to(device),
            self.y_query.to(device),
            self.n_way,
            self.source,
        )


def _normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 -> /255; anything else -> per-example min-max to [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if x.dtype == np.uint8:
        return t / 255.0
    flat = t.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (t.dim() - 1)
    return (t - lo.view(shape)) / (hi - lo).clamp_min(1e-6).view(shape)


# Whole images are seen through their central 80% (a centre crop, as classification pipelines do:
# ImageNet's 224 of 256). Chosen on PneumoniaMNIST's val split with the four strict meta-trained
# classifiers: mean 5-shot AUC 0.970 against 0.942 uncropped; 0.7 tied, 0.6 and 0.875 lower
# (benchmarks/results/fewshot_cls_val_choices.json). Regions are crops around their mask already.
IMAGE_CROP = 0.8


def centre_crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central `fraction` of the last two dimensions (rounded to whole pixels, at least one).

    Args:
        x: images (..., H, W).
        fraction: the share of each side kept.
    """
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return x[..., y0 : y0 + ch, x0 : x0 + cw]


def to_views(images: np.ndarray, size: int, crop: float = IMAGE_CROP) -> torch.Tensor:
    """MedMNIST-style images -> (N, V, size, size) views, each the central `crop` of its slice.

    2D: N x H x W, or N x H x W x C with C in (1, 3) (colour is averaged to grey): one view.
    3D: N x D x H x W: the central axial, coronal and sagittal slices: three views.

    Args:
        images: the images (uint8 are divided by 255, others min-max scaled per image).
        size: the side of each view.
        crop: the central share of each slice kept.
    """
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.mean(-1).astype(images.dtype) if images.shape[-1] == 3 else images[..., 0]
    if images.ndim == 3:
        slices = [_normalise(images)]
    elif images.ndim == 4:
        v = _normalise(images)
        d, h, w = v.shape[1:]
        slices = [v[:, d // 2], v[:, :, h // 2], v[:, :, :, w // 2]]
    else:
        raise ValueError(f"images must be N x H x W[ x C] or N x D x H x W, got shape {images.shape}")
    views = [centre_crop(s, crop)[:, None] for s in slices]
    views = [
        s if s.shape[-2:] == (size, size) else F.interpolate(s, size=(size, size), mode="bilinear", antialias=True)
        for s in views
    ]
    return torch.cat(views, 1).clamp(0, 1)


def image_file_views(path: str | Path, size: int, crop: float = IMAGE_CROP) -> torch.Tensor:
    """A whole image file -> (V, size, size) views: a 2D image one (uint8 as /255, as MedMNIST), a 3D
    volume its three central orthogonal slices (reoriented, intensities percentile-scaled).

    Args:
        path: any SimpleITK-readable file (NIfTI, NRRD, PNG, a DICOM folder, ...).
        size: the side of each view.
        crop: the central share of each slice kept.
    """
    import SimpleITK as sitk

    from monailabel_metaapp.core.volume import CANONICAL, normalise_intensity, read_image

    img = read_image(path)
    if img.GetSize()[2] > 1:
        img = sitk.DICOMOrient(img, CANONICAL)
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype != np.uint8:
        arr = normalise_intensity(arr)
    return to_views(arr[:1] if arr.shape[0] == 1 else arr[None], size, crop)[0]


def load_medmnist(path: str | Path, split: str, size: int, crop: float = IMAGE_CROP) -> ClsSet:
    """One split of a MedMNIST-layout .npz, with clear errors for anything else.

    Args:
        path: the .npz file.
        split: "train", "val" or "test".
        size: the side of each view.
        crop: the central share of each slice kept.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    z = np.load(path)
    keys = (f"{split}_images", f"{split}_labels")
    missing = [k for k in keys if k not in z]
    if missing:
        raise ValueError(f"{path} has no {missing}; a MedMNIST-layout file has {sorted(z.files)} keys like these")
    labels = z[keys[1]]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{keys[1]} must be N or N x 1 (one class per image), got shape {labels.shape}")
    images = z[keys[0]]
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{keys[0]} has {images.shape[0]} images but {keys[1]} has {labels.shape[0]} labels")
    return ClsSet(to_views(images, size, crop), torch.from_numpy(labels.astype(np.int64)), f"{path.stem}:{split}")


def load_unlabelled_images(
    path: str | Path, size: int, *, crop: float = IMAGE_CROP, split: str = "train"
) -> torch.Tensor:
    """Only the `{split}_images` array of a MedMNIST-layout .npz, as views: the labels are never
    read (an .npz member is loaded only when indexed), so a site's unlabelled images can feed
    self-supervised tasks.

    Args:
        path: the .npz file.
        size: the side of each view.
        crop: the central share of each slice kept.
        split: whose images to read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with np.load(path) as z:
        key = f"{split}_images"
        if key not in z.files:
            raise ValueError(f"{path} has no {key}; its keys are {sorted(z.files)}")
        return to_views(z[key], size, crop)


def region_crop(image: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """A square crop of one slice (H, W) in [0, 1] around a region's mask (H, W), with a margin
    (so the context differs from class to class), resized to (size, size).

    Args:
        image: one slice (H, W) in [0, 1].
        mask: the region on it (H, W), not empty.
        size: the side of the crop.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cy, cx = int(ys.float().mean()), int(xs.float().mean())
    half = max(int(ys.max() - ys.min()), int(xs.max() - xs.min()), 16) // 2 + 8
    y0, x0 = max(cy - half, 0), max(cx - half, 0)
    crop = image[y0 : cy + half, x0 : cx + half].float()[None, None]
    return F.interpolate(crop, size=(size, size), mode="bilinear")[0, 0]


def region_views(
    stack: torch.Tensor, mask: torch.Tensor, size: int, n_views: int = 3, min_pixels: int = 40
) -> torch.Tensor:
    """A 3D region as the classifier sees it: `region_crop`s of up to `n_views` slices of a stack
    (S, H, W) in [0, 1], spread over the slices where it covers `min_pixels` (as `region_set`) -> (V, size, size).
    The crops are those `region_set` meta-trains on (one slice, one example), so a region's feature
    is the mean over a few in-distribution views. Raises ValueError for an empty region.

    Args:
        stack: (S, H, W) slices in [0, 1].
        mask: (S, H, W) the region.
        size: the side of each crop.
        n_views: at most this many slices.
        min_pixels: slices where the region is smaller are passed over (unless it is smaller everywhere).
    """
    if stack.shape != mask.shape:
        raise ValueError(f"image stack {tuple(stack.shape)} and mask {tuple(mask.shape)} differ")
    area = mask.flatten(1).sum(1)
    if int(area.max()) == 0:
        raise ValueError("the region is empty (no voxel of it on any slice)")
    zs = torch.nonzero(area >= min(min_pixels, int(area.max()))).flatten().tolist()  # a small region: its largest
    picks = sorted({zs[round(q * (len(zs) - 1))] for q in (0.5, 0.25, 0.75)[:n_views]})
    return torch.stack([region_crop(stack[z], mask[z], size) for z in picks]).clamp(0, 1)


def region_set(studies: list[Study], size: int, per_class: int = 60, min_pixels: int = 40, seed: int = 0) -> ClsSet:
    """'Which structure is this region': a square crop around one structure on one slice (with a
    margin, so the context differs from class to class), one class per (study set, label value).

    Args:
        studies: labelled segmentation studies.
        size: the side of each crop.
        per_class: at most this many crops per class.
        min_pixels: a structure smaller than this on a slice is passed over there.
        seed: for the choice of crops.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[torch.Tensor]] = {}
    for s in studies:
        if s.label is None:
            continue
        for v in s.values():
            for z in range(s.image.shape[0]):
                m = s.label[z] == v
                if int(m.sum()) < min_pixels:
                    continue
                by_class.setdefault(v, []).append(region_crop(s.image[z].float() / 255.0, m, size)[None])
    images, labels = [], []
    for c, (_value, crops) in enumerate(sorted(by_class.items())):
        for crop in rng.sample(crops, min(per_class, len(crops))):
            images.append(crop)
            labels.append(c)
    if not images:
        raise ValueError("no labelled region large enough in these studies")
    return ClsSet(torch.stack(images), torch.tensor(labels), "regions")


def ssl_views(image: torch.Tensor, n: int, rng: random.Random) -> torch.Tensor:
    """n random augmentations (crop-scale, rotation, gamma, noise) of one (V, size, size) example.

    Args:
        image: the example's views.
        n: how many augmented copies.
        rng: the random source.
    """
    x = image[None].expand(n, *image.shape).contiguous()
    y = torch.zeros(n, *image.shape[1:])
    out, _ = augment(x, y, rng, strength=2.0)
    return out.clamp(0, 1)


def abnormal_style(rng: random.Random) -> dict:
    """One task's kind of synthetic abnormality: focal or diffuse, brighter or darker, how strong.

    Args:
        rng: the random source.
    """
    diffuse = rng.random() < 0.5
    return {
        "blobs": rng.randint(1, 3),
        "sigma": (0.12, 0.3) if diffuse else (0.04, 0.1),
        "amp": rng.uniform(0.15, 0.5),
        "brighten": rng.random() < 0.7,
    }


def synthetic_abnormal(x: torch.Tensor, style: dict, rng: random.Random) -> torch.Tensor:
    """(N, V, H, W) views in [0, 1] with a smooth opacity of `style` (`abnormal_style`) added: Gaussian
    blobs at random places, modulated by a low-frequency texture, blended towards white or black.

    Args:
        x: the views.
        style: the task's abnormality (`abnormal_style`).
        rng: the random source.
    """
    n, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    masks = []
    for _ in range(n):
        m = torch.zeros(h, w)
        for _ in range(rng.randint(1, style["blobs"])):
            cy, cx, sg = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(*style["sigma"])
            m = torch.maximum(m, torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sg * sg)))
        masks.append(m)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    texture = F.interpolate(torch.rand(n, 1, 4, 4, generator=gen), size=(h, w), mode="bilinear", align_corners=False)
    m = (torch.stack(masks)[:, None] * (0.5 + texture) * style["amp"]).clamp(0, 1)
    x = x + m * (1 - x) if style["brighten"] else x * (1 - m)
    return x.clamp(0, 1)


class ClsEpisodeSampler:
    """N-way K-shot episodes from labelled sets and, with probability `ssl_fraction`, UMTRA tasks.

    Harder tasks (all off by default): `max_way` > n_way draws n_way..max_way classes per episode;
    `augment` > 0 augments labelled tasks (a fresh random affine, gamma and noise per example);
    `abnormal_fraction` of the episodes are synthetic 2-way "normal vs abnormal" tasks on the
    unlabelled images (`synthetic_abnormal`).

    Args:
        sets: labelled sets; those without n_way classes of k_shot + n_query examples are left out.
        unlabelled: views for UMTRA and synthetic-abnormality tasks (None: none).
        n_way: classes per episode (the least, with `max_way`).
        k_shot: support examples per class.
        n_query: query examples per class.
        ssl_fraction: the share of UMTRA tasks (Hsu et al.'s unsupervised meta-learning).
        seed: the random seed.
        max_way: the most classes per episode (0: always n_way).
        augment: the strength of the augmentation of labelled tasks (0: none).
        abnormal_fraction: the share of synthetic "normal vs abnormal" tasks.
    """

    def __init__(
        self,
        sets: list[ClsSet],
        unlabelled: torch.Tensor | None = None,
        n_way: int = 2,
        k_shot: int = 5,
        n_query: int = 10,
        ssl_fraction: float = 0.0,
        seed: int = 0,
        max_way: int = 0,
        augment: float = 0.0,
        abnormal_fraction: float = 0.0,
    ):
        self.rng = random.Random(seed)
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.max_way, self.augment = max(max_way, n_way), augment
        self.abnormal_fraction = (
            abnormal_fraction if unlabelled is not None and len(unlabelled) >= 2 * (k_shot + n_query) else 0.0
        )
        need = k_shot + n_query
        self.sets = []
        for s in sets:
            idx = {c: torch.nonzero(s.labels == c).flatten().tolist() for c in s.classes()}
            idx = {c: i for c, i in idx.items() if len(i) >= need}
            if len(idx) >= n_way:
                self.sets.append((s, idx))
        self.unlabelled = unlabelled
        self.ssl_fraction = ssl_fraction if unlabelled is not None and len(unlabelled) >= n_way else 0.0
        if not self.sets and self.ssl_fraction == 0.0:
            raise ValueError(f"no set has {n_way} classes with {need} examples each, and no unlabelled images")

    def sample(self) -> ClsEpisode:
        """One episode: synthetic-abnormality, UMTRA or labelled, in the configured shares."""
        if self.abnormal_fraction > 0 and self.rng.random() < self.abnormal_fraction:
            return self.abnormal_task()
        if not self.sets or self.rng.random() < self.ssl_fraction:
            return self.ssl_task()
        return self.labelled_task()

    def _ways(self, available: int) -> int:
        if self.max_way <= self.n_way:
            return self.n_way
        return self.rng.randint(self.n_way, max(self.n_way, min(self.max_way, available)))

    def labelled_task(self) -> ClsEpisode:
        """An episode from one labelled set: n_way of its classes, k_shot + n_query examples each."""
        s, idx = self.rng.choice(self.sets)
        n_way = self._ways(len(idx))
        classes = self.rng.sample(sorted(idx), n_way)
        xs, ys, xq, yq = [], [], [], []
        for new, c in enumerate(classes):
            pick = self.rng.sample(idx[c], self.k_shot + self.n_query)
            xs.append(s.images[pick[: self.k_shot]])
            xq.append(s.images[pick[self.k_shot :]])
            ys += [new] * self.k_shot
            yq += [new] * self.n_query
        xs, xq = torch.cat(xs), torch.cat(xq)
        if self.augment > 0:
            xs, xq = self._augment(xs), self._augment(xq)
        return ClsEpisode(xs, torch.tensor(ys), xq, torch.tensor(yq), n_way, s.name)

    def _augment(self, x: torch.Tensor, strength: float | None = None) -> torch.Tensor:
        strength = self.augment if strength is None else strength
        out, _ = augment(x, torch.zeros(x.shape[0], *x.shape[2:]), self.rng, strength=strength)
        return out.clamp(0, 1)

    def abnormal_task(self) -> ClsEpisode:
        """2-way: augmented unlabelled images vs *other* ones with a synthetic opacity of one style."""
        assert self.unlabelled is not None
        need = self.k_shot + self.n_query
        picks = self.rng.sample(range(len(self.unlabelled)), 2 * need)
        style = abnormal_style(self.rng)
        abnormal = self.rng.randrange(2)  # which label is the abnormal class
        xs, ys, xq, yq = [], [], [], []
        for c in range(2):
            x = self._augment(self.unlabelled[picks[c * need : (c + 1) * need]], 1.0)
            if c == abnormal:
                x = synthetic_abnormal(x, style, self.rng)
            xs.append(x[: self.k_shot])
            xq.append(x[self.k_shot :])
            ys += [c] * self.k_shot
            yq += [c] * self.n_query
        return ClsEpisode(torch.cat(xs), torch.tensor(ys), torch.cat(xq), torch.tensor(yq), 2, "abnormal")

    def ssl_task(self) -> ClsEpisode:
        """A UMTRA episode: n_way unlabelled examples, each its own class of augmented copies."""
        assert self.unlabelled is not None
        n_way = self._ways(len(self.unlabelled))
        picks = self.rng.sample(range(len(self.unlabelled)), n_way)
        xs, ys, xq, yq = [], [], [], []
        for new, i in enumerate(picks):
            views = ssl_views(self.unlabelled[i], self.k_shot + self.n_query, self.rng)
            xs.append(views[: self.k_shot])
            xq.append(views[self.k_shot :])
            ys += [new] * self.k_shot
            yq += [new] * self.n_query
        return ClsEpisode(torch.cat(xs), torch.tensor(ys), torch.cat(xq), torch.tensor(yq), n_way, "ssl")
