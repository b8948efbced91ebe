"""Episodic task sampling from a MONAI Label datastore folder.

A datastore folder holds images at the top and final labels in `labels/final/<same name>`.
Two kinds of task are drawn:
* labelled: one structure (label value); support slice(s) from one study, query slices at the
  matching relative position in another study (plus, sometimes, a slice outside the structure so
  the model learns to predict nothing there);
* self-supervised (SSL-ALPNet, Ouyang et al. 2020): a Felzenszwalb superpixel of an unlabelled
  slice is the pseudo-structure; support and query are two random augmentations of that slice;
* or, with `ssl_kind="supervoxel"` (after ADNet, Hansen et al. 2022): a 3D supervoxel of a study's
  slice stack is the pseudo-structure, support and query are DIFFERENT slices it crosses, so the
  encoder also learns how a structure changes from slice to slice, as between a real task's studies.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import felzenszwalb, slic
from tqdm import tqdm

from monailabel_metaapp.core.errors import VolumeError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
SSL_KINDS = ("superpixel", "supervoxel")  # the self-supervised tasks `EpisodeSampler` can draw
BODY = 12  # uint8 intensity above which a pixel counts as inside the body
PSEUDO_SIZE = (0.005, 0.15)  # usable pseudo-structure sizes, as a share of the slice


def superpixel_map(image: np.ndarray, scale: int = 100) -> np.ndarray:
    """Felzenszwalb superpixels of one uint8 slice (int16 ids): a self-supervised task's pseudo-labels.

    Args:
        image: the slice, uint8 intensities.
        scale: Felzenszwalb's scale; larger gives larger superpixels.
    """
    return felzenszwalb(image / 255.0, scale=scale, sigma=0.8, min_size=60).astype(np.int16)


def image_stem(path: str | Path) -> str:
    """An image file's name without its image suffix: the datastore's id of a local or PACS-cached study.

    Args:
        path: the image file.
    """
    name = Path(path).name
    return next((name[: -len(e)] for e in IMAGE_SUFFIXES if name.lower().endswith(e)), name)


@dataclass
class Study:
    """One volume as slices on the model grid (uint8 storage keeps a bank small)."""

    name: str
    image: torch.Tensor  # (S, size, size) uint8, intensity * 255
    label: torch.Tensor | None  # (S, size, size) int16 label values, or None when unlabelled
    superpixels: torch.Tensor | None = None  # (S, size, size) int16
    supervoxels: torch.Tensor | None = None  # (S, size, size) int16, 0 outside the body
    # (scale, slices) -> (slice indices, their int16 superpixel maps) at that Felzenszwalb scale on at most
    # that many slices (`episode_bank.study_superpixels`), kept where a bank is rebuilt as a datastore grows
    superpixels_at: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def values(self) -> list[int]:
        return [] if self.label is None else [int(v) for v in torch.unique(self.label) if v > 0]


@dataclass
class Episode:
    x_support: torch.Tensor  # (Ns, 1+2c, H, W)
    y_support: torch.Tensor  # (Ns, H, W) float {0,1}
    x_query: torch.Tensor
    y_query: torch.Tensor
    structure: str


def image_files(folder: str | Path) -> list[Path]:
    """Images at the top of a datastore folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def label_names(folder: str | Path) -> dict[int, str]:
    """value -> name from the folder's `labels.json`: {"name": value} or {"labels": {"value": "name"}}."""
    f = Path(folder) / "labels.json"
    if not f.exists():
        return {}
    d = json.loads(f.read_text())
    if isinstance(d.get("labels"), dict):
        return {int(v): str(k) for v, k in d["labels"].items()}
    return {int(v): k for k, v in d.items() if isinstance(v, (int, float))}


def load_studies(folders: list[str | Path], size: int, progress: bool = True) -> list[Study]:
    """Read every image (and its final label, if any) of one or more datastore folders."""
    from monailabel_metaapp.core.volume import label_slices, read_image, to_slices  # SimpleITK: files only

    files = [(Path(d), f) for d in folders for f in image_files(d)]
    if not files:
        raise VolumeError(f"no images found in {', '.join(map(str, folders))}")
    studies = []
    for folder, f in tqdm(files, desc="reading studies", disable=not progress, unit="study"):
        img, geom = to_slices(read_image(f), size)
        lbl_path = folder / "labels" / "final" / f.name
        label = None
        if lbl_path.exists():
            label = label_slices(read_image(lbl_path), geom, size).to(torch.int16)
        studies.append(Study(name=f"{folder.name}/{f.name}", image=(img * 255).round().to(torch.uint8), label=label))
    return studies


