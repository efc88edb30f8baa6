"""Atomic file output and checked NIfTI input.

Every file the pipeline writes goes through ``atomic_path``: the content is written to a
temporary file in the destination folder and renamed into place, so a job killed at any
moment leaves either the old file or the complete new one, never a truncated one; the next
write of that file removes what a killed writer left (``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from metsflow.core import layout

_UMASK = os.umask(0)
os.umask(_UMASK)

# Spacing outside this range (mm) is not a plausible clinical MRI voxel.
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
# pixdim and the affine's column lengths must agree to this (relative): nibabel writes both from
# one affine; a header whose pixdim says 4 mm and whose sform says 1 mm is refused, since
# readers that trust pixdim would get volumes off by 64x.
PIXDIM_RTOL = 1e-3
# Largest departure of the voxel axes from perpendicular (degrees). ANTs keeps a direction
# matrix (no shear) and refused 0.3 degrees with "spacing 3.99995 does not match header zooms
# 4.0" and 1 degree as "desheared directions deviate"; 0.25 degrees converts (measured with
# brainmask.nifti_to_ants on 4 mm voxels). Checked in header_problems, so `cohort check --deep`
# and the pipeline refuse the same files (26.6 degrees used to pass --deep).
MAX_SHEAR_DEG = 0.25
# Voxel data a header may claim (shape x bytes per voxel of the stored type), checked before
# any voxel is read or decompressed. Sized from the largest clinical input: a 0.5 mm isotropic
# whole head (512 x 512 x 384) is 192 MiB as int16 and 384 MiB if exported as float32; a
# routine 1 mm 3D T1c (256 x 256 x 176 int16) is 22 MiB. 512 MiB passes both and refuses the
# known gzip bomb of issue #25 (an 883 KB .nii.gz inflating to 864 MiB, 1.8 GB peak when read),
# which the former 1,024 MiB default let through. Per run: the config's
# preprocess.max_image_mb; per check: `metsflow cohort check --deep --max-image-mb`.
MAX_IMAGE_MB = 512


# The store's marker file (its one owner is the layout): only LabelStore writes there.
LABEL_STORE_MARKER = layout.LABEL_STORE_MARKER


class LabelStoreWriteError(PermissionError):
    """A pipeline write aimed inside the human label store (a misconfigured output path)."""


def find_store_root(path: str | os.PathLike) -> Path | None:
    """The label store containing ``path`` (found by its marker file), or None."""
    current = Path(os.path.abspath(path))
    for folder in (current, *current.parents):
        if (folder / LABEL_STORE_MARKER).is_file():
            return folder
    return None


def guard_not_in_store(path: str | os.PathLike) -> None:
    """Raise ``LabelStoreWriteError`` if ``path`` (or where a symlink in it leads) lies inside a
    label store: the one guard every pipeline writer goes through (``atomic_path`` calls it), so
    a misconfigured output path can never touch human labels."""
    for candidate in {Path(os.path.abspath(path)), Path(path).resolve()}:
        root = find_store_root(candidate)
        if root is not None:
            raise LabelStoreWriteError(
                f"refusing to write {path}: it is inside the human label store {root}; "
                "only label imports (LabelStore.import_label) write there"
            )


def _contains_store(folder: Path) -> Path | None:
    """A label store inside ``folder`` (not following links: ``rmtree`` does not either)."""
    for parent, dirs, files in os.walk(folder):
        if LABEL_STORE_MARKER in files:
            return Path(parent)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(parent, d))]
    return None


def remove_path(path: str | os.PathLike, ignore_errors: bool = False) -> None:
    """Remove a file, link or folder tree: the one removal every pipeline job, script and CLI
    command makes (stale outputs, partial folders, scratch). It resolves links and refuses
    (``LabelStoreWriteError``, whatever ``ignore_errors``) a path that is, or is inside, or
    holds a label store: a ``results/preprocessed`` linked into the store made the stale-output
    removal delete a study's confirmed versions and history (issue #25). ``ignore_errors``
    silences OS errors only. A missing path is not an error."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    guard_not_in_store(path)
    is_tree = path.is_dir() and not path.is_symlink()
    if is_tree:
        inner = _contains_store(path)
        if inner is not None:
            raise LabelStoreWriteError(
                f"refusing to remove {path}: it holds the human label store {inner}"
            )
    try:
        if is_tree:
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        if not ignore_errors:
            raise


