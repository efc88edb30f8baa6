"""Label store under concurrency: the per-study lock, optimistic versioning, extra provenance."""

import multiprocessing as mp
import time

import numpy as np
import pytest

from metsflow.active_learning.labelstore import (
    LabelImportError,
    LabelStore,
    StaleLabelError,
)
from metsflow.core import io

AFFINE = np.diag([1.0, 1.0, 1.2, 1.0])
SHAPE = (8, 8, 6)


def _write(path, value=1):
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:5, 2:5, 1:4] = value
    io.save_nifti(path, data, AFFINE, dtype=np.uint8)
    return path


@pytest.fixture
def setup(tmp_path):
    reference = tmp_path / "t1c.nii.gz"
    io.save_nifti(reference, np.random.default_rng(0).random(SHAPE), AFFINE, dtype=np.float32)
    return tmp_path, reference


def _confirm(args):
    root, label, reference, reviewer, start = args
    # Widen the window between "no confirmed label yet" and the link: without the lock every
    # process passes the check before any links (checked: 5 of 6 processes then confirm).
    real_next = LabelStore._next_version

    def slow_next(self, folder):
        time.sleep(0.15)
        return real_next(self, folder)

    LabelStore._next_version = slow_next  # in this forked worker only
    start.wait()
    try:
        return LabelStore(root).import_label("S1", label, "confirmed", reviewer, reference)
    except LabelImportError as exc:
        return exc.problem


def test_concurrent_confirmations_in_processes_give_exactly_one_confirmed_version(setup):
    tmp_path, reference = setup
    root = tmp_path / "labels"
    LabelStore(root).import_label("S1", _write(tmp_path / "r.nii.gz"), "refined", "T", reference)
    labels = [_write(tmp_path / f"c{i}.nii.gz", value=1 + i % 3) for i in range(6)]
    context = mp.get_context("fork")
    with context.Manager() as manager:
        start = manager.Event()
        with context.Pool(6) as pool:
            pending = pool.map_async(
                _confirm, [(root, p, reference, f"Dr {i}", start) for i, p in enumerate(labels)]
            )
            start.set()  # all six processes pass the barrier at the same moment
            results = pending.get(timeout=60)
    store = LabelStore(root)
    confirmed = [v for v in store.versions("S1") if v["stage"] == "confirmed"]
    assert len(confirmed) == 1
    assert sum(isinstance(r, int) for r in results) == 1
    refusals = [r for r in results if isinstance(r, str)]
    assert len(refusals) == 5 and all("already has a confirmed label" in r for r in refusals)
    assert [r["stage"] for r in store.history("S1")] == ["refined", "confirmed"]


def test_stale_base_version_names_who_saved_in_between(setup):
    tmp_path, reference = setup
    store = LabelStore(tmp_path / "labels")
    label = _write(tmp_path / "a.nii.gz")
    assert store.import_label("S1", label, "refined", "alice", reference, base_version=0) == 1
    # bob started from version 1 too, but alice saved again first
    assert store.import_label("S1", label, "refined", "alice", reference, base_version=1) == 2
    with pytest.raises(StaleLabelError) as caught:
        store.import_label("S1", label, "refined", "bob", reference, base_version=1)
    error = caught.value
    assert isinstance(error, LabelImportError)
    assert error.saved_by == ["alice"] and error.latest_version == 2
    assert "v002 refined by alice" in error.problem
    assert store.latest_version("S1") == 2
    with pytest.raises(LabelImportError, match="does not exist"):
        store.import_label("S1", label, "refined", "bob", reference, base_version=7)


def test_extra_provenance_is_recorded_but_cannot_replace_store_fields(setup):
    tmp_path, reference = setup
    store = LabelStore(tmp_path / "labels")
    store.import_label(
        "S1",
        _write(tmp_path / "a.nii.gz"),
        "refined",
        "alice",
        reference,
        provenance={"via": "web", "review_seconds": 12.5, "reviewer": "mallory"},
    )
    (record,) = store.history("S1")
    assert record["via"] == "web" and record["review_seconds"] == 12.5
    assert record["reviewer"] == "alice"


def test_file_imports_record_that_labels_arrived_as_files(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from metsflow.active_learning.review import import_batch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_review_load.py"
    spec = importlib.util.spec_from_file_location("bench_review_load", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_review_load", bench)
    spec.loader.exec_module(bench)
    bench.write_review_batch(tmp_path / "results", 1, 8, durable=False)
    review = tmp_path / "results" / "rounds" / "round_1" / "review"
    (review / "S0001" / "segmentation.nii.gz").write_bytes(bench.label_bytes((8, 8, 8)))
    store = LabelStore(tmp_path / "labels")
    result = import_batch(review, store, "refined", "alice")
    assert list(result["result"]) == ["imported"]
    assert store.history("S0001")[0]["via"] == "files"
