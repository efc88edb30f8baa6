"""Faults at cohort scale, through the real workflow: broken studies and killed runs.

One small phantom cohort (6 studies) with broken studies is run twice: once straight through,
once SIGKILLed (snakemake and every job it started) at several points and restarted each time.
Both must quarantine exactly the broken studies, complete every other one, and the killed run
must end with the same outputs as the uninterrupted one.

Which outputs are bit-deterministic (compared by checksum): every NIfTI image and label
(nibabel writes gzip with a zero timestamp), the ANTs transforms (.mat / warp fields; ANTs runs
single-threaded with a fixed seed), the plan and the QC table. Not bit-deterministic, compared
with their timing fields removed: the shard manifests and per-study JSON (``seconds``, wall-clock
durations) and the ``.done.json`` stamps (their fingerprint hashes input mtimes, which a rerun of
an upstream study legitimately changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY_SETTINGS, run_snakemake

BROKEN = {
    # study: (file column, what is wrong) - the study fails preprocessing and is quarantined
    "P001_T1": ("t1c", "truncated"),
    "P002_T0": ("t2", "NaN"),
}
SINGLE_TIMEPOINT_PATIENT = "P009"  # gets P002_T2's images: a patient with one study
FAST_PREPROCESS = {"spacing": [4.0, 4.0, 4.0], "brain_mask": "nonzero", "coregister": "none"}


@pytest.fixture(scope="module")
def broken_cohort(tmp_path_factory):
    """2 patients x 3 time points of the phantom, re-cut to P001 (3), P002 (2), P009 (1), with
    P001_T1 (truncated T1c: P001_T2 must register to P001_T0) and P002_T0 (NaN in T2: P002_T1
    becomes the baseline) broken."""
    import nibabel as nib

    from metsflow.cohort.phantom import make_demo_cohort

    demo = tmp_path_factory.mktemp("broken_demo")
    make_demo_cohort(
        demo,
        n_patients=2,
        n_timepoints=3,
        native_spacing=(3.0, 3.0, 3.0),
        model_spacing=4.0,
        labelled_patients=1,
        skull=False,
        max_lesions=2,
        seed=0,
    )
    sheet = pd.read_csv(demo / "studies.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet.loc[sheet.study_id == "P002_T2", ["patient_id", "timepoint"]] = [
        SINGLE_TIMEPOINT_PATIENT,
        "0",
    ]
    sheet.to_csv(demo / "studies.tsv", sep="\t", index=False)
    rows = sheet.set_index("study_id")
    truncated = demo / rows.loc["P001_T1", "t1c"]
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    nan_file = demo / rows.loc["P002_T0", "t2"]
    img = nib.load(nan_file)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[tuple(np.array(data.shape) // 2)] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), nan_file)  # float32: int16 cannot hold NaN
    return demo


def _config(demo: Path, results: Path) -> Path:
    """The tiny test config (as conftest's ``tiny_config``: its registration schedule) with a
    fast preprocessing."""
    config = {
        "sheet": str(demo / "studies.tsv"),
        "oracle_sheet": str(demo / "oracle.tsv"),
        "results": str(results),
        "label_store": str(results.parent / f"{results.name}_labels"),
        "sharding": {"cpu_shard_size": 4, "gpu_shard_size": 8},
        "preprocess": FAST_PREPROCESS,
        "register": TINY_SETTINGS["register"],
        "threads": {"preprocess": 1, "register": 1, "train": 1, "infer": 1},
    }
    path = results.parent / f"{results.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake_args(config: Path, results: Path) -> list[str]:
    # --nolock: a SIGKILLed snakemake cannot release its lock (a user runs --unlock); the
    # profile's rerun-incomplete redoes the jobs that were running when it died.
    return [
        "--profile",
        "profiles/local",
        "--cores",
        "2",
        "--nolock",
        "--configfile",
        str(config),
        "--",
        str(results / "qc/quarantine.tsv"),
    ]


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in ("seconds", "fingerprint")}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _snapshot(results: Path) -> dict[str, str]:
    """Relative path -> checksum of content (timing fields removed where not deterministic)."""
    out = {}
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results).as_posix()
        if not path.is_file() or rel.split("/")[0] in ("logs", "benchmarks"):
            continue
        # Shard manifests and their cohort-wide concatenation carry per-study wall seconds.
        if path.suffix == ".tsv" and ("/shards/" in f"/{rel}" or path.name == "manifest.tsv"):
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
            blob = table.drop(columns=["seconds"]).to_csv(index=False).encode()
        elif path.suffix == ".json":
            blob = json.dumps(_strip_timing(json.loads(path.read_text())), sort_keys=True).encode()
        else:
            blob = path.read_bytes()
        out[rel] = hashlib.sha256(blob).hexdigest()
    return out


@pytest.fixture(scope="module")
def straight_run(broken_cohort, tmp_path_factory) -> Path:
    """The uninterrupted run: results folder."""
    results = tmp_path_factory.mktemp("runs") / "straight"
    run_snakemake(_snakemake_args(_config(broken_cohort, results), results), timeout=900)
    return results


@pytest.mark.slow
def test_broken_studies_are_quarantined_and_the_rest_completes(straight_run):
    results = straight_run

    quarantine = pd.read_csv(results / "qc/quarantine.tsv", sep="\t", keep_default_na=False)
    assert set(quarantine.study_id) == set(BROKEN)
    for study_id, (column, words) in BROKEN.items():
        ((file, problem),) = quarantine.loc[
            quarantine.study_id == study_id, ["file", "problem"]
        ].values
        assert file.endswith(f"{study_id}_{column}.nii.gz") and Path(file).is_absolute()
        assert study_id in problem and file in problem, problem
        assert words in problem, problem
    assert set(quarantine.stage) == {"preprocess"}

    prep = pd.concat(
        pd.read_csv(p, sep="\t", keep_default_na=False)
        for p in (results / "preprocessed/shards").glob("*.tsv")
    ).set_index("study_id")
    assert (prep.status == "ok").sum() == 4
    for study_id in BROKEN:  # a failed study leaves no partial output for later rules
        assert not (results / "preprocessed" / study_id).exists()

    reg = pd.concat(
        pd.read_csv(p, sep="\t", keep_default_na=False)
        for p in (results / "registered/shards").glob("*.tsv")
    ).set_index("study_id")
    assert reg.loc["P001_T0", "status"] == "baseline"
    assert reg.loc["P001_T1", "status"] == "skipped"
    # The previous study failed: registered to the nearest earlier one that succeeded.
    assert reg.loc["P001_T2", "status"] == "ok"
    assert reg.loc["P001_T2", "reference_study"] == "P001_T0"
    assert (results / "registered/P001_T2/qc.json").exists()
    assert reg.loc["P002_T1", "status"] == "baseline"  # its only earlier study failed
    assert reg.loc["P002_T2", "status"] == "baseline"  # the one-time-point patient


def _kill_when(popen: subprocess.Popen, ready, extra_delay: float, timeout: float) -> bool:
    """SIGKILL snakemake and all its jobs once ``ready()`` holds (+ a random delay).

    Returns False when the run finished before the kill point was reached.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if popen.poll() is not None:
            return False
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(extra_delay)
    if popen.poll() is not None:
        return False
    os.killpg(popen.pid, signal.SIGKILL)  # the job processes are in snakemake's group
    popen.wait()
    return True


@pytest.mark.slow
def test_run_killed_at_several_points_resumes_to_identical_outputs(
    broken_cohort, straight_run, tmp_path
):
    straight = straight_run
    killed = tmp_path / "killed"
    config = _config(broken_cohort, killed)
    prep, reg = killed / "preprocessed", killed / "registered"

    def has(folder: Path, pattern: str, n: int = 1):
        return lambda: len(list(folder.glob(pattern))) >= n

    kill_points = [
        ("first preprocessing job running", has(prep, "*/")),
        ("first study preprocessed", has(prep, "*/.done.json")),
        ("mid-way through preprocessing", has(prep, "*/.done.json", 3)),
        ("first registration running", has(reg, "*/")),
        ("a registration job finished", has(reg / "shards", "*.tsv")),
    ]
    rng = np.random.default_rng(8)
    cmd = [sys.executable, "-m", "snakemake", *_snakemake_args(config, killed)]
    kills = []
    for name, ready in kill_points:
        with open(tmp_path / "killed.log", "a") as log:
            popen = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            if _kill_when(popen, ready, float(rng.uniform(0.0, 0.5)), timeout=600):
                kills.append(name)
    print(f"\nkilled with SIGKILL at {len(kills)} of {len(kill_points)} points: {kills}")
    assert len(kills) >= 4, f"the run finished before most kill points: {kills}"
    run_snakemake(_snakemake_args(config, killed), timeout=900)

    expected, got = _snapshot(straight), _snapshot(killed)
    assert set(got) == set(expected), (
        f"only after kills: {sorted(set(got) - set(expected))}; "
        f"missing: {sorted(set(expected) - set(got))}"
    )
    differ = sorted(path for path in expected if expected[path] != got[path])
    assert not differ, f"outputs differ after kill-and-resume: {differ}"
    nifti = [p for p in expected if p.endswith(".nii.gz")]
    print(f"identical after kill-and-resume: {len(expected)} outputs ({len(nifti)} NIfTI)")
    assert len(nifti) >= 20


_TRAIN_UNTIL_SIGKILL = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
from _tiny_models import fast_params, ALL_AUGMENTATIONS
from metsflow.models import train

studies = json.loads({studies!r})
params = fast_params(iterations=6, checkpoint_interval=3, val_interval=3, **ALL_AUGMENTATIONS)
real_step, calls = train._train_step, [0]

def step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 5:  # mid-epoch, after the iteration-3 checkpoint: no cleanup code runs
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(*args, **kwargs)

train._train_step = step
train.train_model(studies[:3], studies[3:], params, {out!r}, log_path={log!r}, device="cpu")
"""


def test_training_killed_mid_epoch_by_sigkill_resumes_from_its_checkpoint(tmp_path):
    """A real SIGKILL (not an exception: no finally block runs) at iteration 5 of 6; the rerun
    resumes from the iteration-3 checkpoint and ends with the uninterrupted run's weights."""
    from _tiny_models import (
        ALL_AUGMENTATIONS,
        assert_same_weights,
        fast_params,
        make_prep_study,
        weights,
    )

    from metsflow.models import train

    root = tmp_path / "prep"
    root.mkdir()
    studies = [make_prep_study(root, f"S{i}", seed=i) for i in range(4)]
    params = fast_params(iterations=6, checkpoint_interval=3, val_interval=3, **ALL_AUGMENTATIONS)
    reference = tmp_path / "reference.pt"
    train.train_model(studies[:3], studies[3:], params, reference, device="cpu")

    out, log = tmp_path / "model.pt", tmp_path / "log.tsv"
    script = _TRAIN_UNTIL_SIGKILL.format(
        tests=str(Path(__file__).parent),
        studies=json.dumps(studies, default=str),
        out=str(out),
        log=str(log),
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert train.resume_path(out).exists() and not out.exists()

    result = train.train_model(studies[:3], studies[3:], params, out, log_path=log, device="cpu")
    assert result["resumed_from"] == 3 and result["iterations"] == 6
    assert_same_weights(weights(reference), weights(out))
    assert pd.read_csv(log, sep="\t")["iteration"].tolist() == list(range(1, 7))
    assert not train.resume_path(out).exists()
