"""Build ``sample_studies/``: a small MONAI Label datastore the project may redistribute.

Why: the app needs brain MRI studies to demo and test on, with some labelled and some held out, but
real patient data cannot ship with it. The MNI152 2009 template and its grey/white matter maps are
bundled inside nilearn's wheel (no download), under a permissive MNI/McGill notice. Each study is
the template warped by its own seeded random affine + smooth elastic deformation, with realistic
intensity changes (bias field, gamma, Rician noise) and varied geometry (anisotropic, flipped,
permuted, oblique, cropped grids), so the app meets the kinds of files it will meet in practice.
Reference labels (GM/WM/CSF) follow the same deformation, so they are exact for every study.

Rebuild with ``metaapp samples --out sample_studies`` or
``python -m monailabel_metaapp.samples --out sample_studies``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

LABELS: dict[str, int] = {"grey matter": 1, "white matter": 2, "csf": 3}
REBUILD_COMMAND = "metaapp samples --out sample_studies"
REFERENCES_DIR = ".references"  # hidden: MONAI Label's local datastore does not list it
_STUDY_FILE = re.compile(r"^mni_\d+\.(nrrd|nii\.gz)$")

# Random ranges (documented verbatim in PROVENANCE.md).
ROTATION_DEG = 8.0  # each Euler angle uniform in [-8, 8] degrees
SCALE_RANGE = (0.9, 1.1)  # per-axis scaling
SHIFT_MM = 5.0  # each translation component uniform in [-5, 5] mm
ELASTIC_AMP_MM = (2.0, 4.0)  # peak displacement of the elastic field
ELASTIC_SIGMA_MM = 16.0  # gaussian smoothing of the white-noise displacement field
ELASTIC_SPACING_MM = 4.0  # grid on which the displacement field is defined
GAMMA_RANGE = (0.8, 1.25)  # log-uniform
BIAS_AMP = (0.05, 0.15)  # multiplicative bias field within 1 +/- amp
NOISE_FRAC = (0.01, 0.04)  # Rician noise sigma as a fraction of the intensity scale
INTENSITY_SCALE = (800.0, 1200.0)  # template max (1.0) maps to this value
MARGIN_MM = 10.0  # background kept around the brain
CROP_INFERIOR = (0.10, 0.20)  # fraction of the brain's height cut off by the cropped study
OBLIQUE_DEG = 15.0
SUPPORT_MIN = 0.02  # deformed template below this (of its max) is background, kept at 0

# MNI/McGill notice published with the ICBM 2009 release (nilearn's wheel does not ship it: its
# icbm152_2009.rst says "License: unknown"). Quoted so that it accompanies all copies.
MNI_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    'about the suitability of this software for any purpose. It is provided "as is" without express '
    "or implied warranty. The authors are not responsible for any data loss, equipment damage, "
    "property loss, or injury to subjects or patients resulting from the use or misuse of this "
    "software package."
)
CITATIONS = (
    "V.S. Fonov, A.C. Evans, K. Botteron, C.R. Almli, R.C. McKinstry, D.L. Collins and BDCG. Unbiased "
    "average age-appropriate atlases for pediatric studies. NeuroImage 54(1):313-327, 2011. "
    "doi:10.1016/j.neuroimage.2010.07.033",
    "V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli and D.L. Collins. Unbiased nonlinear average "
    "age-appropriate brain templates from birth to adulthood. NeuroImage 47(Suppl 1):S102, 2009 "
    "(OHBM 2009). doi:10.1016/S1053-8119(09)70884-5",
    "D.L. Collins, A.P. Zijdenbos, W.F.C. Baare and A.C. Evans. ANIMAL+INSECT: Improved cortical "
    "structure segmentation. IPMI 1999, LNCS 1613:210-223. doi:10.1007/3-540-48714-X_16",
)


def _rot(axis: int, deg: float) -> np.ndarray:
    """Rotation matrix about one world axis."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


_RAS = np.diag([-1.0, -1.0, 1.0])  # LPS direction cosines of a NIfTI-style RAS+ grid
_UNIT_CUBE = np.array([[a, b, d] for a in (0, 1) for b in (0, 1) for d in (0, 1)], float)


