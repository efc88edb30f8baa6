"""Export jobs of the last round: the final labels as a BIDS derivative dataset and DICOM SEG.

Both read ``results/final/labels.tsv`` (every pool study's final label on its native T1c grid:
human-confirmed or the final model's) and write one manifest row per study (status ok, failed
with the problem, no_label, or not_dicom), so one bad study does not stop the export.

Per-lesion tables: enhancing lesions of the final labels are tracked over each patient's time
points exactly as ``metsflow.jobs.longitudinal`` tracks predictions (on the preprocessed grid,
through the follow-up registrations, ``evaluate.response`` settings), so the tracked ids follow
the same rule; a human label is first resampled onto the study's preprocessed grid. Where a
patient's registration chain breaks, the studies after the break start a new series whose ids
are prefixed with its first study (``<study>-L<k>``), so ids never collide.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import pandas as pd

from metsflow.active_learning.final import HUMAN_CONFIRMED
from metsflow.cohort.bids import entity_table
from metsflow.cohort.plan import read_plan
from metsflow.cohort.sheet import Study
from metsflow.core.io import write_table
from metsflow.core.layout import T1C, Layout
from metsflow.evaluation.longitudinal import ResponseThresholds, registered_chains, track_chains
from metsflow.jobs.manifest import read_manifests, registration_references

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["study_id", "status", "path", "problem"]


def final_studies(
    final_labels: str, studies: list[dict], plan_path: str, bids_names: bool = True
) -> pd.DataFrame:
    """One row per final-label study: ids, BIDS entities (``bids_names``; two studies with one
    BIDS name are an error), order, label, t1c, manual."""
    labels = pd.read_csv(final_labels, sep="\t", dtype=str, keep_default_na=False)
    plan = read_plan(plan_path)
    order = dict(zip(plan.study_id, plan.order, strict=True))
    index = {r["study_id"]: Study.from_record(r) for r in studies}
    if bids_names:
        entities = entity_table((index[s].patient_id, s) for s in labels.study_id)
    else:
        entities = dict.fromkeys(labels.study_id, ("", ""))
    rows = []
    for row in labels.itertuples(index=False):
        subject, session = entities[row.study_id]
        rows.append(
            {
                "study_id": row.study_id,
                "patient_id": row.patient_id,
                "subject": subject,
                "session": session,
                "order": order[row.study_id],
                "label": row.label,
                "t1c": str(index[row.study_id].t1c),
                "manual": row.source == HUMAN_CONFIRMED,
                "round": row.round,
            }
        )
    return pd.DataFrame(rows)


def track_final_labels(
    studies: pd.DataFrame,
    registration_manifests: list[str],
    layout: Layout,
    thresholds: ResponseThresholds,
    warp_factory=None,
) -> pd.DataFrame:
    """Tracked enhancing lesions of the final labels (``track_patient`` rows + ``label``);
    ``warp_factory``: ``metsflow.imaging.register.lesion_id_warp`` unless given."""
    from metsflow.imaging.grid import label_to_grid

    if warp_factory is None:
        # ANTs with the tracking only: imported with this module it cost the DICOM SEG export,
        # which warps nothing, 2.1 of its 4.5 CPU-s of imports.
        from metsflow.imaging.register import lesion_id_warp as warp_factory

    reference_of = registration_references(read_manifests(registration_manifests))
    prep, reg = layout.stage_root("preprocessed"), layout.stage_root("registered")
    labelled = studies[
        (studies.label != "") & studies.study_id.map(lambda s: layout.preprocessed_dir(s).is_dir())
    ]
    label_of = dict(zip(labelled.study_id, labelled.label, strict=True))
    # Series after a break in a patient's registrations are named after their first study.
    series = [
        (patient_id, patient_id if k == 0 else chain[0], chain)
        for patient_id, rows in labelled.groupby("patient_id", sort=True)
        for k, chain in enumerate(
            registered_chains(list(rows.sort_values("order").study_id), reference_of)
        )
    ]

    def load(study_id: str):
        reference = layout.preprocessed_dir(study_id) / T1C
        img = nib.load(str(reference))
        return label_to_grid(label_of[study_id], reference), img.affine, img.header.get_zooms()[:3]

    with tempfile.TemporaryDirectory(prefix="metsflow_export_") as scratch:
        lesions, _ = track_chains(
            series,
            load,
            dict(zip(labelled.study_id, labelled.order, strict=True)),
            lambda affines: warp_factory(prep, reg, affines, Path(scratch)),
            thresholds,
        )
    return lesions.assign(label="enhancing")


@dataclass(frozen=True)
class FinalExport:
    """What an export job reads and writes (rules/export.smk).

    ``studies``: cohort records of the pool studies (the final labels' studies);
    ``model_round``: the round whose model labelled the studies no person confirmed;
    ``registration_manifests`` / ``out_root``: the BIDS export's lesion tracking and dataset
    folder (``export.bids_dir``).
    """

    final_labels: str
    plan: str
    studies: list[dict]
    model_round: int
    manifest: str
    registration_manifests: list[str] = field(default_factory=list)
    out_root: str = ""

    @classmethod
    def from_snakemake(cls, smk) -> FinalExport:
        description = smk.output.get("description")
        return cls(
            final_labels=smk.input.labels,
            plan=smk.input.plan,
            studies=list(smk.params.studies),
            model_round=int(smk.params.model_round),
            manifest=smk.output.manifest,
            registration_manifests=list(smk.input.get("registered", [])),
            out_root=os.path.dirname(description) if description else "",
        )


def run_export_bids(
    layout: Layout, thresholds: ResponseThresholds, job: FinalExport
) -> pd.DataFrame:
    """The final labels as a BIDS derivative dataset in ``job.out_root`` (export.bids_dir)."""
    from metsflow.cohort.export import export_bids

    table = final_studies(job.final_labels, job.studies, job.plan)
    lesions = track_final_labels(table, job.registration_manifests, layout, thresholds)
    manifest = export_bids(table, lesions, job.out_root, model_round=job.model_round)
    write_table(job.manifest, manifest)
    log.info("BIDS export to %s: %s", job.out_root, manifest.status.value_counts().to_dict())
    return manifest


def run_export_dicom_seg(layout: Layout, job: FinalExport) -> pd.DataFrame:
    """A DICOM SEG per final label of a study imported from DICOM (``metsflow.cohort.dicom``)."""
    from metsflow.cohort.dicom import dicom_source
    from metsflow.cohort.export import write_dicom_seg

    table = final_studies(job.final_labels, job.studies, job.plan, bids_names=False)
    rows = []
    for study in table.itertuples(index=False):
        row = {"study_id": study.study_id, "status": "ok", "path": "", "problem": ""}
        source = dicom_source(study.t1c)
        if source is None:
            rows.append({**row, "status": "not_dicom"})
            continue
        if not study.label:
            rows.append({**row, "status": "no_label"})
            continue
        target = Path(layout.dicom_seg_dir) / f"{study.study_id}.dcm"
        try:
            write_dicom_seg(
                study.label,
                source["files"],
                target,
                study.study_id,
                manual=study.manual,
                model_round=job.model_round,
            )
        except Exception as exc:  # one failure policy per study: record it, go on
            log.warning("study %s: DICOM SEG failed: %s", study.study_id, exc)
            rows.append({**row, "status": "failed", "problem": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({**row, "path": str(target)})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    write_table(job.manifest, manifest)
    log.info(
        "DICOM SEG export to %s: %s", layout.dicom_seg_dir, manifest.status.value_counts().to_dict()
    )
    return manifest
