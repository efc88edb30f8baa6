"""Small MR DICOM series written with pydicom, for the DICOM import and DICOM SEG tests.

Each voxel's value encodes where it is in the series (slice * 256 + row * 16 + column), so a
test can tell, after dcm2niix, which DICOM pixel every NIfTI voxel came from.
"""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROWS, COLUMNS, SLICES = 12, 10, 5


def pixel_code(k: int, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    r, c = np.mgrid[:rows, :columns]
    return ((k * 256 + r * 16 + c) % 32768).astype(np.int16)


def decode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.asarray(values).astype(int)
    return values // 256, (values % 256) // 16, values % 16


def write_series(
    folder: Path,
    patient_id: str = "P1",
    study_date: str = "20200102",
    description: str = "T1 MPRAGE POST",
    series_number: int = 3,
    study_uid: str | None = None,
    series_time: str = "101500",
    modality: str = "MR",
    extra: dict | None = None,
    slices: int = SLICES,
    rows: int = ROWS,
    columns: int = COLUMNS,
) -> list[Path]:
    """An axial series of ``slices`` images of ``rows`` x ``columns``, 1.5 x 1.0 x 2.0 mm
    (the pixel codes are unique only at the default size)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    paths = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = "Test^" + patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyDate = study_date
        ds.StudyTime = "100000"
        ds.StudyID = "1"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.SeriesDate = study_date
        ds.SeriesTime = series_time
        ds.Modality = modality
        ds.Manufacturer = "metsflow-test"
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-10.0, -20.0, 5.0 + 2.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.5, 1.0]
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixel_code(k, rows, columns).tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