@dataclass(frozen=True)
class Variant:
    """How one study's voxel grid differs from the plain template grid (exercises geometry handling)."""

    name: str
    ext: str
    direction: np.ndarray  # 3x3, columns = LPS directions of the i, j, k axes
    spacing_factor: tuple[int, int, int] = (1, 1, 1)  # spacing multiple of resolution_mm per axis
    crop: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("axial, RAS+ storage", ".nii.gz", _RAS),
    Variant("axial, LPS storage (i, j flipped)", ".nrrd", np.eye(3)),
    Variant("thick axial slices (2x spacing along k, slab-averaged)", ".nii.gz", _RAS, (1, 1, 2)),
    Variant(
        "sagittal slices, axes permuted (i=P, j=I, k=L)",
        ".nrrd",
        np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    ),
    Variant("cropped to the brain, inferior part cut off, LPS storage", ".nii.gz", np.eye(3), crop=True),
    Variant(
        f"oblique axial, tilted {OBLIQUE_DEG:g} deg about the left-right axis", ".nrrd", _rot(0, OBLIQUE_DEG) @ _RAS
    ),
)


@dataclass
class Grid:
    """A voxel grid in LPS world coordinates (SimpleITK's convention); size/spacing in i, j, k order."""

    size: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    def to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(..., 3) continuous indices -> (..., 3) LPS points."""
        return self.origin + (np.asarray(ijk, float) * self.spacing) @ self.direction.T

    def corners(self) -> np.ndarray:
        return self.to_world(_UNIT_CUBE * (self.size - 1))

    def apply(self, img: sitk.Image) -> sitk.Image:
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction.ravel()])
        return img


@dataclass
class Source:
    """The template and tissue maps at 1 mm as one 4-component SimpleITK image (T1, GM, WM, mask)."""

    image: sitk.Image
    brain_points: np.ndarray  # (n, 3) LPS points of the brain mask (every 2nd voxel): its extent
    brain_centre: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)


def _to_sitk_grid(affine: np.ndarray, shape: tuple[int, ...]) -> Grid:
    """nibabel (RAS) affine -> LPS grid."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :4]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return Grid(np.array(shape[:3]), spacing, lps[:, 3].copy(), lps[:, :3] / spacing)


