"""Click corrections: an annotator's foreground/background points on the open study become a tiny
support for a copy of the structure's head, and the standard simulated-click protocol measures them.

A click is a labelled pixel, so the meta-learned head takes it the way it takes a saved label: each
click's embedding joins the head's prototypes (a foreground click as a foreground prototype, a
background click as a background one), then a few Meta-SGD steps fit the head to the click
neighbourhoods and to the structure's saved labels together, so that a click fixes the open study
without undoing what the saved labels taught. With no saved label and no head (points alone), the
prototypes start from the clicks, and pixels far from every foreground click on the clicked slices
stand in, weakly, for background. The corrected head's prediction is shown only near the clicks and
only with the sign of the click nearest to each voxel (`apply_clicks`), so one click cannot undo the
structure far from it, nor what a nearer click of the other sign fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from monailabel_metaapp.core.adaptation import COMPONENT_KEY, Head, SegAdapter, largest_component
from monailabel_metaapp.core.errors import VolumeError
from monailabel_metaapp.core.inner_loop import inner_adapt, seg_loss
from monailabel_metaapp.core.networks import prototypes
from monailabel_metaapp.core.volume import SliceGeometry, grid_spacing, stack_to_original

CLICK_RADIUS = 2  # pixels of the model grid (160 px across the field of view) around a click that it labels
FAR_FRACTION = 0.25  # points alone: pixels farther than this share of the slice from every foreground click...
FAR_WEIGHT = 0.3  # ...count as background, with this weight against the clicks
CLICK_STEPS = 10  # inner-loop steps per correction


@dataclass(frozen=True)
class Click:
    """One point on the open study: its voxel index (i, j, k) on the original image, and its sign.

    Args:
        ijk: the voxel index, in ITK order (i along the image's first axis), as 3D Slicer and OHIF send it.
        foreground: True for a foreground point, False for a background one.
    """

    ijk: tuple[int, int, int]
    foreground: bool


def parse_points(points, foreground: bool, size: tuple[int, int, int]) -> list[Click]:
    """Client points ([[i, j, k], ...]) -> clicks, checked against the image's size (i, j, k).

    Args:
        points: a list of voxel indices as the clients send them (None or [] for none).
        foreground: the sign of these points.
        size: the image's size in ITK order; a point outside it is a VolumeError.
    """
    out = []
    for p in points or []:
        if not isinstance(p, list | tuple) or len(p) < 3 or not all(isinstance(v, int | float) for v in p[:3]):
            raise VolumeError(f"a point must be [i, j, k] voxel indices; got {p!r}")
        ijk = tuple(int(round(float(v))) for v in p[:3])
        if not all(0 <= v < s for v, s in zip(ijk, size)):
            raise VolumeError(f"point {list(ijk)} lies outside the image (size {list(size)})")
        out.append(Click(ijk, foreground))
    return out


def to_grid(click: Click, geom: SliceGeometry, size: int) -> tuple[int, int, int]:
    """A click's voxel index on the original image -> (slice, row, column) on the model's slice grid
    (`volume.to_slices`: reoriented, cut along `geom.axis`, resized to size x size).

    Args:
        click: the point.
        geom: the study's geometry.
        size: the side of the model's square slices.
    """
    phys = geom.reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in click.ijk])
    i, j, k = geom.oriented.TransformPhysicalPointToContinuousIndex(phys)
    zyx = (k, j, i)
    rest = [d for d in range(3) if d != geom.axis]
    h, w = (geom.shape[d] for d in rest)
    s = int(np.clip(round(zyx[geom.axis]), 0, geom.shape[geom.axis] - 1))
    y = int(np.clip(round((zyx[rest[0]] + 0.5) * size / h - 0.5), 0, size - 1))
    x = int(np.clip(round((zyx[rest[1]] + 0.5) * size / w - 0.5), 0, size - 1))
    return s, y, x


@dataclass
class ClickSupport:
    """The clicked slices as a sparse support: which pixels are labelled, with what and how much.

    Args:
        slices: the clicked slice indices of the stack.
        fg: (n, H, W) pixels a foreground click labels.
        bg: (n, H, W) pixels a background click labels.
        far: (n, H, W) pixels that stand in for background when there are no saved labels.
    """

    slices: list[int]
    fg: torch.Tensor
    bg: torch.Tensor
    far: torch.Tensor


def click_support(
    grid_clicks: list[tuple[int, int, int, bool]], size: int, points_alone: bool, radius: int = CLICK_RADIUS
) -> ClickSupport:
    """Disks of `radius` around each click on its slice; with `points_alone`, the far background too.

    Args:
        grid_clicks: (slice, row, column, foreground) on the model grid.
        size: the side of the model's slices.
        points_alone: no saved label supports the head, so far pixels stand in for background.
        radius: the disk of pixels each click labels.
    """
    slices = sorted({c[0] for c in grid_clicks})
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fg = torch.zeros(len(slices), size, size, dtype=torch.bool)
    bg = torch.zeros_like(fg)
    near_fg = torch.full((len(slices), size, size), float("inf"))
    for s, y, x, is_fg in grid_clicks:
        n = slices.index(s)
        d = ((yy - y) ** 2 + (xx - x) ** 2).float().sqrt()
        (fg if is_fg else bg)[n] |= d <= radius
        if is_fg:
            near_fg[n] = torch.minimum(near_fg[n], d)
    far = (near_fg > FAR_FRACTION * size) & ~fg & ~bg if points_alone else torch.zeros_like(fg)
    fg &= ~bg  # a later background click over a foreground one wins where they touch
    return ClickSupport(slices, fg, bg, far)


def click_loss(logits: tuple[torch.Tensor, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """`seg_loss` on the saved labels' slices + mean cross-entropy on the foreground clicks, on the
    background clicks and (weakly) on the far background: each click group weighs as much as the
    saved labels, however few pixels it has.

    Args:
        logits: ((n_saved, H, W) on the saved labels' slices, (n_clicked, h, w) on the clicked window).
        target: "mask" (n_saved, H, W) saved labels; "fg", "bg", "far" (n_clicked, h, w) pixel sets.
    """
    saved, clicked = logits
    loss = seg_loss(saved, target["mask"]) if saved.numel() else clicked.sum() * 0
    for key, value, weight in (("fg", 1.0, 1.0), ("bg", 0.0, 1.0), ("far", 0.0, FAR_WEIGHT)):
        pix = clicked[target[key]]
        if pix.numel():
            loss = loss + weight * F.binary_cross_entropy_with_logits(pix, torch.full_like(pix, value))
    return loss


class SplitHead:
    """The head over two batches of different sizes at once (the saved labels' whole slices and the
    clicked slices' window), for `inner_adapt`: it differentiates one function of the parameters."""

    def __init__(self, head) -> None:
        self.head = head

    def logits(self, feats: tuple[torch.Tensor, torch.Tensor], params: dict[str, torch.Tensor]) -> tuple:
        return tuple(self.head.logits(f, params) for f in feats)


def window(mask: torch.Tensor, margin: int = 1) -> tuple[slice, slice]:
    """The in-plane box around a mask's pixels (any slice), widened by `margin` (clipped to the image).

    A 3x3 head convolution on the box gives the same values inside it as on the whole slice, so
    the head needs to see only the box: the labelled pixels of the clicked slices, or the voxels a
    correction may change.

    Args:
        mask: (..., H, W) boolean.
        margin: pixels added on each side (1: the head's 3x3 convolution).
    """
    rows = torch.nonzero(mask.reshape(-1, *mask.shape[-2:]).any(0).any(1)).flatten()
    cols = torch.nonzero(mask.reshape(-1, *mask.shape[-2:]).any(0).any(0)).flatten()
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    h, w = mask.shape[-2:]
    y0, y1 = max(0, int(rows[0]) - margin), min(h, int(rows[-1]) + 1 + margin)
    x0, x1 = max(0, int(cols[0]) - margin), min(w, int(cols[-1]) + 1 + margin)
    return slice(y0, y1), slice(x0, x1)


def click_feature(feats: torch.Tensor, click: tuple[int, int, int, bool], radius: int = CLICK_RADIUS) -> torch.Tensor:
    """(1, C) mean embedding of a click's disk on the model grid.

    Args:
        feats: (S, C, H, W) embeddings of the open study.
        click: (slice, row, column, foreground) on the model grid.
        radius: the disk's radius in pixels.
    """
    s, y, x, _ = click
    f = feats[s, :, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1].float()
    return f.flatten(1).mean(1)[None]


def correct_head(
    adapter: SegAdapter,
    feats: torch.Tensor,
    grid_clicks: list[tuple[int, int, int, bool]],
    start: Head | None,
    new: list[tuple[int, int, int, bool]] | None = None,
    saved: tuple[torch.Tensor, torch.Tensor] | None = None,
    steps: int = CLICK_STEPS,
) -> Head:
    """A copy of a head adapted to every click so far (and to the saved labels); `start` is not changed.

    Args:
        adapter: the encoder's adapter (its model gives the head and the learned rates).
        feats: (S, C, H, W) embeddings of the open study.
        grid_clicks: every click so far as (slice, row, column, foreground) on the model grid.
        start: the head to correct (the structure's live head, or the study's copy before the `new`
            clicks); None: points alone, the prototypes start from the clicks.
        new: the clicks `start` has not seen, whose embeddings join its prototypes (default: all).
        saved: (features, masks) of the saved labels' support slices, or None.
        steps: inner-loop steps.
    """
    dev = adapter.device
    new = grid_clicks if new is None else new
    support = click_support(grid_clicks, feats.shape[-1], points_alone=saved is None)
    # the clicked slices count only at their labelled pixels: the head sees the window around them
    ys, xs = window(support.fg | support.bg | support.far)
    cf = feats[..., ys, xs][support.slices].float().to(dev).contiguous(memory_format=torch.channels_last)
    target = {key: getattr(support, key)[..., ys, xs].to(dev) for key in ("fg", "bg", "far")}
    head_net = adapter.model.head
    if start is None:
        pix = cf.permute(0, 2, 3, 1)
        fg_feats, bg_feats, far_feats = (pix[target[key]] for key in ("fg", "bg", "far"))
        if not len(fg_feats):
            raise VolumeError("a structure with no saved label needs at least one foreground point to start from")
        params = dict(head_net.named_parameters())
        params["fg"] = prototypes(fg_feats, head_net.n_fg, fallback=far_feats)
        params["bg"] = prototypes(torch.cat([bg_feats, far_feats]), head_net.n_bg, fallback=fg_feats)
        params[COMPONENT_KEY] = torch.tensor(1.0)
    else:
        params = {k: v.to(dev) for k, v in start.params.items()}
        for c in new:  # each new click's embedding joins the prototypes of its side
            side = "fg" if c[3] else "bg"
            params[side] = torch.cat([params[side], click_feature(feats, c).to(dev)])
    saved_feats, saved_masks = saved if saved is not None else (cf[:0], torch.zeros(0, *cf.shape[2:]))
    both = (saved_feats.float().to(dev).contiguous(memory_format=torch.channels_last), cf)
    target["mask"] = saved_masks.float().to(dev)
    lrs = {k: v.detach() for k, v in adapter.model.lrs().items()}
    with torch.enable_grad():
        params = {k: v.detach().clone().requires_grad_(k in lrs) for k, v in params.items()}
        params = inner_adapt(SplitHead(head_net), params, lrs, both, target, steps, loss_fn=click_loss)
    n_labels = start.n_labels if start is not None else 0
    return Head(params={k: v.detach().cpu() for k, v in params.items()}, n_labels=n_labels, seconds=0.0)


SAVED_SLICES = 8  # saved-label slices a correction keeps fitting beside the clicks (bounded cost per click)


def saved_slices(adapter: SegAdapter, masks: list[torch.Tensor], total: int = SAVED_SLICES) -> list[list[int]]:
    """Which slices of each saved label a correction fits beside the clicks: about `total` slices of
    the structure in all, evenly spread over it and at least 2 per study, plus each study's nearest
    slice without it (where the structure ends).

    Args:
        adapter: the encoder's adapter.
        masks: (S, size, size) binary masks of the structure, one per saved study.
        total: structure slices wanted in all.
    """
    per_study = max(2, total // max(1, len(masks)))
    out = []
    for m in masks:
        idx = adapter.support_slices(m, n_background=1)
        fg = [i for i in idx if m[i].any()]
        picks = {fg[j] for j in np.linspace(0, len(fg) - 1, min(per_study, len(fg))).round().astype(int)}
        out.append(sorted(picks | {i for i in idx if not m[i].any()}))
    return out


SAVED_MARGIN = 0.1  # saved labels are fitted in the box around the structure, widened by this share of a slice


def crop_saved(
    feats: torch.Tensor, masks: torch.Tensor, margin: float = SAVED_MARGIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved labels' support slices cut to one box around the structure: a correction changes the
    label only near the clicks, so the saved labels need to teach the head the structure and its
    surroundings, not the whole field of view, and every inner-loop step costs the box's pixels only.

    Args:
        feats: (n, C, H, W) embeddings of the saved labels' support slices.
        masks: (n, H, W) their binary masks.
        margin: the box's widening on each side, as a share of the slice's side.
    """
    ys, xs = window(masks.bool(), margin=round(margin * masks.shape[-1]))
    return feats[..., ys, xs], masks[..., ys, xs]


def saved_support(
    adapter: SegAdapter, masks: list[torch.Tensor], embed: Callable[[int, list[int]], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, masks) a correction fits beside the clicks: `saved_slices` of each saved study, cut
    by `crop_saved`. The server and `evaluate clicks` both call this, with their own embeddings.

    Args:
        adapter: the encoder's adapter.
        masks: (S, size, size) binary masks of the structure, one per saved study.
        embed: (study index, slice indices) -> (n, C, size, size) embeddings of those slices.
    """
    picks = saved_slices(adapter, masks)
    feats = torch.cat([embed(n, idx) for n, idx in enumerate(picks)]).float()
    return crop_saved(feats, torch.cat([m[i] for m, i in zip(masks, picks)]))


REACH = 0.7  # a click changes the label shown within this share of the structure's equivalent radius...
MIN_REACH_MM = 10.0  # ...and at least this far


@dataclass
class Corrections:
    """One study's click corrections of one structure: where they started, the copy of the head the
    clicks adapted, every click so far and the mask shown (on the model grid).

    Args:
        start: the structure's head the copy started from (None: points alone).
        saved: (features, masks) of the saved labels' support slices (None: no saved label).
        one_piece: whether the structure is one piece (keep the clicked components only).
        shown: (S, H, W) the label shown before the first click, on the model grid (None: predicted
            from `start` at the first click).
    """

    start: Head | None
    saved: tuple[torch.Tensor, torch.Tensor] | None
    one_piece: bool = True
    head: Head | None = None
    clicks: list[Click] = field(default_factory=list)
    grid: list[tuple[int, int, int, bool]] = field(default_factory=list)
    shown: torch.Tensor | None = None
    mask: np.ndarray | None = None  # the last result on the original grid


def apply_clicks(
    adapter: SegAdapter,
    stack: torch.Tensor,
    geom: SliceGeometry,
    feats: torch.Tensor,
    state: Corrections,
    new: list[Click],
) -> np.ndarray:
    """Add clicks to a study's corrections; returns the corrected (z, y, x) mask on the original grid.

    The copy of the head is adapted to every click (`correct_head`). Its prediction is shown near the
    new clicks: within `reach_mm` of one (3D) the label follows the copy, farther away it stays as it
    was, so a head moved by a click cannot undo the structure elsewhere, nor what earlier clicks
    fixed (re-predicting near every earlier click let one background click on a cardiac myocardium
    take its label from 9485 voxels to 1096). The change has the sign of the click nearest to each
    voxel, earlier clicks included: near a foreground click the label only gains what the copy adds,
    near a background click it only loses what the copy removes, and a voxel nearer a click of the
    other sign stays as it is, so a click never undoes what the annotator did not point at (a
    foreground click does not bring back a leak that a nearer background click cut). With points
    alone, or when nothing was shown before, the copy's prediction is shown everywhere.

    Args:
        adapter: the encoder's adapter (the head's own, for a refined head).
        stack: (S, size, size) slices of the open study.
        geom: its geometry.
        feats: its embeddings under `adapter`.
        state: the study's corrections so far (updated in place).
        new: the clicks to add.
    """
    grid_new = [(*to_grid(c, geom, adapter.size), c.foreground) for c in new]
    state.clicks += new
    state.grid += grid_new
    base = state.head if state.head is not None else state.start
    state.head = correct_head(adapter, feats, state.grid, base, new=grid_new, saved=state.saved)
    before = state.shown
    if before is None and state.start is not None:
        before = adapter.predict(stack, [state.start], feats=feats.float())[0] >= 0.5
    if before is None or not before.any():
        shown = adapter.predict(stack, [state.head], feats=feats.float())[0] >= 0.5
    else:  # only the slices within reach of a new click are predicted again
        spacing = grid_spacing(geom, adapter.size)
        reach = reach_mm(before, spacing)
        near_fg = near_clicks([c for c in grid_new if c[3]], before.shape, spacing, reach)
        near_bg = near_clicks([c for c in grid_new if not c[3]], before.shape, spacing, reach)
        near = near_fg | near_bg
        idx = torch.nonzero(near.flatten(1).any(1)).flatten()
        ys, xs = window(near)  # the head sees only the box within reach (same values there as on whole slices)
        corrected = adapter.predict(stack[:, ys, xs][idx], [state.head], feats=feats[..., ys, xs][idx].float())[0]
        shown = before.clone()
        box = shown[:, ys, xs]  # a view: writing into it writes into `shown`
        old, moved = box[idx], corrected >= 0.5
        fg, bg = near_fg[:, ys, xs][idx], near_bg[:, ys, xs][idx]
        # a voxel takes the sign of the click nearest to it, earlier clicks included: within reach of a
        # new foreground click it may only gain what the copy adds, of a background click only lose
        zs = idx.float() * spacing[0]
        fg_side = click_distance([c for c in state.grid if c[3]], zs, ys, xs, spacing) < click_distance(
            [c for c in state.grid if not c[3]], zs, ys, xs, spacing
        )
        box[idx] = torch.where(fg & fg_side, old | moved, torch.where(bg & ~fg_side, old & moved, old))
    state.shown = shown
    mask = stack_to_original(shown.float()[None], geom)[0] >= 0.5
    state.mask = keep_clicked(mask, [c.ijk[::-1] for c in state.clicks if c.foreground], state.one_piece)
    return state.mask


def reach_mm(mask: torch.Tensor, spacing: tuple[float, float, float]) -> float:
    """How far from a click a correction reaches: `REACH` x the radius of a ball of the shown
    structure's volume (about 20 mm for a cardiac blood pool), at least `MIN_REACH_MM`.

    Args:
        mask: (S, H, W) the label shown, on the model grid.
        spacing: the model grid's spacing (slice, row, column) in mm.
    """
    volume = float(mask.sum()) * float(np.prod(spacing))
    return max(MIN_REACH_MM, REACH * (3 * volume / (4 * np.pi)) ** (1 / 3))


def click_distance(
    grid: list[tuple[int, int, int, bool]], zs: torch.Tensor, ys: slice, xs: slice, spacing: tuple[float, float, float]
) -> torch.Tensor:
    """(len(zs), rows, columns) distance in mm from each voxel of a box of the model grid to the
    nearest of `grid`'s clicks (inf with none). zs: the box's slice positions in mm."""
    rows = torch.arange(ys.start, ys.stop, dtype=torch.float32) * spacing[1]
    cols = torch.arange(xs.start, xs.stop, dtype=torch.float32) * spacing[2]
    zz, yy, xx = torch.meshgrid(zs, rows, cols, indexing="ij")
    d2 = torch.full(zz.shape, float("inf"))
    for s, y, x, _ in grid:
        d2 = torch.minimum(d2, (zz - s * spacing[0]) ** 2 + (yy - y * spacing[1]) ** 2 + (xx - x * spacing[2]) ** 2)
    return d2.sqrt()


def near_clicks(
    grid: list[tuple[int, int, int, bool]], shape: tuple[int, ...], spacing: tuple[float, float, float], reach: float
) -> torch.Tensor:
    """(S, H, W) voxels of the model grid within `reach` mm of a click.

    Args:
        grid: clicks as (slice, row, column, foreground) on the model grid.
        shape: the grid's shape.
        spacing: its spacing (slice, row, column) in mm.
        reach: the distance in mm.
    """
    zs = torch.arange(shape[0], dtype=torch.float32) * spacing[0]
    return click_distance(grid, zs, slice(0, shape[1]), slice(0, shape[2]), spacing) <= reach


def keep_clicked(mask: np.ndarray, fg_zyx: list[tuple[int, int, int]], one_piece: bool) -> np.ndarray:
    """The components of a binary mask the annotator asked for. For a structure that is one piece:
    its largest component and every component holding a foreground click (a click adds a piece; it
    never drops the body of the structure, e.g. when the correction leaves the clicked voxel apart
    from it); stray pieces go. A clicked voxel outside the mask is added to it.

    Args:
        mask: (z, y, x) binary prediction on the original grid.
        fg_zyx: foreground clicks as numpy indices of that grid.
        one_piece: whether the structure is one piece (its head's `one_piece`).
    """
    mask = mask.astype(bool).copy()
    for z, y, x in fg_zyx:
        mask[z, y, x] = True
    if not one_piece:
        return mask
    body = largest_component(mask)
    if not fg_zyx:
        return body
    cc, _ = ndimage.label(mask)
    return body | np.isin(cc, sorted({int(cc[z, y, x]) for z, y, x in fg_zyx}))


def next_click(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Click | None:
    """The standard simulated click: at the voxel deepest inside the largest error region (3D,
    distance in mm), foreground when the region is missed structure, background when it is a leak.
    None when the prediction is exact.

    Args:
        pred: (z, y, x) binary prediction on the original grid.
        ref: (z, y, x) binary reference.
        spacing_zyx: voxel spacing in numpy order.
    """
    err = pred.astype(bool) ^ ref.astype(bool)
    cc, n = ndimage.label(err)
    if not n:
        return None
    sizes = ndimage.sum_labels(err, cc, index=np.arange(1, n + 1))
    region = cc == 1 + int(np.argmax(sizes))
    dist = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    z, y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Click((int(x), int(y), int(z)), bool(ref[z, y, x]))


def clicks_to_reach(dices: list[float], level: float, cap: int) -> int:
    """NoC@level: clicks until Dice first reaches `level` (`cap` when it never does).

    Args:
        dices: Dice after 0, 1, 2, ... clicks.
        level: the Dice to reach.
        cap: the count when it is not reached.
    """
    return next((i for i, d in enumerate(dices) if d >= level), cap)
