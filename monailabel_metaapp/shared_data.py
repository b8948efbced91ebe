"""Datastore views of the public datasets kept beside the project (`../shared/datasets`).

The files are read in place: a view is a temporary MONAI Label datastore folder of symbolic links
(images at the top, labels in `labels/final/`), so nothing is copied into the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CMR_STRUCTURES = {"lv myocardium": 200, "lv blood pool": 500, "rv blood pool": 600}


def shared_datasets() -> Path | None:
    """`$METAAPP_SHARED_DATASETS` or `../shared/datasets` beside the checkout; None when absent."""
    p = Path(os.environ.get("METAAPP_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
    return p if p.is_dir() else None


def require_shared_datasets() -> Path:
    """`shared_datasets()` for the benchmarks, which need real data: exits with why when absent."""
    root = shared_datasets()
    if root is None:
        raise SystemExit("../shared/datasets is absent: this benchmark needs real data")
    return root


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


def cmr_ids(root: Path) -> list[int]:
    return sorted(
        int(m.group(1)) for f in (root / "cmr_bssfp").glob("image_*.nii.gz") if (m := re.match(r"image_(\d+)", f.name))
    )


def cmr_view(out: str | Path, ids: list[int] | None = None, labelled: bool = True) -> Path:
    """MS-CMRSeg bSSFP volumes `ids` as a datastore folder, with a labels.json naming the structures."""
    root = shared_datasets()
    if root is None:
        raise FileNotFoundError("../shared/datasets is absent")
    out = Path(out)
    for i in ids or cmr_ids(root):
        name = f"cmr_{i:02d}.nii.gz"
        _link(root / "cmr_bssfp" / f"image_{i}.nii.gz", out / name)
        if labelled:
            _link(root / "cmr_bssfp" / f"label_{i}.nii.gz", out / "labels" / "final" / name)
    (out / "labels.json").write_text(json.dumps(CMR_STRUCTURES))
    return out


def writable_cmr_store(out: str | Path, ids: list[int], labelled: list[int]) -> Path:
    """A datastore the app may write into: the MS-CMRSeg volumes `ids` copied (not linked), with final
    labels for `labelled` only (the others wait for an annotator's save)."""
    store = cmr_view(out, ids)
    for i in ids:
        if i not in labelled:
            (store / "labels" / "final" / f"cmr_{i:02d}.nii.gz").unlink()
    for p in list(store.rglob("*")):
        if p.is_symlink():
            real = p.resolve()
            p.unlink()
            shutil.copy(real, p)
    return store


def one_structure_label(src: str | Path, value: int, out: str | Path, new_value: int = 1) -> Path:
    """A label file holding only the structure `value` of `src` (as `new_value`), as an annotator's
    single segment would."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    lbl = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) == value).astype(np.uint8) * new_value)
    lbl.CopyInformation(img)
    sitk.WriteImage(lbl, str(out), useCompression=True)
    return Path(out)


def totalseg_view(out: str | Path) -> Path:
    """TotalSegmentator's example CT (with its 41-structure reference) plus the unlabelled CT and MR."""
    root = shared_datasets()
    if root is None:
        raise FileNotFoundError("../shared/datasets is absent")
    src, out = root / "totalseg_example", Path(out)
    for f in ("example_ct_sm.nii.gz", "example_ct.nii.gz", "example_mr_sm.nii.gz"):
        _link(src / f, out / f)
    _link(src / "example_seg.nii.gz", out / "labels" / "final" / "example_ct_sm.nii.gz")
    names = json.loads((src / "labels.json").read_text())["labels"]
    (out / "labels.json").write_text(json.dumps({v: int(k) for k, v in names.items()}))
    return out