def load_source() -> Source:
    """Load T1, GM, WM and brain mask with nilearn's own loaders (bundled files, nothing downloaded).

    Loaded at their native 1 mm so that each study is interpolated only once, straight onto its grid.
    nilearn ships no CSF map (``fetch_icbm152_2009`` would download it), so CSF is derived later as
    the residual 1 - GM - WM inside nilearn's brain mask (T1 > 0.2).
    """
    from nilearn import datasets
    from nilearn.datasets import struct

    imgs = [
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    grid = _to_sitk_grid(imgs[0].affine, imgs[0].shape)
    for im in imgs[1:]:
        if not np.allclose(im.affine, imgs[0].affine) or im.shape != imgs[0].shape:
            raise ValueError("nilearn's MNI152 maps are not on one grid")
    chans = [np.asarray(im.get_fdata(dtype=np.float32)).transpose(2, 1, 0) for im in imgs]  # -> z, y, x
    vec = grid.apply(sitk.GetImageFromArray(np.stack(chans, axis=-1), isVector=True))
    points = grid.to_world(2 * np.argwhere(chans[3][::2, ::2, ::2] > 0)[:, ::-1])  # z, y, x -> i, j, k
    files = {
        name: Path(getattr(struct, const))
        for name, const in (("T1", "MNI152_FILE_PATH"), ("GM", "GM_MNI152_FILE_PATH"), ("WM", "WM_MNI152_FILE_PATH"))
        if hasattr(struct, const)
    }
    return Source(vec, points, (points.min(0) + points.max(0)) / 2, files)


@dataclass
class Study:
    """One generated study: arrays in SimpleITK (z, y, x) order plus what made them."""

    study_id: str
    variant: Variant
    grid: Grid
    image: np.ndarray  # int16
    label: np.ndarray  # uint8
    params: dict


def _output_grid(variant: Variant, points: np.ndarray, resolution_mm: float, margin: float) -> Grid:
    """Smallest grid of the variant's orientation holding the (deformed) brain plus a margin."""
    d = variant.direction
    coords = points @ d  # projections on the grid axes
    lo, hi = coords.min(0) - margin, coords.max(0) + margin
    spacing = resolution_mm * np.array(variant.spacing_factor, float)
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    centre = (lo + hi) / 2
    start = centre - spacing * (size - 1) / 2
    return Grid(size, spacing, d @ start, d.copy())


def _elastic_field(grid: Grid, amp: float, rng: np.random.Generator) -> sitk.Transform:
    """Smooth random displacement (gaussian-filtered white noise), peak magnitude ``amp`` mm."""
    pts = grid.corners()
    lo = pts.min(0) - 2 * ELASTIC_SIGMA_MM
    hi = pts.max(0) + 2 * ELASTIC_SIGMA_MM
    n = np.ceil((hi - lo) / ELASTIC_SPACING_MM).astype(int) + 1  # x, y, z
    noise = rng.standard_normal((3, n[2], n[1], n[0]))
    disp = np.stack([gaussian_filter(c, ELASTIC_SIGMA_MM / ELASTIC_SPACING_MM) for c in noise], axis=-1)
    disp *= amp / np.sqrt((disp**2).sum(-1)).max()
    img = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    img.SetSpacing([ELASTIC_SPACING_MM] * 3)
    img.SetOrigin([float(v) for v in lo])
    return sitk.DisplacementFieldTransform(img)


def _bias_field(grid: Grid, shape: tuple[int, ...], coef: np.ndarray, amp: float) -> np.ndarray:
    """Smooth multiplicative field in 1 +/- amp: a random quadratic in scanner (world) coordinates."""
    k, j, i = np.meshgrid(*(np.arange(s, dtype=float) for s in shape), indexing="ij")
    p = grid.to_world(np.stack([i, j, k], axis=-1))
    u = (p - p.reshape(-1, 3).mean(0)) / 100.0
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    f = sum(c * t for c, t in zip(coef, (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)))
    return 1.0 + amp * f / np.abs(f).max()


def _crop(grid: Grid, arrays: list[np.ndarray], label: np.ndarray, frac: float) -> tuple[Grid, list[np.ndarray]]:
    """Crop to the brain (1 voxel margin) and cut ``frac`` of its height off the inferior end."""
    idx = np.argwhere(label > 0)  # z, y, x
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, label.shape)
    axis_ijk = int(np.argmax(np.abs(grid.direction[2])))  # grid axis closest to superior-inferior
    ax = 2 - axis_ijk  # numpy axis
    cut = int(round(frac * (hi[ax] - lo[ax])))
    if grid.direction[2, axis_ijk] > 0:  # index grows upwards: inferior = low indices
        lo[ax] += cut
    else:
        hi[ax] -= cut
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    start_ijk = lo[::-1].astype(float)
    new = Grid(np.array((hi - lo)[::-1]), grid.spacing, grid.to_world(start_ijk), grid.direction)
    return new, [a[sl] for a in arrays]


