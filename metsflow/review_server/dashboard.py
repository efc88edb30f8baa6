"""The admin's dashboard: progress per batch and reviewer, review time per study and round,
and the review-times table (``TSV_COLUMNS``), all read from the audit log and the label store.
"""

from __future__ import annotations

import statistics

from metsflow.review_server import db, policy
from metsflow.review_server.catalog import FINAL_BATCH
from metsflow.review_server.service import ReviewApp

STATUSES = tuple(str(status) for status in policy.Status)
TSV_COLUMNS = [
    "round",
    "batch",
    "study_id",
    "patient_id",
    "reviewer",
    "role",
    "stage",
    "version",
    "opened_at",
    "saved_at",
    "review_seconds",
]


def dashboard_data(app: ReviewApp) -> dict:
    """Progress per batch and per reviewer, time per study (open -> save), and per round
    (every round ever reviewed in the browser, from the audit log): saves and review time."""
    with db.connect(app.db_path) as con:
        assigned = db.assignments(con)
        people = {u["username"]: u["role"] for u in db.list_users(con)}
        saves = db.events(con, ("save", "confirm", "override"))
        rows = []
        for entry in app.catalog.studies().values():
            state = app.state(con, entry, assigned.get(entry.study_id, {}))
            rows.append((entry, state))
    totals = dict.fromkeys((*STATUSES, "total"), 0)
    batches: dict[str, dict] = {}
    studies = []
    by_study: dict[str, list[dict]] = {}
    for event in saves:
        by_study.setdefault(event["study_id"], []).append(event)
    for entry, state in rows:
        totals[state["status"]] += 1
        totals["total"] += 1
        batch = batches.setdefault(
            entry.batch, {"batch": entry.batch, **dict.fromkeys((*STATUSES, "total"), 0)}
        )
        batch[state["status"]] += 1
        batch["total"] += 1
        history = app.store.history(entry.study_id)
        by_stage = {r.get("stage"): r for r in history}
        seconds = {stage: 0.0 for stage in ("refined", "confirmed")}
        for event in by_study.get(entry.study_id, []):
            value = event["detail"].get("review_seconds")
            if value is not None:
                seconds[event["detail"].get("stage", "refined")] += float(value)
        studies.append(
            {
                "study_id": entry.study_id,
                "patient_id": entry.patient_id,
                "batch": entry.batch,
                "status": state["status"],
                "assigned_to": state["assigned_to"],
                "refined_by": by_stage.get("refined", {}).get("reviewer", ""),
                "confirmed_by": by_stage.get("confirmed", {}).get("reviewer", ""),
                "refine_seconds": round(seconds["refined"], 1),
                "confirm_seconds": round(seconds["confirmed"], 1),
            }
        )
    reviewers = []
    for username, role in sorted(people.items()):
        mine = [e for e in saves if e["username"] == username]
        times = [
            float(e["detail"]["review_seconds"])
            for e in mine
            if e["detail"].get("review_seconds") is not None
        ]
        reviewers.append(
            {
                "username": username,
                "role": role,
                "assigned": sum(1 for a in assigned.values() if a.get("username") == username),
                "saves": len(mine),
                "refined": sum(1 for e in mine if e["detail"].get("stage") == "refined"),
                "confirmed": sum(1 for e in mine if e["detail"].get("stage") == "confirmed"),
                "median_seconds": round(statistics.median(times), 1) if times else None,
                "total_seconds": round(sum(times), 1),
            }
        )
    per_round: dict[str, list[dict]] = {}
    for event in saves:
        detail = event["detail"]
        key = detail.get("batch") if detail.get("batch") == FINAL_BATCH else detail.get("round")
        per_round.setdefault(str(key), []).append(detail)
    rounds = []
    for key, details in sorted(per_round.items()):
        times = [float(d["review_seconds"]) for d in details if d.get("review_seconds") is not None]
        rounds.append(
            {
                "round": key,
                "saves": len(details),
                "refined": sum(1 for d in details if d.get("stage") == "refined"),
                "confirmed": sum(1 for d in details if d.get("stage") == "confirmed"),
                "median_seconds": round(statistics.median(times), 1) if times else None,
                "total_seconds": round(sum(times), 1),
            }
        )
    return {
        "round": app.catalog.round,
        "totals": totals,
        "batches": list(batches.values()),
        "rounds": rounds,
        "reviewers": reviewers,
        "studies": studies,
    }


def review_times_tsv(app: ReviewApp) -> str:
    """One row per web save (``TSV_COLUMNS``): who saved which study at which stage, when it
    was opened and saved, and the seconds in between."""
    with db.connect(app.db_path) as con:
        saves = db.events(con, ("save", "confirm", "override"))
    lines = ["\t".join(TSV_COLUMNS)]
    for event in saves:
        detail = event["detail"]
        values = {
            "round": detail.get("round"),
            "batch": detail.get("batch"),
            "study_id": event["study_id"],
            "patient_id": detail.get("patient_id"),
            "reviewer": event["username"],
            "role": detail.get("role"),
            "stage": detail.get("stage"),
            "version": event["version"],
            "opened_at": detail.get("opened_at"),
            "saved_at": db.iso(event["at"]),
            "review_seconds": detail.get("review_seconds"),
        }
        cells = ["" if values[c] is None else str(values[c]) for c in TSV_COLUMNS]
        lines.append("\t".join(c.replace("\t", " ").replace("\n", " ") for c in cells))
    return "\n".join(lines) + "\n"
