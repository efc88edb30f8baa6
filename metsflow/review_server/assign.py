"""Work queues: spread a batch across trainees, balanced by study count, whole patients together.

Why whole patients: a trainee who corrects a patient's baseline also corrects the follow-ups
with the same lesions in mind, and the longitudinal tracking reads them as one series.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable


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
