"""Build tiny DICOM files with pydicom for tests (never needs a real scanner file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """An uncompressed DX dataset with file meta holding ``pixels``.

    ``pixels``: uint8/uint16 (rows, cols), (frames, rows, cols) or (rows, cols, 3) for RGB.
    ``attrs`` are set as DICOM keywords (PatientID=..., WindowCenter=...).
    """
    colour = photometric == "RGB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2] if colour else pixels.shape[-2:]
    if pixels.ndim == 3 and not colour:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2",
                patient: str = "P1", body_part: str = "", study_uid: str | None = None) -> Path:
    """A 16-bit DICOM with patient/study ids (and a body part when given), saved to ``path``."""
    if pixels is None:
        pixels = (np.arange(16 * 16).reshape(16, 16) * 8).astype(np.uint16)
    attrs = {"PatientID": patient, "StudyInstanceUID": study_uid or generate_uid(),
             "SeriesInstanceUID": generate_uid()}
    if body_part:
        attrs["BodyPartExamined"] = body_part
    ds = dicom_dataset(pixels.astype(np.uint16), photometric, **attrs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
