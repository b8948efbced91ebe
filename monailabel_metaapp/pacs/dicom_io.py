"""Volumes <-> DICOM: an image series from any SimpleITK volume (to load studies into a PACS), a
label map -> DICOM SEG that references that series (pydicom-seg, no external tool), and a SEG read
back onto the image grid (SEGs often hold only the labelled frames)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

UID_PREFIX = "1.2.826.0.1.3680043.10.1526."  # any UID root works offline; this one is the project's


def _uid(*parts: str) -> str:
    """A UID that is the same for the same inputs, so loading a study twice does not duplicate it."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def _ds_string(value: float) -> str:
    """DICOM DS values hold at most 16 characters."""
    s = f"{value:.6g}"
    return s if len(s) <= 16 else f"{value:.8e}"[:16]


def volume_to_series(
    image: sitk.Image, patient_id: str, study_name: str, modality: str = "MR", description: str = ""
) -> list[Dataset]:
    """A volume as a DICOM image series, so studies kept as NIfTI/NRRD can be loaded into a PACS.

    One instance per slice along the volume's third axis, with positions and orientation from its
    geometry (any direction cosines); floats or out-of-range integers are stored as int16 with a
    rescale slope. The UIDs derive from `patient_id` and `study_name`, so storing the same study
    again replaces it instead of duplicating it.

    Args:
        image: a 3D volume.
        patient_id: PatientID and PatientName of the series.
        study_name: the study's name (StudyDescription; StudyID is its first 16 characters).
        modality: the DICOM Modality; "MR" is stored as MR Image Storage, anything else as CT Image
            Storage. Default "MR".
        description: SeriesDescription; default "" (the study name is used).

    Returns:
        The series' datasets, one per slice, in slice order.

    Raises:
        ValueError: when `image` is not 3D.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"{study_name}: a 3D volume is expected, got {image.GetDimension()}D")
    arr = sitk.GetArrayFromImage(image)  # z, y, x
    slope, intercept = 1.0, 0.0
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < -32768 or arr.max() > 32767:
        lo, hi = float(arr.min()), float(arr.max())
        slope = (hi - lo) / 65000.0 if hi > lo else 1.0
        intercept = lo + 32500.0 * slope
        arr = np.round((arr - intercept) / slope)
    arr = arr.astype(np.int16)
    lo, hi = np.percentile(arr[arr > arr.min()] if (arr > arr.min()).any() else arr, [1, 99.5])
    center, width = (lo + hi) / 2 * slope + intercept, max(hi - lo, 1) * slope  # viewers open on the tissue
    d = np.array(image.GetDirection()).reshape(3, 3)
    sp = image.GetSpacing()
    study_uid, series_uid = _uid(patient_id, study_name, "study"), _uid(patient_id, study_name, "series")
    frame_uid = _uid(patient_id, study_name, "frame")
    today = dt.date.today().strftime("%Y%m%d")
    out = []
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = _uid(patient_id, study_name, "slice", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName = patient_id, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.StudyDescription = study_name[:16], study_name
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.SeriesDescription = description or study_name
        ds.ImagePositionPatient = [_ds_string(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [_ds_string(v) for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [_ds_string(sp[1]), _ds_string(sp[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = _ds_string(sp[2])
        ds.SpacingBetweenSlices = _ds_string(sp[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds_string(slope), _ds_string(intercept)
        ds.WindowCenter, ds.WindowWidth = _ds_string(center), _ds_string(width)
        ds.PixelData = arr[k].tobytes()
        out.append(ds)
    return out


def series_to_image(files: Sequence[str | Path]) -> sitk.Image:
    """A DICOM image series as one volume, so a study fetched from a PACS reads like any image file.

    Args:
        files: the files of the series; they are read from the folder of the first one (GDCM sorts
            the slices along the normal), so that folder should hold this series only.

    Returns:
        The volume.
    """
    folder = Path(files[0]).parent
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute()


def label_to_seg(
    label: sitk.Image,
    names: dict[str, int],
    source: Sequence[Dataset],
    series_description: str = "metaapp label",
    identity: str | None = None,
) -> Dataset:
    """A label map as a DICOM SEG that references its image series, so a label can be stored on a PACS.

    One binary segment per named value present in the label; values without a name are left out.

    Args:
        label: the label map (integer values, 0 is background).
        names: structure name -> label value.
        source: the datasets of the image series the label annotates; they must share the label's
            grid (the app's labels always do).
        series_description: SeriesDescription of the SEG (at most 64 characters kept); default
            "metaapp label".
        identity: what makes this SEG this SEG (e.g. the image id and the label's SHA-256). Given,
            its UIDs derive from it, so storing it again (a retried upload, after a crash between the
            store and its record) replaces the same instance instead of adding a second SEG.

    Returns:
        The SEG dataset.

    Raises:
        ValueError: when the label holds no named value.
    """
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v > 0}
    segments = [
        {
            "labelID": int(v),
            "SegmentLabel": name[:64],
            "SegmentDescription": name[:64],
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "123037004",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure",
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": "85756007",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Tissue",
            },
        }
        for name, v in sorted(names.items(), key=lambda kv: kv[1])
        if v in present
    ]
    if not segments:
        raise ValueError("the label holds no named structure: no SEG written")
    template = pydicom_seg.template.from_dcmqi_metainfo(
        {
            "ContentCreatorName": "metaapp",
            "SeriesDescription": series_description[:64],
            "SeriesNumber": "300",
            "InstanceNumber": "1",
            "BodyPartExamined": "",
            "segmentAttributes": [segments],
            "ContentLabel": "SEGMENTATION",
            "ContentDescription": "monailabel_metaapp label",
            "ClinicalTrialCoordinatingCenterName": "",
        }
    )
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=True)
    keep = sorted(present & {s["labelID"] for s in segments})
    arr = sitk.GetArrayFromImage(label).astype(np.uint16)
    arr[~np.isin(arr, keep)] = 0
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(label)
    seg = writer.write(mask, list(source))
    if identity is not None:
        seg.SeriesInstanceUID = _uid("seg-series", identity)
        seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = _uid("seg", identity)
    now = dt.datetime.now()
    seg.SeriesDate = seg.ContentDate = now.strftime("%Y%m%d")
    seg.SeriesTime = seg.ContentTime = now.strftime("%H%M%S.%f")
    return seg


def seg_referenced_series(seg: Dataset) -> str | None:
    """SeriesInstanceUID of the image series a SEG annotates, to match a SEG with its image.

    Args:
        seg: the SEG dataset.

    Returns:
        The UID from its ReferencedSeriesSequence, or None when the SEG does not name one.
    """
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        if "SeriesInstanceUID" in item:
            return str(item.SeriesInstanceUID)
    return None


def seg_to_label(seg: Dataset, reference: sitk.Image) -> tuple[sitk.Image, dict[str, int]]:
    """A SEG read back as a label map on its image's grid (SEGs often hold only the labelled frames).

    Binary and fractional SEGs with any subset of frames are read; each segment is resampled onto
    `reference` and written with its segment number as value (a later segment wins where they overlap).

    Args:
        seg: the SEG dataset.
        reference: the image the label must lie on.

    Returns:
        ``(label, {segment label: value})``; the label is uint8 with `reference`'s geometry.
    """
    reader = pydicom_seg.SegmentReader()
    result = reader.read(seg)
    out = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    names: dict[str, int] = {}
    for number in sorted(result.available_segments):
        part = result.segment_image(number)
        part = sitk.Cast(part > 0, sitk.sitkUInt8) if part.GetPixelID() != sitk.sitkUInt8 else part
        on_grid = sitk.Resample(part, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out[sitk.GetArrayViewFromImage(on_grid) > 0] = number
        info = result.segment_infos[number]
        label = str(info.get("SegmentLabel", f"Segment {number}")).strip() or f"Segment {number}"
        names[label] = int(number)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(reference)
    return img, names


def read_dataset(path: str | Path) -> Dataset:
    """One DICOM file as a dataset, so callers need not import pydicom.

    Args:
        path: the file.

    Returns:
        The dataset, pixel data included.
    """
    return pydicom.dcmread(str(path))
