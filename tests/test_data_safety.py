"""Safety of human work and of the machine: every path that could overwrite a confirmed label
is tried and must fail; untrusted checkpoints and sheets cannot run code or escape the data.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from metsflow.active_learning import labelstore
from metsflow.active_learning.labelstore import LabelImportError, LabelStore
from metsflow.cohort.sheet import SheetError, read_sheet
from metsflow.core import io
from metsflow.core.layout import Layout
from metsflow.core.settings import ActiveLearningSettings
from metsflow.jobs.active_learning import BatchAnnotation, run_collect_annotations
from metsflow.models import networks as models

SHAPE = (12, 14, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _label(value: int) -> np.ndarray:
    data = np.zeros(SHAPE, np.uint8)
    data[4:7, 5:8, 3:6] = value
    return data


@pytest.fixture
def confirmed(tmp_path):
    """A store with study S1 confirmed by a person; returns (store, study record, label path)."""
    t1c = tmp_path / "S1_t1c.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(SHAPE, np.float32), AFFINE), t1c)
    human = tmp_path / "human.nii.gz"
    nib.save(nib.Nifti1Image(_label(1), AFFINE), human)
    store = LabelStore(tmp_path / "labels", known_studies={"S1"})
    store.import_label("S1", human, "confirmed", "dr.who", reference_image=t1c)
    record = {
        "patient_id": "P1",
        "study_id": "S1",
        "timepoint": "0",
        "order": 0,
        "t1": None,
        "t1c": str(t1c),
        "t2": None,
        "flair": None,
        "label": None,
        "label_convention": "internal",
    }
    return store, record, store.confirmed("S1")


def _unchanged(store: LabelStore, path: Path, sha: str) -> None:
    assert path.exists() and _sha(path) == sha
    assert store.confirmed("S1") == path
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_labelstore_marker_name_matches_the_io_guard():
    assert labelstore.MARKER_NAME == io.LABEL_STORE_MARKER


def test_reimport_is_refused_and_override_only_adds_a_version(confirmed, tmp_path):
    store, record, path = confirmed
    sha = _sha(path)
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(_label(3), AFFINE), other)
    for stage in ("refined", "confirmed"):
        with pytest.raises(LabelImportError, match="already has a confirmed label"):
            store.import_label("S1", other, stage, "someone", reference_image=record["t1c"])
    _unchanged(store, path, sha)
    version = store.import_label(
        "S1",
        other,
        "confirmed",
        "dr.who",
        reference_image=record["t1c"],
        override=True,
        reason="second opinion",
    )
    assert version == 2 and store.confirmed("S1") != path
    assert path.exists() and _sha(path) == sha  # version 1 is kept, byte for byte
    assert [v["version"] for v in store.versions("S1")] == [1, 2]


def test_rerun_of_a_round_leaves_confirmed_labels_untouched(confirmed, tmp_path):
    """The simulated annotator of a re-run round must skip a study a person confirmed."""
    store, record, path = confirmed
    sha, mtime = _sha(path), path.stat().st_mtime_ns
    truth = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(_label(2), AFFINE), truth)
    oracle = tmp_path / "oracle.tsv"
    row = {"study_id": "S1", "label": truth.name}  # label_convention is optional
    pd.DataFrame([row]).to_csv(oracle, sep="\t", index=False)
    selection = tmp_path / "selection.tsv"
    pd.DataFrame({"study_id": ["S1"]}).to_csv(selection, sep="\t", index=False)
    for attempt in range(2):
        table = run_collect_annotations(
            Layout(tmp_path / "results"),
            ActiveLearningSettings(annotator="simulated"),
            BatchAnnotation(
                round_index=1,
                selection=str(selection),
                oracle_sheet=str(oracle),
                label_store=str(store.root),
                studies=[record],
                model="round_0/model.pt",
                annotations=str(tmp_path / f"annotations{attempt}.tsv"),
            ),
        )
        assert list(table.label) == [str(path)]
    _unchanged(store, path, sha)
    assert path.stat().st_mtime_ns == mtime
    assert len(store.versions("S1")) == 1


def test_model_outputs_cannot_be_written_into_the_store(confirmed, tmp_path):
    """A results/ path misconfigured into the label store (or linked into it) is refused for
    every kind of pipeline output: predictions, tables, JSON, checkpoints."""
    store, _, path = confirmed
    sha = _sha(path)
    prediction = _label(2)
    with pytest.raises(io.LabelStoreWriteError, match="label store"):
        io.save_nifti(path, prediction, AFFINE, dtype=np.uint8)  # onto the confirmed file
    with pytest.raises(PermissionError):
        io.save_nifti(store.root / "S1" / "prediction.nii.gz", prediction, AFFINE)
    with pytest.raises(PermissionError):
        io.write_table(store.root / "predictions.tsv", pd.DataFrame({"a": [1]}))
    with pytest.raises(PermissionError):
        io.write_json(store.root / "S1" / "qc.json", {"dice": 1.0})
    network = torch.nn.Conv3d(1, 1, 1)
    with pytest.raises(PermissionError), io.atomic_path(store.root / "model.pt") as tmp:
        torch.save(network.state_dict(), tmp)
    results_link = tmp_path / "results"
    results_link.symlink_to(store.root / "S1")  # a results folder that is a link into the store
    with pytest.raises(PermissionError):
        io.save_nifti(results_link / path.name, prediction, AFFINE)
    _unchanged(store, path, sha)
    assert sorted(p.name for p in (store.root / "S1").iterdir() if not p.name.startswith(".")) == [
        "history.jsonl",
        path.name,
    ]


def test_malicious_checkpoint_cannot_run_code(tmp_path):
    """A checkpoint is a pickle: weights_only=True must refuse one that would execute code."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "model.pt"
    torch.save({"format": "metsflow", "state_dict": Payload()}, evil)
    assert zipfile.is_zipfile(evil)
    with pytest.raises(ValueError, match="not a metsflow checkpoint"):
        models.read_checkpoint(evil)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError):
        models.read_checkpoint(raw)
    assert not marker.exists()


