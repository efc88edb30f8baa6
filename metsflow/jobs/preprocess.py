"""Preprocess the studies of one CPU shard (see metsflow.imaging.preprocess for the per-study steps)."""

from __future__ import annotations

import logging

from metsflow.cohort.sheet import Study
from metsflow.core.layout import Layout
from metsflow.core.runtime import set_threads
from metsflow.imaging.preprocess import preprocess_study
from metsflow.jobs.manifest import FILE_COLUMN, fingerprint, run_study, write_manifest

log = logging.getLogger(__name__)


def preprocess_one(study: Study, out_dir, settings: dict, threads: int = 1) -> dict:
    """One study under the per-study failure policy (``run_study``): skipped when its stamp
    (inputs + settings) matches what ``out_dir`` holds; its manifest row. The cohort's shards
    and the pretraining sheet (``jobs.train.run_pretrain``) both preprocess through it."""
    inputs = [study.t1, study.t1c, study.t2, study.flair, study.label]
    try:
        stamp = fingerprint(inputs, settings)
    except OSError:
        stamp = "missing-input"  # preprocess_study reports which file and why
    log.info("preprocessing %s", study.study_id)
    return run_study(
        study.study_id,
        study.patient_id,
        out_dir,
        stamp,
        lambda: preprocess_study(study, out_dir, settings, threads=threads),
    )


def run_preprocess_shard(
    layout: Layout, settings: dict, studies: list[dict], manifest: str, threads: int = 1
) -> list[dict]:
    """Preprocess ``studies`` (study records) into ``layout.preprocessed_dir``."""
    set_threads(threads)
    rows = []
    for record in studies:
        study = Study.from_record(record)
        rows.append(
            preprocess_one(study, layout.preprocessed_dir(study.study_id), settings, threads)
        )
    write_manifest(manifest, rows, extra_columns=[FILE_COLUMN])
    return rows
