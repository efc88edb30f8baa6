"""Work queues: spread a batch across trainees, balanced by study count, whole patients together.

Why whole patients: a trainee who corrects a patient's baseline also corrects the follow-ups
with the same lesions in mind, and the longitudinal tracking reads them as one series.
``balanced_assignment`` is the pure rule; ``auto_assign`` and ``assign_studies`` apply it (or
an admin's explicit reassignment) to the served batches in the review database.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from metsflow.review_server import db
from metsflow.review_server.service import HTTPError, ReviewApp


def balanced_assignment(
    studies: Iterable[tuple[str, str]],
    trainees: Iterable[str],
    current: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """New assignments ``study_id -> trainee`` for the studies in ``studies`` (study, patient)
    that ``current`` does not assign yet.

    A patient some of whose studies are already assigned keeps that trainee for the rest;
    other patients go, largest first, to the trainee with the fewest studies so far (ties: by
    name), so loads differ by at most one patient's size. Existing assignments never move
    (reassigning is the admin's explicit act).
    """
    trainees = sorted(set(trainees))
    if not trainees:
        raise ValueError(
            "no trainee accounts: add one with `metsflow review user add NAME --role trainee`"
        )
    current = {s: u for s, u in (current or {}).items() if u}
    patients: dict[str, list[str]] = defaultdict(list)
    for study_id, patient_id in studies:
        patients[patient_id].append(study_id)
    load = Counter({name: 0 for name in trainees})
    owner: dict[str, str] = {}
    for patient_id, members in patients.items():
        for study_id in members:
            if study_id in current:
                load[current[study_id]] += 1
                owner.setdefault(patient_id, current[study_id])
    result: dict[str, str] = {}
    pending = {p: [s for s in members if s not in current] for p, members in patients.items()}
    order = sorted(
        (p for p, members in pending.items() if members), key=lambda p: (-len(pending[p]), p)
    )
    for patient_id in order:
        trainee = owner.get(patient_id)
        if trainee is None or trainee not in load:
            trainee = min(trainees, key=lambda name: (load[name], name))
        for study_id in pending[patient_id]:
            result[study_id] = trainee
        load[trainee] += len(pending[patient_id])
    return result


def assign_studies(
    app: ReviewApp, username: str, study_id: str | None, patient_id: str | None, by: str
) -> list[str]:
    """Reassign one study, or all of a patient's studies, to a trainee (the admin's act)."""
    with db.connect(app.db_path) as con, db.transaction(con):
        if db.user_role(con, username) != "trainee":
            raise HTTPError(400, f"{username!r} is not a trainee account")
        studies = app.catalog.studies()
        if study_id is not None:
            chosen = [app.entry(study_id)]
        else:
            chosen = [e for e in studies.values() if e.patient_id == patient_id]
            if not chosen:
                raise HTTPError(404, f"patient {patient_id!r} has no study in the review batch")
        for entry in chosen:
            db.set_assignment(con, entry.study_id, entry.patient_id, entry.batch, username)
            db.log_event(con, "reassign", by, entry.study_id, to=username)
    return [e.study_id for e in chosen]


def auto_assign(app: ReviewApp, by: str) -> dict[str, int]:
    """Assign every unassigned study of the served batches (balanced, patients together)."""
    with db.connect(app.db_path) as con, db.transaction(con):
        trainees = [u["username"] for u in db.list_users(con) if u["role"] == "trainee"]
        current = {s: a["username"] for s, a in db.assignments(con).items()}
        studies = app.catalog.studies()
        try:
            new = balanced_assignment(
                [(e.study_id, e.patient_id) for e in studies.values()], trainees, current
            )
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        counts: dict[str, int] = {}
        for study_id, username in new.items():
            entry = studies[study_id]
            db.set_assignment(con, study_id, entry.patient_id, entry.batch, username)
            db.log_event(con, "assign", by, study_id, to=username)
            counts[username] = counts.get(username, 0) + 1
    return counts