def _sheet(tmp_path: Path, t1c: str) -> Path:
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    sheet = folder / "studies.tsv"
    pd.DataFrame([{"patient_id": "P1", "study_id": "S1", "timepoint": "0", "t1c": t1c}]).to_csv(
        sheet, sep="\t", index=False
    )
    return sheet


@pytest.mark.parametrize(
    "t1c", ["../outside/t1c.nii.gz", "/etc/shadow", "data/../../outside/t1c.nii.gz"]
)
def test_sheet_paths_escaping_the_sheet_folder_are_refused_by_default(tmp_path, t1c):
    config = yaml.safe_load((Path(__file__).parents[1] / "config/config.yaml").read_text())
    assert config["data_roots"] == [] and config["allow_paths_outside_roots"] is False
    config["sheet"] = str(_sheet(tmp_path, t1c))

    def read(config):  # as metsflow.cohort.preflight.prepare_run reads it, once, at parse time
        return read_sheet(
            config["sheet"],
            data_roots=config["data_roots"],
            allow_outside_roots=config["allow_paths_outside_roots"],
        )

    with pytest.raises(SheetError, match="outside the data roots"):
        read(config)
    config["data_roots"] = [str(tmp_path), "/etc"]
    read(config)  # explicitly configured roots
    config["data_roots"] = []
    config["allow_paths_outside_roots"] = True
    read(config)  # explicitly allowed


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A writer killed inside ``atomic_path`` (SIGKILL: no cleanup) leaves its temporary file;
    the next write of the same file removes it, and nothing a live writer or another host owns."""
    import subprocess
    import sys

    target = tmp_path / "shards" / "s0000.tsv"
    target.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)  # that process has exited
    host = io._HOST
    stale = target.parent / f".s0000.{host}-{dead_pid}.ab_c12.tsv"
    live = target.parent / f".s0000.{host}-{os.getpid()}.xyz987.tsv"  # a write in progress here
    elsewhere = target.parent / f".s0000.0badc0de-{dead_pid}.k3j4l5.tsv"  # another node's writer
    longer = target.parent / f".s0000.{host}-{dead_pid}.q1w2e3.done.tsv"  # s0000.done.tsv's
    for path in (stale, live, elsewhere, longer):
        path.write_text("partial")
    io.write_table(target, pd.DataFrame({"study_id": ["S1"]}))
    assert pd.read_csv(target, sep="\t").study_id.tolist() == ["S1"]
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and longer.exists()
    leftovers = sorted(p.name for p in target.parent.iterdir())
    assert leftovers == sorted(["s0000.tsv", live.name, elsewhere.name, longer.name])
