"""Register every follow-up of one CPU shard to its previous time point and propagate labels.

A follow-up whose previous study failed preprocessing is registered to the nearest earlier time
point that succeeded (recorded in the manifest); a patient's first study needs no registration.
The shard manifest doubles as the registration QC table: NCC inside the brain and brain-mask
Dice before/after, minimum Jacobian, and a ``qc_flag`` with its reasons (from each pair's
qc.json), so a failed alignment is visible in the table, not only in a log.
"""

from __future__ import annotations

import logging

from metsflow.core.layout import LABEL, PRIOR, REGISTRATION_QC, Layout
from metsflow.core.runtime import set_threads
from metsflow.imaging.register import QC_COLUMNS, propagate_label, qc_columns, register_followup
from metsflow.jobs.manifest import (
    FILE_COLUMN,
    fingerprint,
    ok_studies,
    read_manifests,
    run_study,
    write_manifest,
)

log = logging.getLogger(__name__)


def run_register_shard(
    layout: Layout,
    settings: dict,
    studies: list[dict],
    preprocess_manifest: str,
    manifest: str,
    threads: int = 1,
) -> list[dict]:
    """``studies``: plan rows of the shard (study_id, patient_id, order), in patient order."""
    set_threads(threads)
    preprocessed = read_manifests([preprocess_manifest])
    ok = ok_studies(preprocessed)
    rows = []
    last_ok_by_patient: dict[str, str] = {}
    for record in sorted(studies, key=lambda r: (r["patient_id"], int(r["order"]))):
        study_id, patient = record["study_id"], record["patient_id"]
        reference = last_ok_by_patient.get(patient)
        if study_id not in ok:
            rows.append(_row(study_id, patient, "skipped", "preprocessing failed", reference))
            continue
        last_ok_by_patient[patient] = study_id
        if reference is None:
            rows.append(_row(study_id, patient, "baseline", "", None))
            continue
        followup_dir = layout.preprocessed_dir(study_id)
        previous_dir = layout.preprocessed_dir(reference)
        out_dir = layout.registered_dir(study_id)
        previous_label = previous_dir / LABEL

        # computed under run_study's failure policy: an unreadable folder fails this study only
        def stamp(followup_dir=followup_dir, previous_dir=previous_dir, reference=reference):
            return fingerprint(
                [followup_dir / ".done.json", previous_dir / ".done.json"],
                {"settings": settings, "reference": reference},
            )

        def work(
            followup_dir=followup_dir,
            previous_dir=previous_dir,
            out_dir=out_dir,
            previous_label=previous_label,
        ):
            qc = register_followup(followup_dir, previous_dir, out_dir, settings, threads=threads)
            if previous_label.exists():
                propagate_label(previous_label, out_dir, followup_dir, out_dir / PRIOR)
            return qc

        log.info("registering %s to %s", study_id, reference)
        row = run_study(study_id, patient, out_dir, stamp, work)
        row["reference_study"] = reference
        if row["status"] == "ok":
            row.update(qc_columns(out_dir / REGISTRATION_QC))
            if row["qc_flag"]:
                log.warning(
                    "registration of %s to %s flagged for review: %s",
                    study_id,
                    reference,
                    row["qc_reasons"],
                )
        rows.append(row)
    write_manifest(manifest, rows, extra_columns=["reference_study", FILE_COLUMN, *QC_COLUMNS])
    return rows


def _row(study_id, patient_id, status, problem, reference):
    return {
        "study_id": study_id,
        "patient_id": patient_id,
        "status": status,
        "problem": problem,
        "seconds": 0.0,
        "reference_study": reference or "",
    }