def make_study(index: int, seed: int, src: Source, resolution_mm: float) -> Study:
    """Study ``index`` (0-based): its own RNG stream, so study k is the same whatever ``n_studies``."""
    rng = np.random.default_rng([seed, index])
    variant = VARIANTS[index % len(VARIANTS)]
    angles = rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3)
    scales = rng.uniform(*SCALE_RANGE, 3)
    shift = rng.uniform(-SHIFT_MM, SHIFT_MM, 3)
    elastic_amp = rng.uniform(*ELASTIC_AMP_MM)
    gamma = float(np.exp(rng.uniform(np.log(GAMMA_RANGE[0]), np.log(GAMMA_RANGE[1]))))
    bias_amp = rng.uniform(*BIAS_AMP)
    bias_coef = rng.standard_normal(9)
    noise_frac = rng.uniform(*NOISE_FRAC)
    scale = rng.uniform(*INTENSITY_SCALE)
    crop_frac = rng.uniform(*CROP_INFERIOR)

    # Affine (output -> template space): p_src = M (p - c) + c + t, with M = R S.
    m = _rot(0, angles[0]) @ _rot(1, angles[1]) @ _rot(2, angles[2]) @ np.diag(scales)
    c = src.brain_centre
    affine = sitk.AffineTransform(m.ravel().tolist(), shift.tolist(), c.tolist())
    brain_out = (src.brain_points - c - shift) @ np.linalg.inv(m).T + c  # the brain in output space
    grid = _output_grid(variant, brain_out, resolution_mm, MARGIN_MM + elastic_amp)

    # Thick slices: sample at resolution_mm, then average each slab (partial volume like a real scan).
    f = np.array(variant.spacing_factor)
    fine = Grid(
        grid.size * f, grid.spacing / f, grid.origin - grid.direction @ (grid.spacing / f * (f - 1) / 2), grid.direction
    )
    elastic = _elastic_field(fine, elastic_amp, rng)
    rs = sitk.ResampleImageFilter()
    rs.SetSize([int(s) for s in fine.size])
    rs.SetOutputSpacing([float(v) for v in fine.spacing])
    rs.SetOutputOrigin([float(v) for v in fine.origin])
    rs.SetOutputDirection([float(v) for v in fine.direction.ravel()])
    rs.SetTransform(sitk.CompositeTransform([affine, elastic]))  # elastic applied first, then affine
    rs.SetInterpolator(sitk.sitkLinear)
    rs.SetDefaultPixelValue(0.0)
    rs.SetOutputPixelType(sitk.sitkVectorFloat32)
    arr = sitk.GetArrayFromImage(rs.Execute(src.image))  # z, y, x, 4
    fz, fy, fx = f[::-1]
    nz, ny, nx = grid.size[::-1]
    arr = arr.reshape(nz, fz, ny, fy, nx, fx, 4).mean(axis=(1, 3, 5))
    t1, gm, wm, mask = (arr[..., k] for k in range(4))

    # Reference label: argmax of the deformed tissue maps inside the deformed brain mask.
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = (np.argmax(np.stack([gm, wm, csf]), axis=0) + 1).astype(np.uint8)
    label[mask < 0.5] = 0
    if variant.crop:
        grid, (t1, label) = _crop(grid, [t1, label], label, crop_frac)

    # Intensities: gamma, bias field, global scale, Rician noise, int16.
    x = np.clip(t1, 0.0, 1.0) ** gamma
    x = x * _bias_field(grid, x.shape, bias_coef, bias_amp) * scale
    sigma = noise_frac * scale
    x = np.hypot(x + sigma * rng.standard_normal(x.shape), sigma * rng.standard_normal(x.shape))
    x[t1 < SUPPORT_MIN] = 0.0  # skull-stripped like its source: background stays exactly 0
    image = np.clip(np.rint(x), 0, np.iinfo(np.int16).max).astype(np.int16)

    params = {
        "rotation_deg": angles.round(2).tolist(),
        "scale": scales.round(3).tolist(),
        "shift_mm": shift.round(2).tolist(),
        "elastic_peak_mm": round(float(elastic_amp), 2),
        "gamma": round(gamma, 3),
        "bias_amp": round(float(bias_amp), 3),
        "noise_sigma_frac": round(float(noise_frac), 4),
        "intensity_scale": round(float(scale), 1),
    }
    if variant.crop:
        params["inferior_cut_frac"] = round(float(crop_frac), 3)
    return Study(f"mni_{index + 1:02d}", variant, grid, image, label, params)


