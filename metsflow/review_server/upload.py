"""Label uploads: bounded before a byte is kept, and header-checked before a voxel is read.

Upload size is bounded before reading: ``Content-Length`` and the streamed byte count are
checked against the reference volume's size (4 bytes per voxel + header margin) -> 413; the
NIfTI header's dimensions are checked against the reference before any voxel is read, so a
small gzip cannot inflate into an unbounded array. The body goes to a private temporary file
(never to a path a request names); the label store's ``import_label`` then checks the grid,
the values and writes the provenance.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import nibabel as nib
from starlette.requests import Request

from metsflow.core.io import remove_path
from metsflow.review_server.service import HTTPError

# A label upload may use up to 4 bytes per voxel (float32/int32) plus the header and any
# extensions; NIfTI-2's header is 540 bytes, 64 KiB leaves room for extensions.
MAX_BYTES_PER_VOXEL = 4
HEADER_MARGIN = 64 * 1024


@lru_cache(maxsize=1024)
def reference_shape(path: str, mtime: int) -> tuple[int, ...]:
    return tuple(int(n) for n in nib.load(path).header.get_data_shape()[:3])


def upload_limit(reference: Path) -> tuple[tuple[int, ...], int]:
    try:
        shape = reference_shape(str(reference), reference.stat().st_mtime_ns)
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise HTTPError(500, f"reference image unreadable: {exc}") from exc
    voxels = 1
    for n in shape:
        voxels *= n
    return shape, voxels * MAX_BYTES_PER_VOXEL + HEADER_MARGIN


def header_problem(head: bytes, shape: tuple[int, ...]) -> str | None:
    """Check the first bytes of the (decompressed) upload: a NIfTI-1/2 header whose 3D
    dimensions equal the reference's. None if fine, else the problem in words."""
    if len(head) < 348:
        return "not a NIfTI file (shorter than a NIfTI header)"
    for endian in ("<", ">"):
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            magic = head[344:348]
            if magic not in (b"n+1\x00", b"ni1\x00"):
                return "not a NIfTI file (no NIfTI-1 magic)"
            break
        if size == 540:
            if len(head) < 540:
                return "not a NIfTI file (truncated NIfTI-2 header)"
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            break
    else:
        return "not a NIfTI file (no NIfTI-1/2 header)"
    ndim = dims[0]
    if not 3 <= ndim <= 7 or any(d != 1 for d in dims[4 : ndim + 1]):
        return f"label must be a 3D volume, got {ndim} dimensions {tuple(dims[1 : ndim + 1])}"
    got = tuple(int(d) for d in dims[1:4])
    if got != tuple(shape):
        return f"grid mismatch: label shape {got} != reference (native T1c) shape {tuple(shape)}"
    if bitpix > 8 * MAX_BYTES_PER_VOXEL:
        return f"label voxels of {bitpix} bits: use an integer or float type of at most 32 bits"
    return None


async def receive_upload(request: Request, shape: tuple[int, ...], limit: int) -> Path:
    """Stream the body into a private temporary NIfTI file, refusing more than ``limit``
    bytes (413) and anything whose header is not a NIfTI of the reference's shape (400)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise HTTPError(
            413,
            f"upload of {int(length)} bytes is larger than a label of this study can be "
            f"({limit} bytes for shape {tuple(shape)})",
        )
    fd, name = tempfile.mkstemp(prefix="metsflow-upload-", suffix=".part")
    path = Path(name)
    received = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise HTTPError(
                        413,
                        f"upload larger than a label of this study can be ({limit} bytes "
                        f"for shape {tuple(shape)})",
                    )
                handle.write(chunk)
        if received == 0:
            raise HTTPError(400, "empty body: send the label volume as NIfTI bytes")
        with open(path, "rb") as handle:
            magic = handle.read(2)
        compressed = magic == b"\x1f\x8b"
        try:
            if compressed:
                with gzip.open(path, "rb") as handle:
                    head = handle.read(540)
            else:
                with open(path, "rb") as handle:
                    head = handle.read(540)
        except (OSError, EOFError) as exc:
            raise HTTPError(400, f"not a NIfTI file (broken gzip stream: {exc})") from exc
        problem = header_problem(head, shape)
        if problem:
            raise HTTPError(400, problem)
        final = path.with_name(path.name[: -len(".part")] + (".nii.gz" if compressed else ".nii"))
        os.rename(path, final)
        return final
    except BaseException:
        remove_path(path)
        raise