def read_studies(sources: list[str | Path], size: int, progress: bool = True) -> list[Study]:
    """Datastore folders and/or `.npz` study banks (`metaapp bank`) -> studies, banks first."""
    missing = [str(p) for p in sources if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such studies folder or bank: {', '.join(missing)}")
    banks = [p for p in sources if str(p).endswith(".npz")]
    folders = [p for p in sources if not str(p).endswith(".npz")]
    for f in folders:
        if not Path(f).is_dir():
            raise ValueError(f"{f} is neither a datastore folder nor a .npz bank")
    studies = [s for b in banks for s in load_bank(b)]
    if folders:
        studies += load_studies(folders, size, progress=progress)
    return studies


def add_superpixels(studies: list[Study], progress: bool = True) -> None:
    """Felzenszwalb superpixels per slice: the pseudo-labels of self-supervised tasks."""
    for s in tqdm(studies, desc="superpixels", disable=not progress, unit="study"):
        if s.superpixels is None:
            s.superpixels = torch.from_numpy(np.stack([superpixel_map(sl) for sl in s.image.numpy()]))


def add_supervoxels(
    studies: list[Study], side: int = 20, z_pixels: float = 8.0, compactness: float = 0.05, progress: bool = True
) -> None:
    """3D SLIC supervoxels of each study's slice stack (inside the body): the pseudo-labels of
    supervoxel tasks.

    Sizes: a supervoxel is aimed at `side` pixels across in-plane (about 1.5% of a 160 x 160 slice,
    inside the 0.5-15% usable range of a superpixel task). Slices are cut along a volume's thickest
    axis, so one slice step counts as `z_pixels` in-plane pixels: 8 is twice the physical 4 of cardiac
    MRI (8 mm slices, 2 mm pixels on the 160 grid), which keeps a supervoxel to a few slices (median 5
    on the cardiac images) whose cuts still look alike. `compactness` 0.05 (intensities in [0, 1]) lets
    the outlines follow edges: on cardiac MRI more of a supervoxel falls in one structure than at 0.1.

    Args:
        studies: the studies; those with supervoxels already are skipped.
        side: the in-plane size, in pixels, a supervoxel is aimed at.
        z_pixels: in-plane pixels one slice step counts as.
        compactness: SLIC's balance of intensity against distance.
        progress: show a progress bar.
    """
    for s in tqdm(studies, desc="supervoxels", disable=not progress, unit="study"):
        if s.supervoxels is None:
            body = (s.image > BODY).numpy()
            n_seg = max(1, round(body.sum() / (side * side * side / z_pixels)))
            sv = slic(s.image.numpy() / 255.0, n_seg, compactness, spacing=(z_pixels, 1, 1), mask=body,
                      channel_axis=None, start_label=1)  # fmt: skip
            s.supervoxels = torch.from_numpy(sv.astype(np.int16))


def save_bank(studies: list[Study], path: str | Path) -> None:
    """Preprocessed studies as one compressed .npz: meta-train elsewhere without the source files."""
    arrays = {}
    for i, s in enumerate(studies):
        arrays[f"{i}/image"] = s.image.numpy()
        if s.label is not None:
            arrays[f"{i}/label"] = s.label.numpy()
    names = np.array([s.name for s in studies])
    np.savez_compressed(path, names=names, **arrays)


def load_bank(path: str | Path) -> list[Study]:
    z = np.load(path)
    return [
        Study(
            name=str(n),
            image=torch.from_numpy(z[f"{i}/image"]),
            label=torch.from_numpy(z[f"{i}/label"]) if f"{i}/label" in z else None,
        )
        for i, n in enumerate(z["names"])
    ]


def split_validation(studies: list[Study], seed: int) -> tuple[list[Study], list[Study]]:
    """(train, validation) studies: one labelled study in eight (at least one, from four labelled
    studies on) is held out of meta-training for its validation loss; whole studies, so that no
    slice of a validation study is trained on."""
    labelled = [s for s in studies if s.label is not None]
    val = random.Random(seed).sample(labelled, max(1, len(labelled) // 8)) if len(labelled) >= 4 else []
    held_out = {id(s) for s in val}  # by identity: two sources may name studies alike
    return [s for s in studies if id(s) not in held_out], val


def with_context(stack: torch.Tensor, idx: list[int], context: int) -> torch.Tensor:
    """Slices idx of a (S, H, W) stack with `context` neighbours each side as channels (edge-clamped)."""
    s = stack.shape[0]
    out = [stack[[min(max(i + o, 0), s - 1) for o in range(-context, context + 1)]] for i in idx]
    return torch.stack(out).float()


def augment(
    x: torch.Tensor, y: torch.Tensor, rng: random.Random, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine (rotation, scale, shift) + gamma + noise on (N, C, H, W) images and (N, H, W) masks."""
    n = x.shape[0]
    thetas = []
    for _ in range(n):
        a = math.radians(rng.uniform(-15, 15) * strength)
        sc = 1 + rng.uniform(-0.12, 0.12) * strength
        tx, ty = (rng.uniform(-0.08, 0.08) * strength for _ in range(2))
        thetas.append([[math.cos(a) / sc, -math.sin(a) / sc, tx], [math.sin(a) / sc, math.cos(a) / sc, ty]])
    theta = torch.tensor(thetas, dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0]
    gamma = math.exp(rng.uniform(-0.3, 0.3) * strength)
    x = x.clamp(0, 1) ** gamma
    x = x + torch.randn_like(x) * 0.02 * strength
    return x, y


class EpisodeSampler:
    """Draws labelled and self-supervised episodes from a list of studies."""

    def __init__(
        self,
        studies: list[Study],
        context: int = 1,
        exclude: set[int] | None = None,
        ssl_fraction: float = 0.5,
        n_support: int = 1,
        n_query: int = 2,
        negative_prob: float = 0.3,
        device: str | torch.device = "cpu",
        seed: int = 0,
        ssl_kind: str = "superpixel",
    ):
        """`ssl_kind`: the self-supervised task `sample` draws, "superpixel" (`ssl_task`) or
        "supervoxel" (`supervoxel_task`)."""
        if ssl_kind not in SSL_KINDS:
            raise ValueError(f"ssl_kind must be one of {', '.join(SSL_KINDS)}, got {ssl_kind!r}")
        self.context, self.n_support, self.n_query, self.ssl_kind = context, n_support, n_query, ssl_kind
        self.negative_prob, self.device = negative_prob, torch.device(device)
        self.rng = random.Random(seed)
        self.studies = studies
        exclude = exclude or set()
        # structures are keyed by dataset and value: value 1 of one site is not value 1 of another
        self.by_value: dict[tuple[str, int], list[Study]] = {}
        for s in studies:
            for v in s.values():
                if v not in exclude:
                    self.by_value.setdefault((s.name.split("/")[0], v), []).append(s)
        self.ssl_fraction = ssl_fraction if self.by_value else 1.0
        if self.ssl_fraction > 0:
            # only the pseudo-labels of the task drawn: both take seconds per study
            (add_supervoxels if ssl_kind == "supervoxel" else add_superpixels)(studies, progress=False)

    def sample(self) -> Episode:
        if self.rng.random() < self.ssl_fraction:
            return self.supervoxel_task() if self.ssl_kind == "supervoxel" else self.ssl_task()
        return self.labelled_task()

    def _xy(self, study: Study, idx: list[int], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = with_context(study.image, idx, self.context) / 255.0
        return x.to(self.device), mask[idx].float().to(self.device)

    def labelled_task(self, key: tuple[str, int] | None = None) -> Episode:
        key = key if key is not None else self.rng.choice(sorted(self.by_value))
        pool, v = self.by_value[key], key[1]
        a, b = self.rng.sample(pool, 2) if len(pool) >= 2 else (pool[0], pool[0])  # one study: slice-level task
        r = self.rng.random()
        ma, mb = (a.label == v), (b.label == v)
        sa, sb = _slices_with(ma), _slices_with(mb)
        i_s = [sa[min(len(sa) - 1, int(r * len(sa)))]]
        while len(i_s) < self.n_support:
            i_s.append(self.rng.choice(sa))
        j = int(r * len(sb))
        i_q = [sb[min(len(sb) - 1, max(0, j + o))] for o in range(self.n_query)]
        outside = [i for i in range(mb.shape[0]) if i not in set(sb)]
        if outside and self.rng.random() < self.negative_prob:
            i_q[-1] = self.rng.choice(outside)
        xs, ys = self._xy(a, i_s, ma)
        xq, yq = self._xy(b, i_q, mb)
        xs2, ys2 = augment(xs, ys, self.rng, 0.5)
        if ys2.sum() > 0:  # keep the structure in view of the support
            xs, ys = xs2, ys2
        xq, yq = augment(xq, yq, self.rng, 0.5)
        return Episode(xs, ys, xq, yq, structure=str(v))

    def ssl_task(self) -> Episode:
        for _ in range(50):
            s = self.rng.choice(self.studies)
            i = self.rng.randrange(s.image.shape[0])
            body = s.image[i] > BODY
            if body.float().mean() < 0.05:
                continue
            sp = s.superpixels[i]
            ids, counts = torch.unique(sp[body], return_counts=True)
            n_pix = sp.numel()
            lo, hi = PSEUDO_SIZE[0] * n_pix, PSEUDO_SIZE[1] * n_pix
            ok = [int(k) for k, c in zip(ids, counts) if lo < c < hi]
            if ok:
                mask = (sp == self.rng.choice(ok))[None]
                break
        else:
            raise VolumeError("no usable superpixel found: are the images empty?")
        x = with_context(s.image, [i], self.context).to(self.device) / 255.0
        y = mask.float().to(self.device)
        xs, ys = augment(x.repeat(self.n_support, 1, 1, 1), y.repeat(self.n_support, 1, 1), self.rng)
        if ys.sum() == 0:
            xs, ys = x.repeat(self.n_support, 1, 1, 1), y.repeat(self.n_support, 1, 1)
        xq, yq = augment(x.repeat(self.n_query, 1, 1, 1), y.repeat(self.n_query, 1, 1), self.rng)
        return Episode(xs, ys, xq, yq, structure="superpixel")

    def supervoxel_task(self, max_gap: int = 3) -> Episode:
        """A supervoxel of usable in-plane size (0.5-15% of a slice) on at least two slices: support on
        one, queries on others at most `max_gap` slices away, each under its own augmentation. The
        query is thus another cut of the same 3D region, not a copy of the support."""
        for _ in range(50):
            s = self.rng.choice(self.studies)
            sv = s.supervoxels
            n_pix = sv[0].numel()
            k_max = int(sv.max()) + 1
            area = torch.stack([torch.bincount(sl.flatten().long(), minlength=k_max) for sl in sv], 1)  # (K, S)
            usable = (area > PSEUDO_SIZE[0] * n_pix) & (area < PSEUDO_SIZE[1] * n_pix)
            usable[0] = False  # outside the body
            ids = [int(k) for k in torch.nonzero(usable.sum(1) >= 2).flatten()]
            if not ids:
                continue
            k = self.rng.choice(ids)
            on = [int(i) for i in torch.nonzero(usable[k]).flatten()]
            i = self.rng.choice(on)
            near = [j for j in on if j != i and abs(j - i) <= max_gap]
            if near:
                break
        else:
            raise VolumeError("no usable supervoxel found: are the images empty or single slices?")
        mask = sv == k
        xs, ys = self._xy(s, [i] * self.n_support, mask)
        xq, yq = self._xy(s, [self.rng.choice(near) for _ in range(self.n_query)], mask)
        xs2, ys2 = augment(xs, ys, self.rng)
        if ys2.sum() > 0:  # keep the region in view of the support
            xs, ys = xs2, ys2
        xq, yq = augment(xq, yq, self.rng)
        return Episode(xs, ys, xq, yq, structure="supervoxel")


def _slices_with(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(mask.flatten(1).any(1)).flatten()]