def _write(study: Study, image_path: Path, label_path: Path) -> None:
    """Image (int16) and label (uint8) with identical geometry, compressed."""
    img = study.grid.apply(sitk.GetImageFromArray(study.image))
    lbl = sitk.GetImageFromArray(study.label)
    lbl.CopyInformation(img)
    sitk.WriteImage(img, str(image_path), useCompression=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(lbl, str(label_path), useCompression=True)


def _orientation(direction: np.ndarray) -> str:
    """Axis codes (the anatomical direction each of i, j, k points to), e.g. 'RAS'."""
    letters = ("RL", "AP", "IS")  # LPS world: negative / positive end of x, y, z
    out = []
    for col in direction.T:
        a = int(np.argmax(np.abs(col)))
        out.append(letters[a][int(col[a] > 0)])
    return "".join(out)


def _nilearn_licence() -> str:
    """The 'License' section of nilearn's own description of the ICBM152 2009 data, verbatim."""
    try:
        text = resources.files("nilearn.datasets.description").joinpath("icbm152_2009.rst").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return "(nilearn's icbm152_2009.rst not found)"
    m = re.search(r"^License\n-+\n(.*?)(?:\n\S[^\n]*\n-{3,}\n|\Z)", text, flags=re.M | re.S)
    return m.group(1).strip() if m else "(no License section in nilearn's icbm152_2009.rst)"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_TABLE_HEAD = (
    "| id | format | geometry | axes | size (i x j x k) | spacing mm | rotation deg | scale | shift mm "
    "| elastic mm | gamma | bias | noise | intensity | cut | label |\n" + "|---" * 16 + "|"
)


def _provenance(studies: list[Study], src: Source, seed: int, n_labelled: int, resolution_mm: float) -> str:
    """PROVENANCE.md: sources, licence, exact derivation, which studies are labelled, how to rebuild."""
    import nilearn

    files = "\n".join(
        f"- {name}: `nilearn/datasets/data/{p.name}` (sha256 `{_sha256(p)}`)" for name, p in src.files.items()
    )
    rows = []
    for s in studies:
        p = s.params
        where = (
            f"`labels/final/{s.study_id}{s.variant.ext}`"
            if s.study_id in {t.study_id for t in studies[:n_labelled]}
            else f"`{REFERENCES_DIR}/{s.study_id}{s.variant.ext}`"
        )
        rows.append(
            f"| {s.study_id} | `{s.variant.ext}` | {s.variant.name} | {_orientation(s.grid.direction)} | "
            f"{'x'.join(map(str, s.grid.size))} | {'x'.join(f'{v:g}' for v in s.grid.spacing)} | "
            f"{p['rotation_deg']} | {p['scale']} | {p['shift_mm']} | {p['elastic_peak_mm']} | {p['gamma']} | "
            f"{p['bias_amp']} | {p['noise_sigma_frac']} | {p['intensity_scale']} | "
            f"{p.get('inferior_cut_frac', '')} | {where} |"
        )
    cites = "\n".join(f"- {c}" for c in CITATIONS)
    nl_licence = "\n".join(f"> {line}" if line else ">" for line in _nilearn_licence().splitlines())
    return (
        f"""# Sample studies: provenance

Generated by `monailabel_metaapp/samples.py` (`build_samples`). Rebuild with:

```
{REBUILD_COMMAND}
```

(or `python -m monailabel_metaapp.samples --out sample_studies --n {len(studies)} --seed {seed}`).
Same seed, same arrays (and, with the same SimpleITK/zlib, the same bytes).

## Source

The MNI ICBM152 2009a nonlinear symmetric template (1 mm, skull-stripped T1) and its grey- and
white-matter probability maps, as bundled inside the nilearn {nilearn.__version__} wheel (8-bit
"converted" copies; nothing is downloaded). They are read with nilearn's loaders
`load_mni152_template`, `load_mni152_gm_template`, `load_mni152_wm_template` and
`load_mni152_brain_mask` (T1 > 0.2), all at `resolution=1`:

{files}

The file names say `nlin_sym_09a` (the symmetric 2009a release, original archive
`mni_icbm152_nlin_sym_09a_nifti.zip`); nilearn's own description calls it "asymmetrical ICBM152 2009,
release a". nilearn does not bundle the CSF map, so CSF is derived (below).

Please cite (the references nilearn's description gives):

{cites}

### Licence

nilearn's description of this data (`nilearn/datasets/description/icbm152_2009.rst`) says, under
"License":

{nl_licence}

nilearn's wheel does not ship the template's own notice. The McConnell Brain Imaging Centre
publishes this one with the ICBM 2009 templates (http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009,
now http://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/); it must accompany all copies,
including these derived images:

> {MNI_NOTICE}

## Derivation

For study k (1-based), a generator `numpy.random.default_rng([seed, k - 1])` with seed = {seed} draws,
in this order: three Euler angles uniform in +/-{ROTATION_DEG:g} deg, per-axis scales uniform in
{SCALE_RANGE[0]:g}-{SCALE_RANGE[1]:g}, a shift uniform in +/-{SHIFT_MM:g} mm, the elastic field's peak
{ELASTIC_AMP_MM[0]:g}-{ELASTIC_AMP_MM[1]:g} mm, gamma log-uniform in {GAMMA_RANGE[0]:g}-{GAMMA_RANGE[1]:g},
the bias amplitude {BIAS_AMP[0]:g}-{BIAS_AMP[1]:g}, nine bias coefficients N(0, 1), the noise level
{NOISE_FRAC[0]:g}-{NOISE_FRAC[1]:g}, the intensity scale {INTENSITY_SCALE[0]:g}-{INTENSITY_SCALE[1]:g}, the crop
fraction {CROP_INFERIOR[0]:g}-{CROP_INFERIOR[1]:g}, then the elastic white noise and the Rician noise.

1. Geometry. Affine about the brain's centre, `p_template = R S (p - c) + c + t`, composed with a
   smooth elastic displacement applied first: white noise on a {ELASTIC_SPACING_MM:g} mm world grid,
   gaussian-filtered (sigma {ELASTIC_SIGMA_MM:g} mm) and scaled to the drawn peak magnitude. The output grid
   (spacing {resolution_mm:g} mm times the variant's factor) is the smallest box of the variant's
   orientation holding the deformed brain plus {MARGIN_MM:g} mm + the elastic peak.
2. T1, GM, WM and brain mask are resampled together, once, from 1 mm, with SimpleITK linear
   interpolation through the same transform. For thick slices, slabs of 2 samples at {resolution_mm:g} mm
   are averaged (slice partial volume).
3. Label: CSF = clip(1 - GM - WM, 0, 1); label = argmax(GM, WM, CSF) + 1 where the deformed
   brain mask >= 0.5, else 0 (values: {json.dumps(LABELS)}). uint8, same grid as its image.
4. Cropped variant: crop to the label's bounding box + 1 voxel, then cut the drawn fraction of the
   brain's height off the inferior end.
5. Intensity: template (0..1) ** gamma, times a bias field 1 + amp * q(x)/max|q| (q a random quadratic
   in scanner coordinates), times the intensity scale, then Rician noise
   `sqrt((x + s n1)^2 + (s n2)^2)`, s = noise level * scale; rounded to int16. The source is
   skull-stripped (exactly 0 outside the brain), so voxels where the deformed template is below
   {SUPPORT_MIN:g} stay 0, as after skull stripping (this also keeps the files small).
6. Written with SimpleITK `WriteImage(..., useCompression=True)`.

## Studies

The first {n_labelled} have final labels in `labels/final/`; the references of the others are in
`{REFERENCES_DIR}/` (hidden from MONAI Label's datastore; tests use them to measure Dice).

{_TABLE_HEAD}
"""
        + "\n".join(rows)
        + "\n"
    )


def _clear_previous(out: Path) -> None:
    """Remove studies (and their labels) from an earlier build, so a smaller rebuild leaves no strays."""
    for folder in (out, out / "labels" / "final", out / REFERENCES_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and _STUDY_FILE.match(p.name):
                    p.unlink()


def build_samples(
    out_dir: str | Path, n_studies: int = 6, n_labelled: int = 2, seed: int = 0, resolution_mm: float = 2.0
) -> list[str]:
    """Write ``n_studies`` deformed MNI152 studies as a MONAI Label datastore folder.

    Images at the top of ``out_dir``; the first ``n_labelled`` get ``labels/final/<file>``, the rest
    get their reference in ``.references/<file>``. Also writes ``labels.json`` and ``PROVENANCE.md``.
    Study files of an earlier build (``mni_NN.nrrd/.nii.gz``, labels included) are removed first, since
    their labels would no longer fit. Returns the study ids (file names without extension) written.
    """
    if n_studies < 1 or not 0 <= n_labelled <= n_studies:
        raise ValueError(f"need n_studies >= 1 and 0 <= n_labelled <= n_studies, got {n_studies}, {n_labelled}")
    if resolution_mm <= 0:
        raise ValueError(f"resolution_mm must be > 0, got {resolution_mm}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    src = load_source()
    studies = []
    for k in tqdm(range(n_studies), desc="sample studies", unit="study", disable=None):
        s = make_study(k, seed, src, resolution_mm)
        name = s.study_id + s.variant.ext
        label_dir = out / "labels" / "final" if k < n_labelled else out / REFERENCES_DIR
        _write(s, out / name, label_dir / name)
        s.image = s.label = np.empty(0)  # only the geometry and parameters are needed from here on
        studies.append(s)
    (out / "labels.json").write_text(json.dumps(LABELS) + "\n")
    (out / "PROVENANCE.md").write_text(_provenance(studies, src, seed, n_labelled, resolution_mm))
    return [s.study_id for s in studies]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sample_studies", help="datastore folder to write")
    p.add_argument("--n", type=int, default=6, help="number of studies")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    ids = build_samples(a.out, n_studies=a.n, seed=a.seed)
    print(f"wrote {len(ids)} studies to {a.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