class StudyError(Exception):
    """A problem with one study's input: the study is quarantined, the cohort goes on."""

    def __init__(self, study_id: str, problem: str, path: str | os.PathLike | None = None):
        self.study_id = study_id
        self.problem = problem
        self.path = None if path is None else str(path)
        where = f" ({self.path})" if self.path else ""
        if study_id in ("?", "", None):  # a file given on its own (metsflow evaluate): no study
            super().__init__(f"{self.path}: {problem}" if self.path else problem)
        else:
            super().__init__(f"study {study_id}{where}: {problem}")


# Who writes a temporary file, in its name: a hash of the host name and the process id (asked
# at each write: a forked worker is a writer of its own).
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _writer() -> str:
    return f"{_HOST}-{os.getpid()}"


def _temporary_prefix(path: Path, writer: str) -> str:
    return f".{path.name.split('.')[0]}.{writer}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(path: str | os.PathLike, suffix: str) -> list[Path]:
    """Remove the temporary files of ``path`` that ``atomic_path`` left when its writer was killed
    (SIGKILL, a SLURM time limit: no ``finally`` runs). Seen in tests/test_faults.py: a run killed
    while a shard manifest was being written left ``.s0000.<random>.tsv`` beside it for good. A
    temporary file names its writer (host hash and pid); only those of this host whose process
    is gone are removed, so a live writer, here or on another node of a shared file system, is
    never disturbed. Returns what was removed."""
    path = Path(path)
    mine = _HOST
    removed = []
    stem = path.name.split(".")[0]
    for old in path.parent.glob(f".{glob.escape(stem)}.{mine}-*{glob.escape(suffix)}"):
        # .<stem>.<host>-<pid>.<random><suffix>: mkstemp's random part has no dot, so a
        # longer suffix of another file with the same stem does not match.
        middle = old.name[len(f".{stem}.{mine}-") : len(old.name) - len(suffix)]
        pid, _, random = middle.partition(".")
        if not pid.isdigit() or not random or "." in random or _process_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
            removed.append(old)
    return removed


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str | None = None, label_store_write: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the file's full suffix (``.nii.gz``) so writers that choose a
    format by extension (nibabel, ANTs, pandas) behave as for the final name.

    A destination inside the human label store is refused (``LabelStoreWriteError``), so no
    pipeline output (prediction, table, checkpoint) can replace a confirmed label whatever the
    configured paths; only the label store's own importer passes ``label_store_write=True``.
    """
    path = Path(path)
    if not label_store_write:
        guard_not_in_store(path)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path, suffix)
        fd, tmp = tempfile.mkstemp(
            prefix=_temporary_prefix(path, _writer()), suffix=suffix, dir=path.parent
        )
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; outputs get the usual permissions of a new file (umask applied).
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        # The user chose ``path``; the temporary name beside it means nothing to them.
        if exc.filename in (str(tmp_path), tmp_path) or exc.filename2 == str(path):
            raise _naming(exc, path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()  # our own temporary file beside a checked destination


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as the same OS error about ``path`` (the destination, not its temporary file)."""
    return type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}", str(path))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | os.PathLike, text: str, label_store_write: bool = False) -> None:
    with atomic_path(path, label_store_write=label_store_write) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, label_store_write: bool = False) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_text(path, text, label_store_write=label_store_write)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_table(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as TSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def save_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    dtype: np.dtype | type | None = None,
    header: nib.Nifti1Header | None = None,
    label_store_write: bool = False,
) -> None:
    """Save ``data`` on ``affine`` atomically; labels should pass an integer ``dtype``."""
    if dtype is not None:
        data = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float), header=header)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if dtype is not None:
        img.set_data_dtype(dtype)
    with atomic_path(path, label_store_write=label_store_write) as tmp:
        nib.save(img, tmp)


