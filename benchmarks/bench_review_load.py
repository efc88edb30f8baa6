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
import shutil
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
SELECTION_NAME = "selection.tsv"
# A server start (imports, app, each worker) took over 60 s at nice 19 on the 2-core machine
# beside a 2-core training job.
START_TIMEOUT_S = 600
STARTED_LINE = b"Application startup complete"  # uvicorn logs it once per worker process


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


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc): with ``--workers`` > 1 the server is a
    supervisor and its worker processes, and the saves' CPU is the workers'."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pending += [int(child) for child in task.read_text().split()]
    return found


def _own_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds so far of ``pid`` and of each of its descendants."""
    return {p: _own_cpu_seconds(p) for p in _process_tree(pid)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and its descendants (Linux /proc;
    NaN elsewhere)."""
    if not Path(f"/proc/{pid}").is_dir():
        return float("nan")
    return sum(_own_cpu_seconds(p) for p in _process_tree(pid))


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, all cores (Linux /proc/stat):
    whether a burst left cores idle that a one-process server could not use."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, idle / tick


class CpuSampler:
    """Samples the server's CPU seconds every ``every_s`` in a thread: its busiest window
    (cores, ``window_s`` long) and the machine's idle cores over the same span."""

    def __init__(self, pid: int, every_s: float = 0.25, window_s: float = 1.0):
        self.pid, self.every_s, self.window_s = pid, every_s, window_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), cpu_seconds(self.pid)))
            self._stop.wait(self.every_s)

    def start(self) -> None:
        self._machine = machine_busy_seconds()
        self._began = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self.machine_idle_cores = self.machine_busy_cores = float("nan")
        if not self._thread.is_alive():  # never started: a client failed before the start line
            return
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), cpu_seconds(self.pid)))
        wall = time.monotonic() - self._began
        busy, idle = machine_busy_seconds()
        self.machine_idle_cores = (idle - self._machine[1]) / wall
        self.machine_busy_cores = (busy - self._machine[0]) / wall

    def mean_cores(self) -> float:
        if len(self.samples) < 2:
            return float("nan")
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9)

    def peak_cores(self) -> float:
        """The most cores used over any ``window_s`` (NaN when the saves took less)."""
        rates = []
        for i, (t0, c0) in enumerate(self.samples):
            for t1, c1 in self.samples[i + 1 :]:
                if t1 - t0 >= self.window_s:
                    rates.append((c1 - c0) / (t1 - t0))
                    break
        return max(rates, default=float("nan"))


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
def running_server(
    results: Path, labels: Path, port: int, workers: int = 1
) -> Iterator[tuple[str, int]]:
    """``metsflow review serve --workers N`` in a subprocess; yields its base URL and process
    id, stops it at the end."""
    import httpx

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "metsflow.cli", "review", "serve", "--results", str(results)]
    cmd += ["--labels", str(labels), "--sheet", "", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    answered = httpx.get(url + "/login", timeout=2).status_code in (200, 500)
                except httpx.HTTPError:
                    answered = False
                # Every worker up, not only the first: a burst on one of two workers would
                # measure one. (pread: the server shares the file's offset.)
                logged = os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0)
                if answered and logged.count(STARTED_LINE) >= workers:
                    break
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
    workers: int = 1,
    batch: Path | None = None,
) -> dict:
    """Run the load test in ``workdir``; returns the figures (also what ``main`` prints).

    ``cheap_passwords`` (for the fast test): hash the accounts with minimal argon2 parameters
    (logins then take ~1 ms instead of ~0.5 s each; the server verifies with the parameters
    stored in each hash) and write the synthetic inputs without fsync. Neither is part of a
    save, so the save figures do not change. ``batch``: a folder written by ``prepare_batch``
    with these settings, copied instead of writing the batch again (alternating arms)."""
    from argon2 import PasswordHasher

    from metsflow.review_server import db
    from metsflow.review_server.assign import auto_assign
    from metsflow.review_server.config import ReviewConfig
    from metsflow.review_server.service import ReviewApp

    results, labels = workdir / "results", workdir / "labels"
    dims = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    big = int(np.prod(dims)) > 1_000_000
    if batch is None:
        selection = write_review_batch(
            results,
            studies,
            dims,
            sequences=sequences,
            durable=not cheap_passwords,
            smooth_images=big,
        )
    else:
        shutil.copytree(batch / "results", results)
        selection = pd.read_csv(batch / SELECTION_NAME, sep="\t", dtype=str)
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
    with running_server(results, labels, free_port(), workers) as (url, pid):
        # The server's CPU is read when every trainee has logged in (argon2 is not a save's).
        at_start, sampled = {}, CpuSampler(pid)

        def started() -> None:
            at_start.update(cpu=cpu_seconds(pid), by_process=cpu_by_process(pid))
            sampled.start()

        start = threading.Barrier(len(trainees), action=started, timeout=BARRIER_TIMEOUT_S)
        refine_wall = _run_threads((_trainee, (url, n, dims, refine, start)) for n in trainees)
        sampled.stop()
        cpu_saves = wait_idle(pid) - at_start.get("cpu", float("nan"))
        # How the saves' CPU fell on the server's processes (the workers take connections as
        # they come; a reviewer's keep-alive connection stays with its worker).
        by_process = cpu_by_process(pid)
        spread = sorted(
            (
                round(cpu - at_start.get("by_process", {}).get(p, 0.0), 2)
                for p, cpu in by_process.items()
            ),
            reverse=True,
        )
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
        "workers": workers,
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
        "server_cpu_s_by_process": spread,
        "refine_wall_s": round(refine_wall, 2),
        # Cores the server used during the saves (from the start line until the last answer):
        # its busiest second, and the machine's idle cores meanwhile (one process tops out
        # near 1 core, the GIL, whatever is idle).
        "server_cores_mean": round(sampled.mean_cores(), 2),
        "server_cores_peak_1s": round(sampled.peak_cores(), 2),
        "machine_idle_cores": round(sampled.machine_idle_cores, 2),
        "confirm_wall_s": round(confirm_wall, 2),
    }
    return figures


