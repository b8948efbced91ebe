"""sample_studies/ builder: datastore layout, label/image geometry, determinism, offline."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from monailabel_metaapp.samples import build_samples


def _offline(*_a, **_k):
    raise AssertionError("build_samples tried to use the network")


def _build(out: Path, **kw) -> list[str]:
    """Build with sockets disabled: everything must come from nilearn's wheel."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _offline)
        mp.setattr(socket, "create_connection", _offline)
        return build_samples(out, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("samples") / "sample_studies"
    return out, _build(out, n_studies=6)


def _images(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_file() and p.name.endswith((".nrrd", ".nii.gz")))


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def test_layout(built):
    out, ids = built
    images = _images(out)
    assert len(images) == 6 and ids == [p.name.split(".")[0] for p in images]
    assert {".nrrd", ".nii.gz"} <= {".nii.gz" if p.name.endswith(".nii.gz") else p.suffix for p in images}
    assert json.loads((out / "labels.json").read_text()) == {"grey matter": 1, "white matter": 2, "csf": 3}
    prov = (out / "PROVENANCE.md").read_text()
    assert "metaapp samples --out sample_studies" in prov and "McConnell Brain Imaging Centre" in prov


@pytest.mark.parametrize("where, count", [("labels/final", 2), (".references", 4)])
def test_labels_match_their_images(built, where, count):
    out, ids = built
    labels = sorted((out / where).iterdir())
    assert len(labels) == count
    for lp in labels:
        img, lbl = sitk.ReadImage(str(out / lp.name)), sitk.ReadImage(str(lp))
        assert _same_grid(img, lbl), lp.name
        assert lbl.GetPixelID() == sitk.sitkUInt8 and img.GetPixelID() == sitk.sitkInt16
        assert set(np.unique(sitk.GetArrayViewFromImage(lbl))) == {0, 1, 2, 3}, lp.name
    final = {p.name.split(".")[0] for p in (out / "labels/final").iterdir()}
    assert final == set(ids[:2])


def _label(out: Path, study: str) -> np.ndarray:
    p = next(q for d in ("labels/final", ".references") for q in (out / d).glob(f"{study}.*"))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def test_deterministic_per_seed(built, tmp_path):
    out, _ = built
    same = _build(tmp_path / "same", n_studies=2)  # study k does not depend on n_studies
    other = _build(tmp_path / "other", n_studies=2, seed=1)
    for sid in same:
        assert np.array_equal(_label(out, sid), _label(tmp_path / "same", sid))
    assert all(
        _label(out, sid).shape != _label(tmp_path / "other", sid).shape
        or not np.array_equal(_label(out, sid), _label(tmp_path / "other", sid))
        for sid in other
    )