def voxel_spacing(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Voxel size (mm) along the array axes: the affine's column lengths (the sform or qform
    nibabel uses), as every metsflow reader takes it; never pixdim alone."""
    return np.linalg.norm(np.asarray(img.affine, dtype=float)[:3, :3], axis=0)


def shear_deg(affine: np.ndarray) -> float:
    """Largest departure from 90 degrees between two voxel axes of ``affine`` (0 for any
    rotation or flip of a rectangular grid, however oblique)."""
    columns = np.asarray(affine, dtype=float)[:3, :3]
    columns = columns / np.linalg.norm(columns, axis=0)
    cosines = np.abs(columns.T @ columns)[np.triu_indices(3, k=1)]
    return float(np.degrees(np.arcsin(np.clip(cosines.max(), 0.0, 1.0))))


def _mm(values) -> str:
    """Plain numbers for messages: (1, 1, 4.5) mm, never np.float64(...)."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def image_bytes(img: nib.spatialimages.SpatialImage) -> int:
    """Bytes the header says the voxel data takes (shape x bytes per stored voxel)."""
    itemsize = np.dtype(img.header.get_data_dtype()).itemsize
    return int(np.prod([int(n) for n in img.shape], dtype=object)) * itemsize


def header_problems(
    img: nib.spatialimages.SpatialImage, what: str, max_image_mb: float = MAX_IMAGE_MB
) -> list[str]:
    """Problems found from the header alone (no voxel read): the one reading of a NIfTI header
    shared by the pipeline's loader (``load_nifti``), ``metsflow cohort check --deep`` and
    ``metsflow evaluate``. The spacing is the affine's (``voxel_spacing``)."""
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return [f"{what} is a {type(img).__name__}, not NIfTI"]
    shape = tuple(int(n) for n in img.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        return [f"{what} must be 3D, got shape {shape}"]
    if min(shape[:3]) < 2:
        return [f"{what} has a degenerate shape {shape}"]
    size = image_bytes(img)
    if size > max_image_mb * 2**20:
        return [
            f"{what} header claims {shape} voxels of {img.header.get_data_dtype()}, "
            f"{size / 2**20:,.0f} MiB, over the {max_image_mb:g} MiB limit (refused before "
            "reading it; raise preprocess.max_image_mb if the image is real)"
        ]
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        # nibabel then falls back to a diagonal affine (and turns a zero pixdim into 1 mm):
        # the orientation is a guess, and left and right could be swapped.
        return [
            f"{what} header has no orientation (qform and sform codes are 0): left and right "
            "cannot be told apart; re-export it from DICOM"
        ]
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        return [f"{what} has a singular or non-finite affine (NaN or infinite entries)"]
    zooms = voxel_spacing(img)
    if np.any(zooms < MIN_SPACING_MM) or np.any(zooms > MAX_SPACING_MM):
        return [
            f"{what} has implausible voxel spacing {_mm(zooms)} mm "
            f"(accepted {MIN_SPACING_MM}-{MAX_SPACING_MM} mm)"
        ]
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        return [f"{what} has a singular or non-finite affine"]
    shear = shear_deg(affine)
    if shear > MAX_SHEAR_DEG:
        return [
            f"{what} affine is sheared: its voxel axes are {shear:.3g} degrees from "
            f"perpendicular (at most {MAX_SHEAR_DEG} accepted; ANTs cannot represent a "
            "sheared grid); resample it onto a grid with perpendicular axes (oblique is fine)"
        ]
    pixdim = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.allclose(pixdim, zooms, rtol=PIXDIM_RTOL, atol=1e-4):
        return [
            f"{what} header is inconsistent: pixdim spacing {_mm(pixdim)} mm but the affine "
            f"(sform/qform) gives {_mm(zooms)} mm; fix the header (e.g. re-export from DICOM) "
            "so both agree"
        ]
    return []


def open_nifti(
    path: str | os.PathLike,
    study_id: str = "?",
    what: str = "image",
    max_image_mb: float = MAX_IMAGE_MB,
) -> nib.Nifti1Image:
    """The header-checked image at ``path``, its voxels not read yet (``header_problems``):
    a caller that must also check the grid (a label against its T1c) does so before a single
    voxel is decompressed. Raises ``StudyError`` naming the study and file."""
    path = Path(path)
    if not path.exists():
        raise StudyError(study_id, f"{what} file is missing", path)
    if not path.is_file():
        raise StudyError(study_id, f"{what} path is not a regular file", path)
    if not os.access(path, os.R_OK):
        raise StudyError(study_id, f"{what} file is not readable (permissions)", path)
    try:
        img = nib.load(str(path))
    except PermissionError as exc:  # os.access can pass where open() is refused (ACLs, NFS)
        raise StudyError(study_id, f"{what} file is not readable (permissions)", path) from exc
    except Exception as exc:  # nibabel raises several types for a non-NIfTI file
        raise StudyError(study_id, f"{what} is not a readable NIfTI file: {exc}", path) from exc
    problems = header_problems(img, what, max_image_mb)
    if problems:
        raise StudyError(study_id, "; ".join(problems), path)
    if len(img.shape) == 4:  # a trailing singleton 4th axis (header_problems allows only that)
        img = img.slicer[..., 0]
    return img


def read_voxels(
    img: nib.spatialimages.SpatialImage, path: str | os.PathLike, study_id: str, what: str
) -> np.ndarray:
    """The voxels of ``img`` (from ``open_nifti``, header already checked), checked finite;
    ``StudyError`` naming the study and file when they cannot be read (a truncated gzip
    stream fails here, not at ``nib.load``)."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise StudyError(study_id, f"{what} data cannot be read (truncated?): {exc}", path) from exc
    # Integers are finite by type: the check is skipped for them (1 mm label: 1 ms and a
    # full-size temporary).
    if data.dtype.kind not in "uib" and not np.all(np.isfinite(data)):
        raise StudyError(study_id, f"{what} contains NaN or infinite voxels", path)
    return data


def load_nifti(
    path: str | os.PathLike,
    study_id: str = "?",
    what: str = "image",
    require_signal: bool = False,
    max_image_mb: float = MAX_IMAGE_MB,
) -> nib.Nifti1Image:
    """Load a 3D NIfTI and check it; raise ``StudyError`` naming the study and file.

    Checks: the file exists and is readable, then its header (``header_problems``: NIfTI, 3D
    with a trailing singleton 4th axis dropped, not over ``max_image_mb`` before any voxel is
    decompressed, oriented, finite affine with plausible spacing that pixdim agrees with), then
    the voxels are finite. ``require_signal``
    (MR sequences, not labels: an empty label is a valid "no lesion") also refuses an image
    whose voxels are all the same value, e.g. an all-zero export of a failed reconstruction.
    """
    path = Path(path)
    img = open_nifti(path, study_id, what, max_image_mb)
    data = read_voxels(img, path, study_id, what)
    if require_signal and data.min() == data.max():
        raise StudyError(
            study_id, f"{what} has no signal: every voxel is {data.flat[0].item()!r}", path
        )
    # Return an image whose data is already in memory so the file is read once.
    return nib.Nifti1Image(data, img.affine, header=img.header)


def plain(obj: Any) -> Any:
    """Convert ``obj`` to the plain types that ``torch.load(weights_only=True)`` and JSON
    accept (a settings dataclass becomes its dict form): checkpoint metadata, settings checked
    against their schema (``metsflow.core.config.section_problems``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return str(obj)
    # Subclasses (torch's TorchVersion is a str) are not on the safe loader's allow-list.
    for kind in (bool, int, float, str):
        if isinstance(obj, kind):
            return kind(obj)
    if obj is None:
        return None
    raise TypeError(f"metadata must be plain data, got {type(obj).__name__}")