def prepare_batch(
    folder: Path, studies: int, shape: tuple[int, int, int], sequences: tuple[str, ...]
) -> Path:
    """Write the review batch once into ``folder`` (``results/`` and the selection) for
    ``run(..., batch=folder)`` to copy: the 1 mm batch takes minutes to write."""
    selection = write_review_batch(
        folder / "results",
        studies,
        shape,
        sequences=sequences,
        smooth_images=int(np.prod(shape)) > 1_000_000,
    )
    selection.to_csv(folder / SELECTION_NAME, sep="\t", index=False)
    return folder


def _summary(runs: list[dict]) -> list[str]:
    """One line per arm (worker count): the runs' save p50/p95, CPU per save, and their sums
    of lost saves, 5xx and studies without exactly one confirmed version."""
    lines = [
        "workers  runs  save p50 ms          save p95 ms          CPU ms/save        "
        "cores peak  lost  5xx  not-one-confirmed"
    ]
    for arm in sorted({r["workers"] for r in runs}):
        mine = [r for r in runs if r["workers"] == arm]
        spread = {
            key: " ".join(f"{r[key]:.{digits}f}" for r in mine)
            for key, digits in (
                ("save_p50_ms", 0),
                ("save_p95_ms", 0),
                ("server_cpu_ms_per_save", 0),
                ("server_cores_peak_1s", 2),
            )
        }
        lines.append(
            f"{arm:>7}  {len(mine):>4}  {spread['save_p50_ms']:<19}  "
            f"{spread['save_p95_ms']:<19}  {spread['server_cpu_ms_per_save']:<17}  "
            f"{spread['server_cores_peak_1s']:<10}  "
            f"{sum(r['lost_saves'] for r in mine):>4}  "
            f"{sum(r['server_errors_5xx'] for r in mine):>3}  "
            f"{sum(r['studies'] - r['studies_with_one_confirmed'] for r in mine):>3}"
        )
    return lines


def _failed(figures: dict) -> bool:
    return bool(
        figures["lost_saves"]
        or figures["server_errors_5xx"]
        or figures["client_errors"]
        or figures["studies_with_one_confirmed"] != figures["studies"]
        or figures["saves_ok"] != figures["studies"]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviewers", type=int, default=20)
    parser.add_argument("--neuroradiologists", type=int, default=4)
    parser.add_argument("--studies", type=int, default=150)
    parser.add_argument("--shape", type=int, default=24, help="voxels per axis of each study")
    parser.add_argument(
        "--clinical", action="store_true", help="1 mm 240x240x155 studies, four sequences"
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="server worker processes (review serve --workers); a list such as 1,2 runs each "
        "arm in turn on one written batch, --repeats times, alternating the order",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per --workers arm")
    parser.add_argument("--workdir", help="default: a temporary folder, removed afterwards")
    args = parser.parse_args(argv)
    arms = [int(w) for w in args.workers.split(",")]
    shape, sequences = (args.shape,) * 3, ("t1c", "flair")
    if args.clinical:
        shape, sequences = CLINICAL_SHAPE, ("t1c", "t1", "t2", "flair")
    runs = []
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        batch = prepare_batch(workdir / "batch", args.studies, shape, sequences)
        for repeat in range(args.repeats):
            # Alternating order (1,2,3 then 3,2,1): a drift in the machine's load over the
            # runs falls on every arm alike.
            for workers in arms if repeat % 2 == 0 else arms[::-1]:
                folder = workdir / f"run{repeat}_workers{workers}"
                load = os.getloadavg()[0]
                figures = run(
                    folder,
                    args.reviewers,
                    args.neuroradiologists,
                    args.studies,
                    shape,
                    sequences=sequences,
                    workers=workers,
                    batch=batch,
                )
                figures["load_before"] = round(load, 2)
                figures["load_after"] = round(os.getloadavg()[0], 2)
                shutil.rmtree(folder)
                runs.append(figures)
                print(f"# run {len(runs)}, {workers} worker(s)", flush=True)
                for key, value in figures.items():
                    print(f"{key}: {value}", flush=True)
    if len(runs) > 1:
        print("\n".join(_summary(runs)))
    return 1 if any(_failed(f) for f in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
