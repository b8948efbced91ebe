"""Volume IO and the slice geometry shared by meta-training, adaptation and inference.

The model is slice-wise (2.5D), so every 3D volume is read with SimpleITK, reoriented to a
canonical orientation, cut along its thickest axis and resized in-plane to a fixed square.
`SliceGeometry` remembers how, so predictions go back to the exact original voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from monailabel_metaapp.core.errors import VolumeError

CANONICAL = "RAS"


def read_image(path: str | Path) -> sitk.Image:
    """Read any SimpleITK-readable file (NIfTI, NRRD, MHA, a DICOM folder); 2D becomes 1-slice 3D.

    Args:
        path: the file or DICOM folder; VolumeError when it cannot be read.
    """
    path = Path(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise VolumeError(f"{path}: folder holds no DICOM series")
            reader.SetFileNames(names)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise VolumeError(f"{path.name}: not a readable image ({str(e).strip().splitlines()[-1]})") from e
    if img.GetNumberOfComponentsPerPixel() > 1:
        img = sitk.VectorIndexSelectionCast(img, 0)
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)
    if img.GetDimension() != 3:
        raise VolumeError(f"{path.name}: {img.GetDimension()}D images are not supported")
    return img


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """True when two images share size, spacing, origin and direction (labels must match images).

    Args:
        a: one image.
        b: the other.
        tol: the tolerance on spacing and direction (origin: scaled by the largest spacing).
    """
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(1.0, *map(abs, a.GetSpacing())))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def normalise_intensity(arr: np.ndarray) -> np.ndarray:
    """Percentile clip and scale to [0, 1]: one rule for CT and MRI of any scanner.

    Args:
        arr: intensities (z, y, x); the percentiles come from every 16th slice or so.
    """
    arr = arr.astype(np.float32)
    sample = arr[:: max(1, arr.shape[0] // 16)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class SliceGeometry:
    """How a volume was turned into a stack of square slices, and how to undo it.

    Args:
        reference: the original image (only its geometry is used).
        oriented: its reoriented copy, the grid the slices were cut from.
        axis: the numpy axis (z-y-x order, of the oriented array) the slices are cut along.
        shape: the oriented array's shape.
    """

    reference: sitk.Image  # the original image (geometry only is used)
    oriented: sitk.Image  # reoriented copy, the grid the slices were cut from
    axis: int  # numpy axis (of the oriented array, z-y-x order) slices are cut along
    shape: tuple[int, int, int]  # oriented numpy shape

    @property
    def n_slices(self) -> int:
        """How many slices the stack has."""
        return self.shape[self.axis]


def slice_axis(spacing_zyx: tuple[float, float, float]) -> int:
    """Cut along the thickest axis (short-axis cine, thick CT); axial when isotropic.

    Args:
        spacing_zyx: voxel spacing in numpy order.
    """
    sp = np.asarray(spacing_zyx)
    return int(np.argmax(sp)) if sp.max() > 1.2 * sp.min() else 0


def to_slices(img: sitk.Image, size: int, label: bool = False) -> tuple[torch.Tensor, SliceGeometry]:
    """Volume -> (S, size, size) float tensor (intensity in [0,1], or label values) and its geometry.

    Args:
        img: the volume.
        size: the side of the square slices.
        label: a label map (nearest-neighbour, values kept) rather than an image (normalised, smoothed).
    """
    oriented = sitk.DICOMOrient(img, CANONICAL)
    arr = sitk.GetArrayFromImage(oriented)  # z, y, x
    spacing_zyx = tuple(reversed(oriented.GetSpacing()))
    axis = slice_axis(spacing_zyx)
    geom = SliceGeometry(reference=img, oriented=oriented, axis=axis, shape=tuple(arr.shape))
    stack = np.moveaxis(arr, axis, 0)
    if not label:
        stack = normalise_intensity(stack)
    t = torch.from_numpy(np.ascontiguousarray(stack)).float()[:, None]
    mode = "nearest" if label else "bilinear"
    kwargs = {} if label else {"align_corners": False, "antialias": True}
    t = F.interpolate(t, size=(size, size), mode=mode, **kwargs)[:, 0]
    return (t.round() if label else t), geom


def grid_spacing(geom: SliceGeometry, size: int) -> tuple[float, float, float]:
    """Spacing in mm of the model's slice grid: (between slices, row, column).

    Args:
        geom: the image's geometry (`to_slices`).
        size: the side of the square slices.
    """
    sp = tuple(reversed(geom.oriented.GetSpacing()))  # z, y, x
    rows, cols = (d for d in range(3) if d != geom.axis)
    return sp[geom.axis], sp[rows] * geom.shape[rows] / size, sp[cols] * geom.shape[cols] / size


def label_slices(lbl: sitk.Image, geom: SliceGeometry, size: int) -> torch.Tensor:
    """A label cut the same way as its image (after checking it lies on the same grid).

    Args:
        lbl: the label map; VolumeError when it does not lie on the image's grid.
        geom: the image's geometry (`to_slices`).
        size: the side of the square slices.
    """
    if not same_geometry(lbl, geom.reference):
        raise VolumeError(
            f"label geometry {lbl.GetSize()} spacing {np.round(lbl.GetSpacing(), 3).tolist()} does not match "
            f"image {geom.reference.GetSize()} spacing {np.round(geom.reference.GetSpacing(), 3).tolist()}"
        )
    t, _ = to_slices(lbl, size, label=True)
    return t.long()


def stack_to_original(prob: torch.Tensor, geom: SliceGeometry) -> np.ndarray:
    """(C, S, size, size) per-class probabilities -> (C, z, y, x) on the original image grid.

    Args:
        prob: probabilities on the slice grid.
        geom: the image's geometry (`to_slices`).
    """
    c = prob.shape[0]
    ax_shape = [d for i, d in enumerate(geom.shape) if i != geom.axis]
    p = F.interpolate(prob.transpose(0, 1).float(), size=tuple(ax_shape), mode="bilinear", align_corners=False)
    p = p.transpose(0, 1)  # C, S, h, w
    p = torch.movedim(p, 1, 1 + geom.axis).contiguous().numpy()  # C, z, y, x (oriented)
    out = []
    for k in range(c):
        im = sitk.GetImageFromArray(p[k].astype(np.float32))
        im.CopyInformation(geom.oriented)
        back = sitk.Resample(im, geom.reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out.append(sitk.GetArrayFromImage(back))
    return np.stack(out)


def labels_to_image(labels_zyx: np.ndarray, geom: SliceGeometry) -> sitk.Image:
    """A label array on the original grid -> SimpleITK image with the original geometry.

    Args:
        labels_zyx: label values (cast to uint8).
        geom: the image's geometry (`to_slices`).
    """
    im = sitk.GetImageFromArray(labels_zyx.astype(np.uint8))
    im.CopyInformation(geom.reference)
    return im
