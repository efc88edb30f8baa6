"""Figures behind issue 25's guards: the memory guard's default against the known gzip bomb, and
the parse-time header read of the oracle labels.

1. The bomb: an 881 KB ``.nii.gz`` whose header claims 768^3 int16 (864 MiB) of zeros, loaded
   with ``metsflow.core.io.load_nifti`` in a fresh process per limit: refused from the header
   under the 512 MiB default, read in full (peak RSS ~1.8 GB) under the former 1,024 MiB.
2. The oracle: ``metsflow.cohort.preflight.read_oracle`` over N distinct label files of a 1 mm
   brain grid (240 x 240 x 155 uint8), each file's NIfTI signature read once: the cost the
   workflow's parse pays per oracle label (nibabel's full header check was ~5 ms a label).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/bench_reliability.py --labels 200
"""

from __future__ import annotations

import argparse
import gzip
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


def write_bomb(path: Path) -> Path:
    """768^3 int16 zeros, streamed through gzip (never in memory)."""
    header = nib.Nifti1Header()
    header.set_data_shape((768, 768, 768))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    zeros = b"\0" * (1 << 24)
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(header.binaryblock + b"\0" * 4)
        for _ in range(864 * 2**20 // len(zeros)):
            handle.write(zeros)
    return path


def load_once(path: str, limit: float) -> None:
    """Child process: one load under ``limit`` MiB; prints outcome, seconds and peak RSS."""
    from metsflow.core import io

    start = time.perf_counter()
    try:
        io.load_nifti(path, "S1", "t1c", max_image_mb=limit)
        outcome = "read in full"
    except io.StudyError as exc:
        outcome = "refused from its header" if "limit" in exc.problem else exc.problem
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"  limit {limit:>5g} MiB: {outcome}; {time.perf_counter() - start:.2f} s, "
        f"peak RSS {peak:,.0f} MiB"
    )


def oracle_parse(folder: Path, n: int) -> None:
    from metsflow.cohort.preflight import read_oracle
    from metsflow.core import io

    data = np.zeros((240, 240, 155), np.uint8)
    data[100:120, 100:120, 70:80] = 1
    rows = []
    for k in range(n):
        io.save_nifti(folder / f"l{k}.nii.gz", data, np.eye(4), dtype=np.uint8)
        rows.append((f"S{k}", f"l{k}.nii.gz"))
    pd.DataFrame(rows, columns=["study_id", "label"]).to_csv(
        folder / "oracle.tsv", sep="\t", index=False
    )
    start = time.perf_counter()
    oracle, problems = read_oracle(folder / "oracle.tsv")
    seconds = time.perf_counter() - start
    assert len(oracle) == n and not problems
    print(
        f"oracle: {n} labels, signature-checked at parse time in {seconds:.2f} s "
        f"({1000 * seconds / n:.2f} ms a label; 11,892 labels: ~{11_892 * seconds / n:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=200)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        load_once(args.child[0], float(args.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        bomb = write_bomb(Path(tmp) / "bomb.nii.gz")
        print(f"bomb: {bomb.stat().st_size / 1e3:,.0f} KB on disk, header claims 864 MiB")
        for limit in (512, 1024):
            subprocess.run([sys.executable, __file__, "--child", str(bomb), str(limit)], check=True)
        oracle_parse(Path(tmp), args.labels)


if __name__ == "__main__":
    main()
