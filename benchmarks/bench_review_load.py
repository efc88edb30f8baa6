"""Load test of the review server: many reviewers saving a whole batch at once.

Starts a real server (``metsflow review serve``, uvicorn, in a subprocess on a free port of
127.0.0.1) over a synthetic review batch, creates ``--reviewers`` trainee accounts and
``--neuroradiologists`` neuroradiologist accounts, assigns the batch (balanced, whole patients
together), then:

1. every trainee, in its own thread, logs in and saves a refined label for each study of its
   queue (open -> save, as the browser does), all trainees at once;
2. every neuroradiologist tries to confirm *every* study at the same moment -- a deliberate race
   on each study: exactly one confirmation per study may win, the others must get 409.

It prints reviewers, saves attempted, saves accounted for (versions found in the label store
with that reviewer), lost saves (a 200 whose version is not in the store), 409s, 5xx, the
p50/p95 save latency and the server's CPU time per save (from the saves' start until the
server is idle again, so the work a save defers, its edit summary, is counted in; Linux
/proc), and exits non-zero if a save was lost, a 5xx came back, or a study ended with other
than one confirmed version. Bounded: every request has a timeout and the server is stopped at
the end. On a shared machine the latencies depend on the load; the CPU per save does not.

    python benchmarks/bench_review_load.py --reviewers 20 --studies 150 --shape 24
    python benchmarks/bench_review_load.py --reviewers 20 --studies 40 --clinical

``--clinical``: 1 mm studies of 240 x 240 x 155 voxels with four sequences (T1c, T1, T2,
FLAIR), the size the review editor must handle; the images are smooth int16 ramps (their
content plays no part in a save, and random floats would make writing the batch take minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from metsflow.active_learning.labelstore import LabelStore
from metsflow.active_learning.review import export_batch
from metsflow.core import io

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "load-test-password"
AFFINE = np.diag([1.0, 1.0, 1.2, 1.0])
CLINICAL_SHAPE = (240, 240, 155)  # a 1 mm brain MRI (BraTS grid)
# A client that failed before the start line (a refused login) must not leave the others
# waiting for it forever: they give up and report it.
BARRIER_TIMEOUT_S = 600


# ---------------------------------------------------------------------- synthetic batch


def presegmentation(shape: tuple[int, int, int]) -> np.ndarray:
    """Two lesions: a large one (edema around an enhancing core) and a 2x2x2 one."""
    data = np.zeros(shape, dtype=np.uint8)
    n = min(shape)
    a, b = max(1, n // 6), max(3, n // 2)
    data[a:b, a:b, a:b] = 2
    data[a + 1 : b - 1, a + 1 : b - 1, a + 1 : b - 1] = 1
    data[n - 3 : n - 1, n - 3 : n - 1, n - 3 : n - 1] = 1
    return data


def write_review_batch(
    results: Path,
    n_studies: int,
    shape: int | tuple[int, int, int] = 24,
    round_index: int = 1,
    patient_sizes: tuple[int, ...] = (3, 1, 2),
    sequences: tuple[str, ...] = ("t1c", "flair"),
    seed: int = 0,
    durable: bool = True,
    smooth_images: bool = False,
) -> pd.DataFrame:
    """A review package as ``export_batch`` writes it for round ``round_index`` under
    ``results``: ``n_studies`` studies of ``shape`` voxels, patients of ``patient_sizes``
    studies in turn. Returns the selection (study_id, patient_id).

    ``durable=False`` skips fsync while writing these throwaway inputs (fsync was 70% of the
    time: 8 ms per file on the 2-core development machine); what the server writes later
    (label store, database) is not affected."""
    if not durable:
        with _no_fsync():
            return write_review_batch(
                results,
                n_studies,
                shape,
                round_index,
                patient_sizes,
                sequences,
                seed,
                smooth_images=smooth_images,
            )
    shape = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    rng = np.random.default_rng(seed)
    native = Path(results) / "native"
    rows, patient, left = [], 0, 0
    for index in range(n_studies):
        if left == 0:
            patient += 1
            left = patient_sizes[(patient - 1) % len(patient_sizes)]
        left -= 1
        rows.append({"study_id": f"S{index + 1:04d}", "patient_id": f"P{patient:03d}"})
    selection = pd.DataFrame(rows)
    images, presegs = {}, {}
    for study_id in selection["study_id"]:
        folder = native / study_id
        images[study_id] = {}
        for sequence in sequences:
            path = folder / f"{sequence}.nii.gz"
            if smooth_images:
                ramp = np.add.outer(
                    np.add.outer(np.arange(shape[0]), np.arange(shape[1])), np.arange(shape[2])
                )
                io.save_nifti(path, ramp, AFFINE, dtype=np.int16)
            else:
                io.save_nifti(path, rng.random(shape), AFFINE, dtype=np.float32)
            images[study_id][sequence] = path
        presegs[study_id] = folder / "pred_native.nii.gz"
        io.save_nifti(presegs[study_id], presegmentation(shape), AFFINE, dtype=np.uint8)
    model = f"{results}/rounds/round_{round_index - 1}/model/model.pt"
    out = Path(results) / "rounds" / f"round_{round_index}" / "review"
    export_batch(selection, images, presegs, out, round_index, model)
    return selection


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def label_bytes(shape: tuple[int, int, int], value: int = 1, compress: bool = True) -> bytes:
    """A corrected label (the pre-segmentation with one extra blob) as NIfTI bytes, as the
    editor sends it: uint8 with the T1c's header (sform and qform coded, as ``io.save_nifti``
    wrote the T1c), gzip-compressed."""
    data = presegmentation(shape)
    data[0:2, 0:2, 0:2] = value
    image = nib.Nifti1Image(data, AFFINE)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1) if compress else raw


# ---------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, quiet_s: float = 1.0, timeout_s: float = 300.0) -> float:
    """Wait until process ``pid`` used under 2% of a core for ``quiet_s``; its CPU seconds."""
    deadline = time.monotonic() + timeout_s
    used = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = cpu_seconds(pid)
        if not now - used > 0.02 * quiet_s:  # NaN (no /proc) ends the wait too
            return now
        used = now
    return used


@contextlib.contextmanager
def running_server(results: Path, labels: Path, port: int) -> Iterator[tuple[str, int]]:
    """``metsflow review serve`` in a subprocess; yields its base URL and process id, stops it
    at the end."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "metsflow.cli", "review", "serve", "--results", str(results)]
    cmd += ["--labels", str(labels), "--sheet", "", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(url + "/login", timeout=2).status_code in (200, 500):
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start:\n{log.read().decode()[-3000:]}")
                time.sleep(0.2)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------- clients


def _login(url: str, username: str):
    import httpx

    # The server refuses a POST without its own Origin (login CSRF): send it, as a browser does.
    client = httpx.Client(base_url=url, timeout=60, headers={"Origin": url})
    answer = client.post("/api/login", json={"username": username, "password": PASSWORD})
    answer.raise_for_status()
    client.headers["X-CSRF-Token"] = answer.json()["csrf_token"]
    return client


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.status: dict[int, int] = {}
        self.saved: list[tuple[str, int, str]] = []  # (study, version, reviewer) of each 200
        self.errors: list[str] = []

    def record(self, status: int, seconds: float, saved=None) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.status[status] = self.status.get(status, 0) + 1
            if saved is not None:
                self.saved.append(saved)


def _trainee(url: str, username: str, shape, tally: Tally, start: threading.Barrier) -> None:
    try:
        client = _login(url, username)
        body = label_bytes(shape)
        queue = client.get("/api/queue").json()["items"]
        start.wait()
        for item in queue:
            study_id = item["study_id"]
            client.post(f"/api/studies/{study_id}/open", json={})
            began = time.perf_counter()
            answer = client.post(
                f"/api/studies/{study_id}/save",
                params={"base_version": item["latest_version"]},
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
            saved = (
                (study_id, answer.json()["version"], username)
                if answer.status_code == 200
                else None
            )
            tally.record(answer.status_code, time.perf_counter() - began, saved)
    except Exception as exc:  # reported, never hidden
        tally.errors.append(f"{username}: {exc!r}")


def _neuroradiologist(url: str, username: str, studies, tally: Tally, start) -> None:
    try:
        client = _login(url, username)
        start.wait()
        for study_id in studies:
            began = time.perf_counter()
            answer = client.post(f"/api/studies/{study_id}/confirm", json={"base_version": 1})
            saved = (
                (study_id, answer.json()["version"], username)
                if answer.status_code == 200
                else None
            )
            tally.record(answer.status_code, time.perf_counter() - began, saved)
    except Exception as exc:
        tally.errors.append(f"{username}: {exc!r}")


def _run_threads(targets) -> float:
    threads = [threading.Thread(target=t, args=a, daemon=True) for t, a in targets]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return time.perf_counter() - began


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(
    workdir: Path,
    reviewers: int = 20,
    neuroradiologists: int = 4,
    studies: int = 150,
    shape: int | tuple[int, int, int] = 24,
    cheap_passwords: bool = False,
    sequences: tuple[str, ...] = ("t1c", "flair"),
) -> dict:
    """Run the load test in ``workdir``; returns the figures (also what ``main`` prints).

    ``cheap_passwords`` (for the fast test): hash the accounts with minimal argon2 parameters
    (logins then take ~1 ms instead of ~0.5 s each; the server verifies with the parameters
    stored in each hash) and write the synthetic inputs without fsync. Neither is part of a
    save, so the save figures do not change."""
    from argon2 import PasswordHasher

    from metsflow.review_server import db
    from metsflow.review_server.assign import auto_assign
    from metsflow.review_server.config import ReviewConfig
    from metsflow.review_server.service import ReviewApp

    results, labels = workdir / "results", workdir / "labels"
    dims = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    big = int(np.prod(dims)) > 1_000_000
    selection = write_review_batch(
        results,
        studies,
        dims,
        sequences=sequences,
        durable=not cheap_passwords,
        smooth_images=big,
    )
    config = ReviewConfig(results=results, label_store=labels)
    trainees = [f"trainee{i:02d}" for i in range(reviewers)]
    neurorads = [f"neurorad{i}" for i in range(neuroradiologists)]
    hasher = db._HASHER
    if cheap_passwords:
        db._HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    try:
        for name in trainees:
            db.add_user(config.db_path, name, PASSWORD, "trainee")
        for name in neurorads:
            db.add_user(config.db_path, name, PASSWORD, "neuroradiologist")
    finally:
        db._HASHER = hasher
    auto_assign(ReviewApp(config), "bench")

    refine, confirm = Tally(), Tally()
    with running_server(results, labels, free_port()) as (url, pid):
        # The server's CPU is read when every trainee has logged in (argon2 is not a save's).
        at_start = {}
        start = threading.Barrier(
            len(trainees),
            action=lambda: at_start.update(cpu=cpu_seconds(pid)),
            timeout=BARRIER_TIMEOUT_S,
        )
        refine_wall = _run_threads((_trainee, (url, n, dims, refine, start)) for n in trainees)
        cpu_saves = wait_idle(pid) - at_start.get("cpu", float("nan"))
        start = threading.Barrier(len(neurorads), timeout=BARRIER_TIMEOUT_S)
        ids = list(selection["study_id"])
        confirm_wall = _run_threads(
            (_neuroradiologist, (url, n, ids, confirm, start)) for n in neurorads
        )

    store = LabelStore(labels, create=False)
    stored = {
        (study_id, v["version"]): v["stage"]
        for study_id in selection["study_id"]
        for v in store.versions(study_id)
    }
    reviewer_of = {
        (r["study_id"], r["version"]): r["reviewer"]
        for study_id in selection["study_id"]
        for r in store.history(study_id)
    }
    accounted = [s for s in refine.saved + confirm.saved if reviewer_of.get(s[:2]) == s[2]]
    confirmed_per_study = [
        sum(1 for v in store.versions(s) if v["stage"] == "confirmed")
        for s in selection["study_id"]
    ]
    figures = {
        "reviewers": len(trainees),
        "neuroradiologists": len(neurorads),
        "studies": studies,
        "shape": "x".join(str(n) for n in dims),
        "sequences": ",".join(sequences),
        "saves_attempted": sum(refine.status.values()),
        "saves_ok": refine.status.get(200, 0),
        "confirms_attempted": sum(confirm.status.values()),
        "confirms_ok": confirm.status.get(200, 0),
        "versions_in_store": len(stored),
        "saves_accounted": len(accounted),
        "lost_saves": len(refine.saved) + len(confirm.saved) - len(accounted),
        "conflicts_409": refine.status.get(409, 0) + confirm.status.get(409, 0),
        "server_errors_5xx": sum(
            n for tally in (refine, confirm) for s, n in tally.status.items() if s >= 500
        ),
        "client_errors": refine.errors + confirm.errors,
        "studies_with_one_confirmed": sum(1 for n in confirmed_per_study if n == 1),
        "save_p50_ms": round(1000 * _percentile(refine.latencies, 50), 1),
        "save_p95_ms": round(1000 * _percentile(refine.latencies, 95), 1),
        "confirm_p50_ms": round(1000 * _percentile(confirm.latencies, 50), 1),
        "confirm_p95_ms": round(1000 * _percentile(confirm.latencies, 95), 1),
        "server_cpu_ms_per_save": round(1000 * cpu_saves / max(1, sum(refine.status.values())), 1),
        "refine_wall_s": round(refine_wall, 2),
        "confirm_wall_s": round(confirm_wall, 2),
    }
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviewers", type=int, default=20)
    parser.add_argument("--neuroradiologists", type=int, default=4)
    parser.add_argument("--studies", type=int, default=150)
    parser.add_argument("--shape", type=int, default=24, help="voxels per axis of each study")
    parser.add_argument(
        "--clinical", action="store_true", help="1 mm 240x240x155 studies, four sequences"
    )
    parser.add_argument("--workdir", help="default: a temporary folder, removed afterwards")
    args = parser.parse_args(argv)
    shape, sequences = args.shape, ("t1c", "flair")
    if args.clinical:
        shape, sequences = CLINICAL_SHAPE, ("t1c", "t1", "t2", "flair")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        figures = run(
            Path(workdir),
            args.reviewers,
            args.neuroradiologists,
            args.studies,
            shape,
            sequences=sequences,
        )
    for key, value in figures.items():
        print(f"{key}: {value}")
    bad = (
        figures["lost_saves"]
        or figures["server_errors_5xx"]
        or figures["client_errors"]
        or figures["studies_with_one_confirmed"] != figures["studies"]
        or figures["saves_ok"] != figures["studies"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
